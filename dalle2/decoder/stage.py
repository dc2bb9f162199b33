"""The decoder and the upsamplers as sampling needs them: the network (the EMA weights), its diffusion and the
stage's sizes and options, built from the hyperparameters their checkpoints store — with the same builders the
LightningModules (``dalle2.lit.decoder_module``) use — and sampled with :mod:`dalle2.decoder.sampling`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from dalle2.decoder.networks import build_unet
from dalle2.decoder.sampling import DownsampleMode, Threshold, downsample, sample_decoder, sample_upsampler
from dalle2.diffusion import GaussianDiffusion, LowResAugmentation, Schedule, build_diffusion
from dalle2.diffusion.samplers import Generators

__all__ = ["DecoderStage", "UpsamplerStage", "decoder_diffusion_config", "lowres_augmentation"]


def decoder_diffusion_config(diffusion: Mapping[str, Any] | None, network: Mapping[str, Any]) -> dict[str, Any]:
    """The diffusion dict with ``learned_variance`` taken from the network (an explicit mismatch is an error)."""
    cfg = dict(diffusion or {})
    lv = bool(network.get("learned_variance", False))
    if "learned_variance" in cfg and bool(cfg["learned_variance"]) != lv:
        raise ValueError(
            f"diffusion.learned_variance={cfg['learned_variance']} but the network has learned_variance={lv}"
        )
    cfg["learned_variance"] = lv
    return cfg


def lowres_augmentation(config: Mapping[str, Any] | None) -> LowResAugmentation:
    """``{"blur_sigma": [lo, hi], "blur_prob": p, "max_train_level": k, "schedule": "linear", "num_levels": 1000}``
    -> the upsampler's :class:`~dalle2.diffusion.LowResAugmentation`."""
    aug = dict(config or {})
    schedule = Schedule.make(aug.pop("schedule", "linear"), int(aug.pop("num_levels", 1000)))
    return LowResAugmentation(schedule=schedule, **aug)


class DecoderStage(nn.Module):
    """A base decoder: CLIP image embedding (+ text) -> ``image_size`` px images (:meth:`sample`)."""

    def __init__(
        self, *, net: nn.Module, diffusion: GaussianDiffusion, image_size: int, use_text: bool = False, vocabulary=None
    ) -> None:
        super().__init__()
        self.net, self.diffusion = net, diffusion
        self.image_size, self.use_text, self.vocabulary = int(image_size), bool(use_text), vocabulary
        self.clip_dim = int(net.clip_dim)
        self.text_dim = None if getattr(net, "text_dim", None) is None else int(net.text_dim)

    @classmethod
    def from_hparams(cls, hparams: Mapping[str, Any], *, vocabulary=None) -> DecoderStage:
        """From a decoder checkpoint's hyperparameters (``network``, ``diffusion``, ``image_size``, ``use_text``)."""
        net = dict(hparams["network"])
        return cls(
            net=build_unet(net),
            diffusion=build_diffusion(decoder_diffusion_config(hparams.get("diffusion"), net)),
            image_size=int(hparams["image_size"]),
            use_text=bool(hparams.get("use_text", False)),
            vocabulary=vocabulary,
        )

    @torch.no_grad()
    def sample(
        self,
        image_embed: Tensor,
        *,
        steps: int = 50,
        sampler: str = "ddim",
        guidance_scale: float = 1.0,
        eta: float = 0.0,
        generator: Generators = None,
        text_tokens: Tensor | None = None,
        text_mask: Tensor | None = None,
        text_embed: Tensor | None = None,
        threshold: Threshold = "static",
        dynamic_percentile: float = 0.995,
        image_size: int | None = None,
        x_T: Tensor | None = None,
    ) -> Tensor:
        """Images ``(B, 3, S, S)`` in [-1, 1] for CLIP image embeddings ``(B, D)`` (:func:`sample_decoder`);
        ``text_embed`` (the pooled CLIP text embedding) reaches networks that take it (Karlo's)."""
        return sample_decoder(
            self.net,
            self.diffusion,
            image_embed,
            image_size=int(image_size or self.image_size),
            use_text=self.use_text,
            text_tokens=text_tokens,
            text_mask=text_mask,
            text_embed=text_embed if getattr(self.net, "text_embed_dim", None) is not None else None,
            normalize_embed=not getattr(self.net, "raw_image_embed", False),
            steps=steps,
            sampler=sampler,
            guidance_scale=guidance_scale,
            eta=eta,
            generator=generator,
            threshold=threshold,
            dynamic_percentile=dynamic_percentile,
            x_T=x_T,
        )


class UpsamplerStage(nn.Module):
    """A super-resolution stage: ``lowres_size`` -> ``image_size`` px images (:meth:`upsample`)."""

    def __init__(
        self,
        *,
        net: nn.Module,
        diffusion: GaussianDiffusion,
        lowres_size: int,
        image_size: int,
        lowres_aug: LowResAugmentation,
        sample_aug_level: int = 0,
        residual: bool = False,
        residual_gain: float = 1.0,
        sample_spacing: str = "leading",
        downsample_mode: DownsampleMode = "area",
        sample_start_t: int | None = None,
    ) -> None:
        super().__init__()
        if image_size % lowres_size:
            raise ValueError(f"image_size {image_size} must be a multiple of lowres_size {lowres_size}")
        if not 0 <= sample_aug_level <= lowres_aug.num_levels:
            raise ValueError(f"sample_aug_level must be in [0, {lowres_aug.num_levels}], got {sample_aug_level}")
        self.net, self.diffusion, self.lowres_aug = net, diffusion, lowres_aug
        self.lowres_size, self.image_size = int(lowres_size), int(image_size)
        self.scale = self.image_size // self.lowres_size
        self.sample_aug_level, self.residual = int(sample_aug_level), bool(residual)
        self.residual_gain = float(residual_gain)
        self.sample_spacing, self.downsample_mode = sample_spacing, downsample_mode
        self.sample_start_t = None if sample_start_t is None else int(sample_start_t)

    @classmethod
    def from_hparams(cls, hparams: Mapping[str, Any]) -> UpsamplerStage:
        """From an upsampler checkpoint's hyperparameters."""
        net = dict(hparams["network"])
        return cls(
            net=build_unet(net),
            diffusion=build_diffusion(decoder_diffusion_config(hparams.get("diffusion"), net)),
            lowres_size=int(hparams.get("lowres_size", 64)),
            image_size=int(hparams.get("image_size", 256)),
            lowres_aug=lowres_augmentation(hparams.get("lowres_aug")),
            sample_aug_level=int(hparams.get("sample_aug_level", 0)),
            residual=bool(hparams.get("residual", False)),
            residual_gain=float(hparams.get("residual_gain", 1.0)),
            sample_spacing=hparams.get("sample_spacing", "leading"),
            downsample_mode=hparams.get("downsample_mode", "area"),
            sample_start_t=hparams.get("sample_start_t"),
        )

    def lowres(self, images: Tensor) -> Tensor:
        """High-res images ``(B, C, H, W)`` -> their clean low-res copies ``(B, C, H/scale, W/scale)``."""
        return downsample(images, images.shape[-1] // self.scale, mode=self.downsample_mode)

    @torch.no_grad()
    def upsample(
        self,
        lowres_images: Tensor,
        *,
        steps: int = 50,
        sampler: str = "ddim",
        generator: Generators = None,
        aug_level: int | None = None,
        eta: float = 0.0,
        threshold: Threshold = "static",
        dynamic_percentile: float = 0.995,
        x_T: Tensor | None = None,
        spacing: str | None = None,
        start_t: int | None = None,
    ) -> Tensor:
        """``(B, C, h, w)`` in [-1, 1] -> ``(B, C, h * scale, w * scale)`` in [-1, 1] (:func:`sample_upsampler`;
        ``start_t`` None: the stage's ``sample_start_t``, -1: the whole chain)."""
        start_t = self.sample_start_t if start_t is None else start_t
        return sample_upsampler(
            self.net,
            self.diffusion,
            lowres_images,
            scale=self.scale,
            lowres_aug=self.lowres_aug,
            aug_level=self.sample_aug_level if aug_level is None else int(aug_level),
            residual=self.residual,
            residual_gain=self.residual_gain,
            steps=steps,
            sampler=sampler,
            eta=eta,
            generator=generator,
            threshold=threshold,
            dynamic_percentile=dynamic_percentile,
            spacing=spacing or self.sample_spacing,
            x_T=x_T,
            start_t=None if start_t is None or start_t < 0 else start_t,
        )
