"""BSR-style degradation of a high-res image into a low-res conditioning image (Zhang et al. 2021, "Designing a
Practical Degradation Model for Deep Blind Image Super-Resolution"; DALL-E 2's 256 -> 1024 upsampler, Karlo's).

:func:`bsr_degrade` takes ``(B, C, H, W)`` images in [-1, 1] to ``(B, C, H/scale, W/scale)``: per sample, a random
anisotropic Gaussian blur at high resolution, a downsampling by ``scale`` with a random filter (area, bilinear or
bicubic, antialiased), then in a random order a second (isotropic) blur, Gaussian noise (colour or grey) and a JPEG
round trip at a random quality.  Each step happens with its own probability; every draw comes from ``generator``
(one, or one per group of rows as in :func:`dalle2.diffusion.samplers.randn`), so a seed fixes the degradation.
Pure torch, except the JPEG round trip (PIL, on the CPU).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from .samplers import Generators, rand, randn

__all__ = ["BSRConfig", "anisotropic_gaussian_kernels", "bsr_degrade", "jpeg_roundtrip"]

_DOWN_MODES = ("area", "bilinear", "bicubic")


@dataclass(frozen=True)
class BSRConfig:
    """Probabilities and ranges of each step (sigmas in pixels of the image they blur; noise std in [0, 255] levels)."""

    blur_prob: float = 0.8
    blur_sigma: tuple[float, float] = (0.2, 2.0)  # high-res blur, scaled by scale / 4
    blur2_prob: float = 0.5
    blur2_sigma: tuple[float, float] = (0.2, 1.0)  # low-res blur
    noise_prob: float = 0.8
    noise_std: tuple[float, float] = (1.0, 25.0)
    gray_noise_prob: float = 0.4
    jpeg_prob: float = 0.8
    jpeg_quality: tuple[int, int] = (30, 95)


def anisotropic_gaussian_kernels(sig_x: Tensor, sig_y: Tensor, theta: Tensor, radius: int) -> Tensor:
    """``(B, 2r+1, 2r+1)`` normalised Gaussian kernels with std ``sig_x`` / ``sig_y`` along axes rotated by ``theta``."""
    k = torch.arange(-radius, radius + 1, dtype=torch.float32, device=sig_x.device)
    y, x = torch.meshgrid(k, k, indexing="ij")
    c, s = theta.cos()[:, None, None], theta.sin()[:, None, None]
    u, v = c * x + s * y, -s * x + c * y
    w = torch.exp(-0.5 * (u**2 / sig_x[:, None, None] ** 2 + v**2 / sig_y[:, None, None] ** 2))
    return w / w.sum(dim=(1, 2), keepdim=True)


def _blur(x: Tensor, kernels: Tensor) -> Tensor:
    """Per-sample 2-D convolution of ``x (B, C, H, W)`` with ``kernels (B, k, k)`` (reflect padding)."""
    b, c, h, w = x.shape
    r = kernels.shape[-1] // 2
    mode = "reflect" if r < min(h, w) else "replicate"
    y = F.pad(x.float().reshape(1, b * c, h, w), (r, r, r, r), mode=mode)
    weight = kernels.repeat_interleave(c, dim=0)[:, None]
    return F.conv2d(y, weight, groups=b * c).reshape(b, c, h, w)


def jpeg_roundtrip(x: Tensor, quality: Tensor) -> Tensor:
    """Encode and decode each image of ``x (B, 3, H, W)`` in [-1, 1] as a JPEG of its ``quality (B,)`` (PIL)."""
    out = []
    arr = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for img, q in zip(arr, quality.tolist()):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=int(q))
        with Image.open(io.BytesIO(buf.getvalue())) as dec:
            out.append(np.asarray(dec.convert("RGB"), dtype=np.uint8).copy())
    y = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    return y.to(device=x.device, dtype=x.dtype)


def _where(mask: Tensor, a: Tensor, b: Tensor) -> Tensor:
    return torch.where(mask.reshape(-1, *([1] * (a.ndim - 1))), a, b)


def bsr_degrade(images: Tensor, scale: int, *, config: BSRConfig | None = None, generator: Generators = None) -> Tensor:
    """``images (B, C, H, W)`` in [-1, 1] -> degraded ``(B, C, H / scale, W / scale)`` in [-1, 1] (module docstring)."""
    cfg = config or BSRConfig()
    b, c, h, w = images.shape
    if h % scale or w % scale:
        raise ValueError(f"image size {(h, w)} is not divisible by the scale {scale}")
    dev = images.device

    def u(n: int = 1) -> Tensor:  # (B, n) uniforms from the generator(s)
        return rand((b, n), generator=generator, device=dev)

    draws = u(16)
    x = images.float()
    # 1. anisotropic blur at high resolution
    lo_s, hi_s = (s * scale / 4 for s in cfg.blur_sigma)
    sx = lo_s + (hi_s - lo_s) * draws[:, 0]
    sy = lo_s + (hi_s - lo_s) * draws[:, 1]
    kernels = anisotropic_gaussian_kernels(sx, sy, math.pi * draws[:, 2], max(1, math.ceil(3 * hi_s)))
    x = _where(draws[:, 3] < cfg.blur_prob, _blur(x, kernels), x)
    # 2. downsample with a random filter
    size = (h // scale, w // scale)
    kinds = (draws[:, 4] * len(_DOWN_MODES)).long().clamp(max=len(_DOWN_MODES) - 1)
    lo = torch.zeros(b, c, *size, device=dev)
    for i, mode in enumerate(_DOWN_MODES):
        pick = kinds == i
        if pick.any():
            kw = {} if mode == "area" else {"antialias": True, "align_corners": False}
            lo[pick] = F.interpolate(x[pick], size=size, mode=mode, **kw)
    x = lo
    # 3. blur2, noise, JPEG in a random order (a random permutation per sample, applied step by step)
    order = torch.argsort(u(3), dim=1)  # (B, 3): order[:, j] = which step goes j-th
    s2 = cfg.blur2_sigma[0] + (cfg.blur2_sigma[1] - cfg.blur2_sigma[0]) * draws[:, 5]
    blur2 = anisotropic_gaussian_kernels(s2, s2, torch.zeros_like(s2), max(1, math.ceil(3 * cfg.blur2_sigma[1])))
    std = (cfg.noise_std[0] + (cfg.noise_std[1] - cfg.noise_std[0]) * draws[:, 6]) / 127.5
    colour = randn((b, c, *size), generator=generator, device=dev)
    grey = randn((b, 1, *size), generator=generator, device=dev).expand(b, c, *size)
    noise = _where(draws[:, 7] < cfg.gray_noise_prob, grey, colour) * std[:, None, None, None]
    q_lo, q_hi = cfg.jpeg_quality
    quality = (q_lo + (q_hi - q_lo + 1) * draws[:, 8]).floor().clamp(q_lo, q_hi).long()
    steps = {
        0: (draws[:, 9] < cfg.blur2_prob, lambda t: _blur(t, blur2)),
        1: (draws[:, 10] < cfg.noise_prob, lambda t: t + noise),
        2: (draws[:, 11] < cfg.jpeg_prob, lambda t: jpeg_roundtrip(t.clamp(-1, 1), quality)),
    }
    for j in range(3):
        for step, (on, fn) in steps.items():
            rows = on & (order[:, j] == step)
            if rows.any():
                x = _where(rows, fn(x), x)
    return x.clamp(-1.0, 1.0).to(images.dtype)
