"""What the built-in data draws: the attributes, the palette, the geometry and its jitter, and the shapes' pixel
coverage.  One source for the generator (:mod:`dalle2.data.synthetic`) and for the checkers that read its pictures
back (:mod:`dalle2.data.checker`, :mod:`dalle2.data.strict_checker`): the checkers read their tolerances from here,
so a change to the data's jitter changes what they accept.

Geometry is in units of the image side: the shape's bbox centre x per position (y = 0.5), its half extent per size.
The generator draws, per picture, ``jx, jy ~ U(-POS_JITTER, POS_JITTER)``, a size scale ``1 + U(-SIZE_JITTER,
SIZE_JITTER)`` and per RGB channel of the object and of the background ``U(-COLOR_JITTER, COLOR_JITTER)`` levels.
"""

from __future__ import annotations

import numpy as np

from dalle2.data.shape_fit import CROSS_BAR, SUPERSAMPLE

__all__ = [
    "ATTRIBUTES",
    "COLORS",
    "BACKGROUNDS",
    "CENTER_X",
    "CENTER_Y",
    "HALF_EXTENT",
    "POS_JITTER",
    "SIZE_JITTER",
    "COLOR_JITTER",
    "coverage",
]

ATTRIBUTES: dict[str, list[str]] = {
    "shape": ["circle", "square", "triangle", "cross"],
    "color": ["red", "green", "blue", "yellow", "purple"],
    "background": ["black", "white", "gray"],
    "size": ["small", "large"],
    "position": ["left", "center", "right"],
}

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "green": (35, 185, 55),
    "blue": (40, 75, 230),
    "yellow": (240, 215, 35),
    "purple": (150, 45, 200),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (12, 12, 12),
    "white": (242, 242, 242),
    "gray": (128, 128, 128),
}
CENTER_X = {"left": 0.27, "center": 0.5, "right": 0.73}  # bbox centre x per position (y: CENTER_Y)
CENTER_Y = 0.5
HALF_EXTENT = {"small": 0.11, "large": 0.21}  # half extent per size
POS_JITTER = 0.02  # +- this, in units of the side, on x and y
SIZE_JITTER = 0.08  # the half extent is scaled by 1 +- this
COLOR_JITTER = 8  # +- this many levels per RGB channel, object and background


def coverage(shape: str, cx: float, cy: float, r: float, height: int, width: int, ss: int = SUPERSAMPLE) -> np.ndarray:
    """Anti-aliased coverage in [0, 1], (H, W), of ``shape`` with bbox centre (cx, cy), half extent ``r``.

    Coordinates are in pixels with pixel ``i`` spanning ``[i, i+1]``.
    """
    ys = (np.arange(height * ss, dtype=np.float32) + 0.5) / ss - cy
    xs = (np.arange(width * ss, dtype=np.float32) + 0.5) / ss - cx
    y, x = ys[:, None], xs[None, :]
    if shape == "circle":
        inside = x * x + y * y <= r * r
    elif shape == "square":
        inside = (np.abs(x) <= r) & (np.abs(y) <= r)
    elif shape == "triangle":  # apex up, base at the bottom
        inside = (y >= -r) & (y <= r) & (np.abs(x) <= (y + r) / 2)
    elif shape == "cross":
        w = CROSS_BAR * r
        ax, ay = np.abs(x), np.abs(y)
        inside = ((ax <= w) & (ay <= r)) | ((ay <= w) & (ax <= r))
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {ATTRIBUTES['shape']}")
    return inside.reshape(height, ss, width, ss).mean(axis=(1, 3), dtype=np.float32)
