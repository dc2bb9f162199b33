"""How a super-resolution stage compares with bicubic on real images: PSNR, edge blend width, the checkers.

    low = lowres_like_pipeline(jpeg_bytes, 64)            # the base decoder's training view of a picture
    table = compare_upsampling(real_hi, {"bicubic": bicubic(low, 256), "sr": stage.upsample(low)}, attributes)

:func:`edge_width` measures the width of the blend zone between the object and the background of built-in pictures:
the 10-90 % rise distance of the object's matte, in pixels of the image it is measured on (a clean 256 px render
~0.8 px, the same picture taken to 64 px and back by bicubic ~4-5 px).  It is the area of the pixels whose matte lies
strictly between 0.1 and 0.9 divided by the length of the edge (the matte's total variation, by the coarea formula),
both counted in a band around the 0.5 contour so that flat-region grain neither adds to nor hides the edge.

:func:`compare_upsampling` scores each candidate against the real high-res images: PSNR, edge width (mean and the
ratio to the real images'), the lenient checker's ``accuracy/all`` and the strict checker's ``strict/*``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from dalle2.data.synthetic import check_images
from dalle2.imaging import to_uint8

__all__ = ["bicubic", "compare_upsampling", "edge_width", "object_matte", "psnr"]


def psnr(pred: Tensor, target: Tensor) -> Tensor:
    """Per-image PSNR in dB of ``pred`` vs ``target`` (both (B, C, H, W) in [-1, 1], peak-to-peak 2)."""
    mse = (pred.float() - target.float()).pow(2).flatten(1).mean(1).clamp(min=1e-10)
    return 10.0 * torch.log10(4.0 / mse)


def bicubic(images: Tensor, size: int) -> Tensor:
    """``images (B, C, h, w)`` in [-1, 1] -> bicubic ``(B, C, size, size)`` clamped to [-1, 1] (the baseline)."""
    return F.interpolate(images.float(), size=(size, size), mode="bicubic", align_corners=False).clamp(-1.0, 1.0)


def object_matte(images: Tensor) -> Tensor:
    """``(B, 3, H, W)`` in [-1, 1] -> ``(B, H, W)`` matte in [0, 1]: each pixel's projection onto the line from the
    background colour (median of the border) to the object colour (median of the pixels farthest from it)."""
    x = images.float()
    b, _, h, w = x.shape
    border = torch.cat([x[:, :, 0], x[:, :, -1], x[:, :, :, 0], x[:, :, :, -1]], dim=2)  # (B, 3, 4S)
    bg = border.median(dim=2).values  # (B, 3)
    diff = x - bg[:, :, None, None]
    dist = diff.norm(dim=1).flatten(1)  # (B, HW)
    far = dist >= 0.9 * dist.max(dim=1, keepdim=True).values.clamp(min=1e-6)
    flat = x.flatten(2)  # (B, 3, HW)
    fg = torch.stack([flat[i][:, far[i]].median(dim=1).values for i in range(b)])  # (B, 3)
    line = fg - bg
    den = (line**2).sum(1).clamp(min=1e-6)
    alpha = (diff * line[:, :, None, None]).sum(1) / den[:, None, None]
    return alpha.clamp(0.0, 1.0)


def edge_width(images: Tensor, *, band: float | None = None) -> Tensor:
    """Per-image 10-90 % edge width in pixels ``(B,)`` of built-in pictures ``(B, 3, H, W)`` in [-1, 1].

    ``band``: half-width in pixels of the zone around the 0.5 contour where blend pixels and edge length are
    counted (default ``H / 16``: 16 px at 256 px, wide enough for a bicubic x4 edge).  An image without an edge
    (a flat picture) gives NaN.
    """
    alpha = object_matte(images)
    b, h, w = alpha.shape
    r = max(2, round(h / 16)) if band is None else max(1, round(band))
    mask = (alpha > 0.5).float()[:, None]
    contour = (F.max_pool2d(mask, 3, 1, 1) - (-F.max_pool2d(-mask, 3, 1, 1))).clamp(0, 1)  # pixels at the 0.5 edge
    zone = F.max_pool2d(contour, 2 * r + 1, 1, r)[:, 0] > 0
    gy = torch.zeros_like(alpha)
    gx = torch.zeros_like(alpha)
    gy[:, 1:-1] = (alpha[:, 2:] - alpha[:, :-2]) / 2
    gx[:, :, 1:-1] = (alpha[:, :, 2:] - alpha[:, :, :-2]) / 2
    length = ((gx**2 + gy**2).sqrt() * zone).flatten(1).sum(1)
    blend = (((alpha > 0.1) & (alpha < 0.9)) & zone).flatten(1).sum(1).float()
    return torch.where(length > 0.5, blend / length.clamp(min=1e-6), torch.full_like(length, float("nan")))


def compare_upsampling(
    real: Tensor,
    candidates: Mapping[str, Tensor],
    attributes: Sequence[dict[str, str]],
    *,
    strict: bool = True,
) -> dict[str, dict[str, float]]:
    """Score ``candidates`` (name -> ``(N, 3, H, W)`` in [-1, 1]) against the real images ``real`` (same shape).

    Returns ``{"real": {...}, name: {...}}``, each with ``psnr`` (dB vs ``real``; inf for ``real`` itself left out),
    ``edge_width`` (mean px), ``edge_width_ratio`` (to the real images'), the lenient ``accuracy/all`` and, with
    ``strict``, the strict checker's ``strict/*`` (:func:`dalle2.data.synthetic.check_images`)."""
    real_width = edge_width(real)
    out: dict[str, dict[str, float]] = {}
    for name, images in {"real": real, **candidates}.items():
        if images.shape != real.shape:
            raise ValueError(f"{name}: images {tuple(images.shape)} do not match the real ones {tuple(real.shape)}")
        uint8 = to_uint8(images.float().cpu(), (-1.0, 1.0))  # scored as the files a user would get
        width = edge_width(uint8.float().div(127.5).sub(1.0).permute(0, 3, 1, 2))
        row = {"edge_width": float(np.nanmean(width.numpy()))}
        row["edge_width_ratio"] = row["edge_width"] / float(np.nanmean(real_width.numpy()))
        if name != "real":
            row["psnr"] = float(psnr(images, real).mean())
        row.update(check_images(uint8.numpy(), list(attributes), strict=strict))
        out[name] = row
    return out
