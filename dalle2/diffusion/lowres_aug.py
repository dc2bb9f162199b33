"""Conditioning augmentation of the low-resolution image for the upsamplers (DALL-E 2 sec. 2.2, Imagen).

- :func:`gaussian_blur`: separable Gaussian blur with a per-sample sigma (no torchvision).
- :class:`LowResAugmentation`: a degradation (training only) then Gaussian noise from a *separate* augmentation
  schedule.  ``aug.degrade(hi, scale, downsample)`` is the training view of a high-res image's low-res copy: the
  ``downsample`` of it with a random Gaussian blur (``degradation="blur"``, DALL-E 2's 64 -> 256 upsampler), or a
  BSR-style degradation (``degradation="bsr"``, its 256 -> 1024 one; :mod:`dalle2.diffusion.bsr`).
  ``aug.add_noise(lo, train=...) -> (x_aug, aug_level)``; the upsampler is conditioned on ``aug_level`` (``(B,)``
  int64 in ``[0, num_levels]``): level 0 is the clean image, level ``k >= 1`` noises with ``alpha_bar[k - 1]`` of the
  augmentation schedule.  Training draws levels uniformly in ``[0, max_train_level]``; sampling uses the fixed
  small ``level`` given to the call.  ``aug(lo, train=...)`` is blur (training only) then noise on a low-res image.

``generator`` is one ``torch.Generator``, or a sequence of them, one per group of consecutive rows (per-sample
noise streams, as in :func:`dalle2.diffusion.samplers.randn`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .bsr import BSRConfig, bsr_degrade
from .samplers import Generators, _per_row_draw, rand, randn
from .schedules import Schedule

__all__ = ["gaussian_blur", "LowResAugmentation"]


def _uniform(n: int, lo: float, hi: float, *, generator: Generators, device) -> Tensor:
    return rand((n,), generator=generator, device=device) * (hi - lo) + lo


def _randint(high: int, n: int, *, generator: Generators, device) -> Tensor:
    def draw(shape, *, generator, device, dtype):
        return torch.randint(0, high, shape, generator=generator, device=device, dtype=dtype)

    return _per_row_draw(draw, (n,), generator, device, torch.int64)


def gaussian_blur(x: Tensor, sigma: float | Tensor) -> Tensor:
    """Blur ``x: (B, C, H, W)`` with a Gaussian of std ``sigma`` pixels (float, or ``(B,)`` per sample).

    Kernel radius ``ceil(3 max sigma)``, reflect padding, normalised kernels (so a constant image is unchanged);
    sigma = 0 is the identity.  Computed in float32, returned in ``x``'s dtype.
    """
    if x.ndim != 4:
        raise ValueError(f"gaussian_blur expects (B, C, H, W), got {tuple(x.shape)}")
    B, C, H, W = x.shape
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(B)
    if bool((sigma < 0).any()):
        raise ValueError("gaussian_blur: sigma must be >= 0")
    s_max = float(sigma.max())
    if s_max <= 0.0:
        return x
    r = max(1, math.ceil(3.0 * s_max))
    k = torch.arange(-r, r + 1, device=x.device, dtype=torch.float32)
    w = torch.exp(-(k[None] ** 2) / (2.0 * sigma[:, None].clamp(min=1e-6) ** 2))
    w = (w / w.sum(dim=1, keepdim=True)).repeat_interleave(C, dim=0)  # (B*C, 2r+1)
    mode = "reflect" if r < min(H, W) else "replicate"
    y = x.float().reshape(1, B * C, H, W)
    y = F.conv2d(F.pad(y, (r, r, 0, 0), mode=mode), w[:, None, None, :], groups=B * C)
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode=mode), w[:, None, :, None], groups=B * C)
    return y.reshape(B, C, H, W).to(x.dtype)


class LowResAugmentation:
    """Degradation + noise augmentation of the low-res conditioning image.

    Args (keyword-only):
        schedule: the augmentation noise schedule (default: linear, 1000 steps), separate from the upsampler's.
        max_train_level: training levels are uniform in ``[0, max_train_level]`` (default: half the schedule).
        blur_sigma: ``(lo, hi)`` range of the training blur std in pixels; ``blur_prob``: chance per sample.
        degradation: ``blur`` (the blur above, on the low-res copy) or ``bsr`` (:func:`~dalle2.diffusion.bsr.
            bsr_degrade` of the high-res image, with ``bsr``: a dict of :class:`~dalle2.diffusion.bsr.BSRConfig`).
    """

    def __init__(
        self,
        *,
        schedule: Schedule | None = None,
        max_train_level: int | None = None,
        blur_sigma: Sequence[float] = (0.4, 0.6),
        blur_prob: float = 0.5,
        degradation: str = "blur",
        bsr: dict | None = None,
    ):
        self.schedule = schedule if schedule is not None else Schedule.make("linear", 1000)
        self.num_levels = self.schedule.num_timesteps
        self.max_train_level = self.num_levels // 2 if max_train_level is None else int(max_train_level)
        if not 0 <= self.max_train_level <= self.num_levels:
            raise ValueError(f"max_train_level must be in [0, {self.num_levels}], got {max_train_level}")
        self.blur_sigma = (float(blur_sigma[0]), float(blur_sigma[1]))
        self.blur_prob = float(blur_prob)
        if degradation not in ("blur", "bsr"):
            raise ValueError(f"unknown degradation {degradation!r}; expected 'blur' or 'bsr'")
        self.degradation = degradation
        bsr = dict(bsr or {})
        self.bsr = BSRConfig(**{k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in bsr.items()})
        # alpha_bar per level: level 0 -> 1 (clean)
        self.alphas_cumprod = torch.cat([torch.ones(1, dtype=torch.float64), self.schedule.alphas_cumprod])

    def noise(self, x: Tensor, level: Tensor, *, generator: Generators = None) -> Tensor:
        """``sqrt(abar) x + sqrt(1 - abar) eps`` at augmentation ``level (B,)`` (level 0: x unchanged)."""
        abar = self.alphas_cumprod.to(x.device)[level.long()].to(torch.float32)
        abar = abar.reshape(-1, *([1] * (x.ndim - 1)))
        eps = randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
        out = abar.sqrt() * x.float() + (1.0 - abar).sqrt() * eps
        return torch.where(level.reshape(abar.shape) == 0, x.float(), out).to(x.dtype)

    def blur(self, x: Tensor, *, generator: Generators = None) -> Tensor:
        """The random training blur of a low-res image ``x (B, C, h, w)`` (prob ``blur_prob``, std in ``blur_sigma``)."""
        if self.blur_prob <= 0:
            return x
        B = x.shape[0]
        sig = _uniform(B, *self.blur_sigma, generator=generator, device=x.device)
        keep = _uniform(B, 0.0, 1.0, generator=generator, device=x.device) < self.blur_prob
        return gaussian_blur(x, torch.where(keep, sig, torch.zeros_like(sig)))

    def degrade(
        self, hi: Tensor, scale: int, downsample: Callable[[Tensor], Tensor], *, generator: Generators = None
    ) -> Tensor:
        """The training view of the low-res copy of ``hi (B, C, H, W)``: ``blur(downsample(hi))`` (``blur``) or
        ``bsr_degrade(hi, scale)`` (``bsr``).  No noise: :meth:`add_noise` adds it (the residual base of an upsampler
        is the bicubic upsampling of this image, as it is of the given low-res image when sampling)."""
        if self.degradation == "bsr":
            return bsr_degrade(hi, scale, config=self.bsr, generator=generator)
        return self.blur(downsample(hi), generator=generator)

    def add_noise(
        self, x: Tensor, *, train: bool, level: int = 0, generator: Generators = None
    ) -> tuple[Tensor, Tensor]:
        """``x: (B, C, h, w)`` -> ``(noised, aug_level (B,) int64)``: random levels in ``[0, max_train_level]`` when
        ``train``, else ``level`` for every row."""
        B = x.shape[0]
        if train:
            lv = _randint(self.max_train_level + 1, B, generator=generator, device=x.device)
        else:
            if not 0 <= int(level) <= self.num_levels:
                raise ValueError(f"aug level must be in [0, {self.num_levels}], got {level}")
            lv = torch.full((B,), int(level), dtype=torch.int64, device=x.device)
        return self.noise(x, lv, generator=generator), lv

    def __call__(
        self,
        x: Tensor,
        *,
        train: bool,
        level: int = 0,
        generator: Generators = None,
    ) -> tuple[Tensor, Tensor]:
        """``x: (B, C, H, W)`` (already upsampled or not; any size) -> ``(augmented, aug_level (B,) int64)``.

        ``train=True``: random blur (prob ``blur_prob``) and random levels; ``train=False``: no blur, ``level``.
        """
        if train:
            x = self.blur(x, generator=generator)
        return self.add_noise(x, train=train, level=level, generator=generator)
