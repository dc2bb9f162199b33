"""A regression mean under the super-resolution diffusion: ``network.regression_mean`` in an upsampler's config.

Why (docs/decoder.md "The cascade"): on these pictures — flat shapes with exact edges — the high-res image is
almost a function of the low-res one, and the diffusion UNet alone learns that function slowly: its estimate
of the clean image from a very noisy one stayed at bicubic's blur (the x0 probe at t > 500, 800 CPU steps), so
every sample started from a blur the few last steps could not undo.  A small convolutional regressor trained with
plain MSE learns the sharp edges in a few hundred steps.  So the SR stage is split as in residual corrective
diffusion (Mardani et al. 2023, "CorrDiff"): ``mean(low-res)`` is a deterministic estimate (bicubic plus a
sub-pixel convolution, Shi et al. 2016), trained with MSE; the diffusion UNet models what is left,
``image - mean(low-res)`` (times ``residual_gain``), and the sample is ``mean + residual``.

:class:`MeanResidualSR` holds both networks; its ``forward`` is the UNet's (the diffusion sees no difference) and
:meth:`MeanResidualSR.regression_mean` is the estimate.  Built by :func:`dalle2.decoder.networks.build_unet` when
the network dict has ``regression_mean: {scale, channels, layers, gain}``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from dalle2.decoder.sampling import residual_base

__all__ = ["RegressionMean", "MeanResidualSR"]


class RegressionMean(nn.Module):
    """``low-res (B, C, h, w) -> bicubic(low-res) + pixel_shuffle(convs(low-res)) / gain`` at ``scale`` x the size.

    Plain convolutions on the low-res grid (no normalisation: it sees crops when training and whole pictures when
    sampling, and a statistic over the picture would differ between the two), the last one zero-initialised so an
    untrained estimate is bicubic.  ``gain`` scales the residual the convolutions predict (the residual of these
    pictures over bicubic is a thin line of edge pixels, RMS ~0.03: predicted x 32 it is of unit scale).
    """

    def __init__(self, *, scale: int, channels: int = 64, layers: int = 4, in_channels: int = 3, gain: float = 1.0):
        super().__init__()
        if scale < 1 or layers < 2 or channels < 1 or gain <= 0:
            raise ValueError(
                f"regression_mean needs scale >= 1, layers >= 2, channels >= 1, gain > 0; got scale={scale}, "
                f"layers={layers}, channels={channels}, gain={gain}"
            )
        self.scale, self.gain = int(scale), float(gain)
        mods: list[nn.Module] = [nn.Conv2d(in_channels, channels, 5, padding=2)]
        for _ in range(layers - 2):
            mods += [nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1)]
        last = nn.Conv2d(channels, in_channels * self.scale**2, 3, padding=1)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.body = nn.Sequential(*mods, nn.SiLU(), last)

    def residual(self, lowres: Tensor) -> Tensor:
        """The predicted ``(image - bicubic(low-res)) * gain``, ``(B, C, h * scale, w * scale)``."""
        return F.pixel_shuffle(self.body(lowres), self.scale)

    def forward(self, lowres: Tensor) -> Tensor:
        return residual_base(lowres, self.scale, residual=True) + self.residual(lowres).float() / self.gain


class MeanResidualSR(nn.Module):
    """An SR UNet (``forward``: the diffusion's network) with a :class:`RegressionMean` (``regression_mean``)."""

    def __init__(self, unet: nn.Module, mean: RegressionMean):
        super().__init__()
        self.unet, self.mean = unet, mean

    def forward(self, *args, **kwargs):
        return self.unet(*args, **kwargs)

    def regression_mean(self, lowres: Tensor) -> Tensor:
        """The deterministic high-res estimate of ``lowres`` in [-1, 1] (not clamped)."""
        return self.mean(lowres)

    def mean_residual(self, lowres: Tensor) -> Tensor:
        """``RegressionMean.residual``: what its MSE loss is taken on."""
        return self.mean.residual(lowres)
