"""The one place a decoder / upsampler network dict becomes a module: ``{"arch": "karlo", ...}`` builds Karlo's
decoder, ``{"arch": "karlo_sr", ...}`` its super-resolution pair, anything else (no ``arch``) our
:class:`~dalle2.decoder.unet.UNet`; ``regression_mean: {...}`` in an SR network's dict wraps it with a deterministic
estimate it refines (:class:`~dalle2.decoder.sr_mean.MeanResidualSR`) — for the stages (``dalle2.decoder.stage``) and the LightningModules alike."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from dalle2.decoder.karlo import KarloDecoderUNet, KarloSuperRes
from dalle2.decoder.sr_mean import MeanResidualSR, RegressionMean
from dalle2.decoder.unet import UNet

__all__ = ["build_unet"]

_ARCHS = {"karlo": KarloDecoderUNet, "karlo_sr": KarloSuperRes}


def build_unet(network: Mapping[str, Any]) -> nn.Module:
    kwargs = dict(network)
    mean = kwargs.pop("regression_mean", None)
    if mean is not None:  # an SR UNet over a regression mean (dalle2.decoder.sr_mean)
        if not kwargs.get("lowres_cond", False):
            raise ValueError("regression_mean is for super-resolution networks (lowres_cond: true)")
        return MeanResidualSR(build_unet(kwargs), RegressionMean(in_channels=kwargs.get("in_channels", 3), **mean))
    arch = kwargs.get("arch")
    if arch is None:
        return UNet(**kwargs)
    if arch not in _ARCHS:
        raise ValueError(f"unknown decoder network arch {arch!r}; expected one of {sorted(_ARCHS)} (or none: our UNet)")
    if arch == "karlo_sr" and kwargs.pop("grad_checkpointing", False):
        for part in ("first", "last"):
            kwargs[part] = {**kwargs[part], "grad_checkpointing": True}
    return _ARCHS[arch](**kwargs)
