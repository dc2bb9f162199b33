"""sRGB -> CIELAB (D65) and the CIE76 colour difference the strict checker states its colour tolerance in.

CIE76 ΔE is the Euclidean distance in L*a*b*: ~1 is a just-noticeable difference, ~2-10 a small one seen side by
side; the built-in palette's closest pair (blue / purple) is 30 apart and its jitter (±8 levels per channel) moves a
colour by at most ~11 (docs/checker.md).
"""

from __future__ import annotations

import numpy as np

__all__ = ["srgb_to_lab", "lab_to_srgb", "delta_e"]

_SRGB_TO_XYZ = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
_WHITE = np.array([0.95047, 1.0, 1.08883])  # D65


def srgb_to_lab(rgb) -> np.ndarray:
    """(..., 3) sRGB in 0..255 -> (..., 3) L*a*b* (float64)."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    c = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    xyz = c @ _SRGB_TO_XYZ.T / _WHITE
    e = 6.0 / 29.0
    f = np.where(xyz > e**3, np.cbrt(xyz), xyz / (3 * e * e) + 4.0 / 29.0)
    return np.stack([116.0 * f[..., 1] - 16.0, 500.0 * (f[..., 0] - f[..., 1]), 200.0 * (f[..., 1] - f[..., 2])], -1)


def delta_e(rgb_a, rgb_b) -> np.ndarray:
    """CIE76 colour difference of two (..., 3) sRGB arrays (0..255), broadcast."""
    return np.linalg.norm(srgb_to_lab(rgb_a) - srgb_to_lab(rgb_b), axis=-1)


def lab_to_srgb(lab) -> np.ndarray:
    """(..., 3) L*a*b* -> (..., 3) sRGB in 0..255 (float64, not clipped: out-of-gamut colours leave 0..255)."""
    lab = np.asarray(lab, dtype=np.float64)
    fy = (lab[..., 0] + 16.0) / 116.0
    f = np.stack([fy + lab[..., 1] / 500.0, fy, fy - lab[..., 2] / 200.0], -1)
    e = 6.0 / 29.0
    xyz = np.where(f > e, f**3, 3 * e * e * (f - 4.0 / 29.0)) * _WHITE
    c = xyz @ np.linalg.inv(_SRGB_TO_XYZ).T
    c = np.where(c > 0.0031308, 1.055 * np.abs(c) ** (1 / 2.4) - 0.055, 12.92 * c)
    return c * 255.0
