"""The one place a decoder / upsampler network dict becomes a module: ``{"arch": "karlo", ...}`` builds Karlo's
decoder, ``{"arch": "karlo_sr", ...}`` its super-resolution pair, anything else (no ``arch``) our
:class:`~dalle2.decoder.unet.UNet` — for the stages (``dalle2.decoder.stage``) and the LightningModules alike."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from dalle2.decoder.karlo import KarloDecoderUNet, KarloSuperRes
from dalle2.decoder.unet import UNet

__all__ = ["build_unet"]

_ARCHS = {"karlo": KarloDecoderUNet, "karlo_sr": KarloSuperRes}


def build_unet(network: Mapping[str, Any]) -> nn.Module:
    kwargs = dict(network)
    arch = kwargs.get("arch")
    if arch is None:
        return UNet(**kwargs)
    if arch not in _ARCHS:
        raise ValueError(f"unknown decoder network arch {arch!r}; expected one of {sorted(_ARCHS)} (or none: our UNet)")
    if arch == "karlo_sr" and kwargs.pop("grad_checkpointing", False):
        for part in ("first", "last"):
            kwargs[part] = {**kwargs[part], "grad_checkpointing": True}
    return _ARCHS[arch](**kwargs)
