"""How a super-resolution stage compares with bicubic on real images: PSNR, edge blend width, the checkers.

    low = load_rgb(jpeg_bytes, image_size=64)             # the data loader's 64 px view (what the base decoder learns)
    table = compare_upsampling(real_256, {"bicubic": bicubic(low, 256), "sr": stage.upsample(low)}, attributes)

:func:`edge_width` is the strict checker's edge blend width (:mod:`dalle2.data.sharpness`), in pixels of the image it
is measured on: a clean 256 px render ~1 px, the same picture taken to 64 px and back by bicubic ~6 px; the
checker's ``strict/sharp`` bar is 2.47 px.

:func:`compare_upsampling` scores each candidate against the real high-res images: PSNR, edge width (median and the
ratio to the real images'), the lenient checker's ``accuracy/all`` and the strict checker's ``strict/*``
(``strict/all``: every attribute, sharpness included).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from dalle2.data.checker import check_images
from dalle2.data.strict_checker import measure
from dalle2.imaging import to_uint8

__all__ = ["bicubic", "compare_upsampling", "edge_width", "psnr"]


def psnr(pred: Tensor, target: Tensor) -> Tensor:
    """Per-image PSNR in dB of ``pred`` vs ``target`` (both (B, C, H, W) in [-1, 1], peak-to-peak 2)."""
    mse = (pred.float() - target.float()).pow(2).flatten(1).mean(1).clamp(min=1e-10)
    return 10.0 * torch.log10(4.0 / mse)


def bicubic(images: Tensor, size: int) -> Tensor:
    """``images (B, C, h, w)`` in [-1, 1] -> bicubic ``(B, C, size, size)`` clamped to [-1, 1] (the baseline)."""
    return F.interpolate(images.float(), size=(size, size), mode="bicubic", align_corners=False).clamp(-1.0, 1.0)


def edge_width(images: Tensor, attributes: Sequence[dict[str, str]]) -> np.ndarray:
    """Per-image edge blend width in px ``(N,)`` of built-in pictures ``(N, 3, H, W)`` in [-1, 1] (as 8-bit files):
    the strict checker's measurement (:func:`dalle2.data.strict_checker.measure`, :mod:`dalle2.data.sharpness`)."""
    arr = to_uint8(images.float().cpu(), (-1.0, 1.0)).numpy()
    return np.asarray(measure(arr, list(attributes))["edge_width"], dtype=np.float64)


def compare_upsampling(
    real: Tensor,
    candidates: Mapping[str, Tensor],
    attributes: Sequence[dict[str, str]],
    *,
    strict: bool = True,
) -> dict[str, dict[str, float]]:
    """Score ``candidates`` (name -> ``(N, 3, H, W)`` in [-1, 1]) against the real images ``real`` (same shape).

    Returns ``{"real": {...}, name: {...}}``, each with ``psnr`` (dB vs ``real``; left out for ``real`` itself),
    ``edge_width`` (median px), ``edge_width_ratio`` (to the real images'), the lenient ``accuracy/all`` and, with
    ``strict``, the strict checker's ``strict/*`` (:func:`dalle2.data.checker.check_images`)."""
    out: dict[str, dict[str, float]] = {}
    for name, images in {"real": real, **candidates}.items():
        if images.shape != real.shape:
            raise ValueError(f"{name}: images {tuple(images.shape)} do not match the real ones {tuple(real.shape)}")
        uint8 = to_uint8(images.float().cpu(), (-1.0, 1.0)).numpy()  # scored as the files a user would get
        checked = check_images(uint8, list(attributes), strict=strict)
        # the strict checker measures the edge width already (the same measurement, measured once)
        width = checked["strict/edge_width_median"] if strict else float(np.median(edge_width(images, attributes)))
        row = {"edge_width": width, "edge_width_ratio": width / out["real"]["edge_width"] if out else 1.0}
        if name != "real":
            row["psnr"] = float(psnr(images, real).mean())
        row.update(checked)
        out[name] = row
    return out
