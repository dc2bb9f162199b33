"""The cascaded decoder's LightningModules: the base decoder (CLIP image embedding -> image) and the upsamplers
(low-res image -> high-res image).  Thin: the network is :class:`dalle2.decoder.UNet`, the maths is
:mod:`dalle2.diffusion`; EMA, optimisers, quartile logging and the stage tag come from
:class:`~dalle2.lit.diffusion_base.DiffusionStageModule`.

Conventions (both modules):
- batches are ``WebDataModule`` dicts: ``image`` (B, 3, S, S) in [-1, 1], ``tokens`` (B, 77); with precomputed
  embeddings also ``img_emb`` (B, D), ``txt_tokens`` (B, L, Dt).
- validation (``val/loss``) and sampling use the EMA network; the EMA weights are in the checkpoint.
- ``diffusion`` is the plain dict of ``build_diffusion``; its ``learned_variance`` follows the network's.
- ``channels_last`` puts the networks and the inputs in channels-last memory format (faster convs on GPU).

CLIP image embeddings are **L2-normalised** before they reach the UNet, both when training and when sampling
(``sample`` normalises whatever it is given), so a precomputed ``img_emb`` and an on-the-fly one, or a prior's
output of another scale, all condition the decoder the same way.

The frozen CLIP used to embed images on the fly (when a batch has no ``img_emb`` and ``clip_ckpt`` is given) is
NOT a registered submodule: it is loaded lazily (in ``setup`` or at first use), never trained, never in the
state_dict or checkpoint (the checkpoint only keeps the ``clip_ckpt`` path as a hyperparameter).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from dalle2.clip.model import text_mask
from dalle2.decoder.networks import build_unet
from dalle2.decoder.sampling import (
    Threshold,
    decoder_conditioning,
    downsample,
    psnr,
    residual_base,
    upsampler_base,
)
from dalle2.decoder.stage import DecoderStage, UpsamplerStage, decoder_diffusion_config, lowres_augmentation
from dalle2.lit.diffusion_base import DiffusionStageModule, FrozenClipMixin
from dalle2.seeding import mix_seed

__all__ = ["DecoderModule", "UpsamplerModule", "psnr", "downsample"]


def add_losses(losses: dict[str, Tensor], extra: dict[str, Tensor]) -> dict[str, Tensor]:
    """The diffusion's ``losses`` plus a stage's own: ``loss`` becomes their sum, ``loss/diffusion`` keeps the
    diffusion's part, each extra one is logged under its name (detached)."""
    out = {**losses, "loss/diffusion": losses["loss"].detach()}
    out.update({k: v.detach() for k, v in extra.items()})
    out["loss"] = losses["loss"] + sum(extra.values())
    return out


class _CascadeStageModule(DiffusionStageModule):
    """What the decoder and the upsamplers share: the UNet, its EMA, channels-last, the EMA validation loss."""

    def _build_net(self, network: dict, *, channels_last: bool, grad_checkpointing: bool) -> None:
        kwargs = dict(network)
        if grad_checkpointing:
            kwargs["grad_checkpointing"] = True
        self.net = build_unet(kwargs)
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self._channels_last = channels_last
        self._init_ema()

    def _image_input(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self._channels_last else x

    def _network(self, use_ema: bool) -> torch.nn.Module:
        return self.ema_net if use_ema else self.net

    def training_inputs(
        self, batch: dict, *, train: bool, generator: torch.Generator | None = None
    ) -> tuple[Tensor, dict]:
        """``(x0, model_kwargs)``: the diffusion target and the network's conditioning for ``batch`` (``train``: with
        the CFG drops / augmentation drawn from ``generator``). The training and validation steps, and
        ``bench/train_step.py``, are built on it."""
        return self._image_input(batch["image"]), self.model_kwargs(batch, train=train, generator=generator)

    def model_kwargs(self, batch: dict, *, train: bool, generator: torch.Generator | None = None) -> dict:
        raise NotImplementedError

    def inputs_and_losses(
        self, batch: dict, *, train: bool, generator: torch.Generator | None = None, use_ema: bool = False
    ) -> tuple[Tensor, dict, dict[str, Tensor]]:
        """:meth:`training_inputs` and the stage's losses besides the diffusion's (``{"loss/<name>": scalar}``, added
        to the loss; none here), computed with the EMA network when ``use_ema``."""
        x0, kwargs = self.training_inputs(batch, train=train, generator=generator)
        return x0, kwargs, {}

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        x0, kwargs, extra = self.inputs_and_losses(batch, train=True)
        losses, per_sample = self.diffusion.training_losses(self.net, x0, model_kwargs=kwargs, return_per_sample=True)
        if extra:
            losses = add_losses(losses, extra)
            per_sample["loss"] = per_sample["loss"] + sum(v.detach() for v in extra.values())
        # a non-finite loss is skipped and counted by dalle2.lit.fault_tolerance.NonFiniteGuard (callbacks.nonfinite)
        self.log_losses(losses, per_sample)
        return losses["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        # fixed noise/timesteps per batch so that val/loss is comparable between evaluations
        gen = torch.Generator(device=self.device).manual_seed(mix_seed(batch_idx, self.global_rank))
        x0, kwargs, extra = self.inputs_and_losses(batch, train=False, generator=gen, use_ema=True)
        losses = self.diffusion.training_losses(self.ema_net, x0, generator=gen, model_kwargs=kwargs)
        losses.update(extra)  # logged beside val/loss (the diffusion's, comparable across stages), not added to it
        self.log_val({f"val/{k}": v for k, v in losses.items()}, x0.shape[0])

    def preview(self, batch: dict, **kwargs: Any) -> dict:
        """Samples for the sample-grid callback: ``{"samples", "reference", "metrics", "captions"}``."""
        raise NotImplementedError


class DecoderModule(FrozenClipMixin, _CascadeStageModule):
    """Base decoder: ``p(image | CLIP image embedding [, text])``.

    Args (keyword-only):
        network: keyword dict of :class:`~dalle2.decoder.UNet` (dalle2/presets/model/decoder/*.yaml); ``clip_dim`` must be
            the CLIP's embedding size, ``text_dim`` its text width when ``use_text``.
        diffusion: dict for ``build_diffusion`` (schedule, num_timesteps, objective eps/v/x0, loss, weighting).
        clip_ckpt: CLIP weights used to embed ``image`` (and, with ``use_text``, ``tokens``) on the fly when the
            batch has no ``img_emb`` (``txt_tokens``); never saved in this module's checkpoint.
        image_embed_drop_prob / text_drop_prob: classifier-free guidance drop rates (DALL-E 2: 0.1 / 0.5).
        use_text: condition on the CLIP text-encoder token states (``txt_tokens``, mask ``tokens != 0``).
        image_size: the side of the images this decoder generates (``sample``'s default).
        sample_every_n_steps: default period of :class:`~dalle2.lit.sample_grid.SampleGrid` (None: its own).
        compile: ``torch.compile`` the UNet and its EMA copy (training and sampling; see ``configure_model``).
    """

    stage = "decoder"

    def __init__(
        self,
        *,
        network: dict,
        diffusion: dict | None = None,
        clip_ckpt: str | None = None,
        image_embed_drop_prob: float = 0.1,
        text_drop_prob: float = 0.5,
        use_text: bool = False,
        image_size: int = 64,
        ema_decay: float = 0.9999,
        ema_warmup: int = 10,
        ema_update_every: int = 1,
        channels_last: bool = False,
        grad_checkpointing: bool = False,
        sample_every_n_steps: int | None = None,
        compile: bool = False,
        optimizer: Callable | None = None,
        scheduler: Callable | None = None,
    ):
        super().__init__(
            diffusion=decoder_diffusion_config(diffusion, network),
            ema_decay=ema_decay,
            ema_warmup=ema_warmup,
            ema_update_every=ema_update_every,
            optimizer=optimizer,
            scheduler=scheduler,
            compile=compile,
        )
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        if network.get("clip_dim") is None:
            raise ValueError("the decoder network needs clip_dim (the CLIP embedding size)")
        if use_text and network.get("text_dim") is None:
            raise ValueError("use_text=True needs network.text_dim (the CLIP text width)")
        for name, p in (("image_embed_drop_prob", image_embed_drop_prob), ("text_drop_prob", text_drop_prob)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p}")
        self.image_embed_drop_prob, self.text_drop_prob = float(image_embed_drop_prob), float(text_drop_prob)
        self.use_text, self.image_size = bool(use_text), int(image_size)
        self._build_net(network, channels_last=channels_last, grad_checkpointing=grad_checkpointing)

    # -- conditioning -------------------------------------------------------------------------------------------
    def normalize_embed(self, image_embed: Tensor) -> Tensor:
        """Unit norm — or as given for a network trained on raw CLIP embeddings (Karlo's)."""
        if getattr(self.net, "raw_image_embed", False):
            return image_embed.float()
        return F.normalize(image_embed.float(), dim=-1)

    @torch.no_grad()
    def image_embeddings(self, batch: dict) -> Tensor:
        """Unit-norm CLIP image embeddings ``(B, D)``: ``img_emb`` when the batch has it, else the frozen CLIP."""
        if batch.get("img_emb") is not None:
            emb = batch["img_emb"]
        else:
            clip = self.clip
            if clip is None:
                raise ValueError(
                    "batch has no 'img_emb' and no clip_ckpt was given to embed images on the fly "
                    "(use data=embeddings shards or set clip_ckpt=...)"
                )
            emb = clip.encode_image(batch["image"])
        return self.normalize_embed(emb)

    @torch.no_grad()
    def text_conditioning(self, batch: dict) -> tuple[Tensor, Tensor]:
        """``(text_tokens (B, L, Dt) float32, text_mask (B, L) bool)`` from ``txt_tokens`` or the frozen CLIP."""
        tokens = batch["tokens"]
        if batch.get("txt_tokens") is not None:
            states = batch["txt_tokens"].float()
        else:
            clip = self.clip
            if clip is None:
                raise ValueError("use_text=True but the batch has no 'txt_tokens' and no clip_ckpt was given")
            states = clip.encode_text_features(tokens).tokens.float()
        return states, text_mask(tokens, states.shape[1])

    def drop_masks(self, batch_size: int, *, device=None, generator: torch.Generator | None = None) -> dict:
        """CFG training drops: ``drop_image_embed`` with p = image_embed_drop_prob and (with text) ``drop_text``
        with p = text_drop_prob, drawn independently per sample."""
        gen_device = generator.device if generator is not None else device
        u = torch.rand(2, batch_size, generator=generator, device=gen_device).to(device)
        out = {"drop_image_embed": u[0] < self.image_embed_drop_prob}
        if self.use_text:
            out["drop_text"] = u[1] < self.text_drop_prob
        return out

    @torch.no_grad()
    def text_embedding(self, batch: dict) -> Tensor:
        """The pooled CLIP text embedding ``(B, D)`` (``txt_emb`` or the frozen CLIP), for networks that take it."""
        if batch.get("txt_emb") is not None:
            return batch["txt_emb"].float()
        clip = self.clip
        if clip is None:
            raise ValueError(
                "this decoder takes the pooled text embedding: the batch has no 'txt_emb' and no clip_ckpt"
            )
        return clip.encode_text_features(batch["tokens"]).embed.float()

    def conditioning(self, batch: dict) -> dict:
        """Model kwargs with nothing dropped (for validation and sampling)."""
        text_tokens, text_mask = self.text_conditioning(batch) if self.use_text else (None, None)
        wants_embed = self.use_text and getattr(self.net, "text_embed_dim", None) is not None
        return decoder_conditioning(
            self.image_embeddings(batch),
            use_text=self.use_text,
            text_tokens=text_tokens,
            text_mask=text_mask,
            text_embed=self.text_embedding(batch) if wants_embed else None,
            normalize_embed=not getattr(self.net, "raw_image_embed", False),
        )

    def model_kwargs(self, batch: dict, *, train: bool, generator: torch.Generator | None = None) -> dict:
        kw = self.conditioning(batch)
        if train:
            kw.update(self.drop_masks(kw["image_embed"].shape[0], device=kw["image_embed"].device, generator=generator))
        return kw

    # -- sampling ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        image_embed: Tensor,
        *,
        steps: int = 50,
        sampler: str = "ddim",
        guidance_scale: float = 1.0,
        generator: torch.Generator | None = None,
        eta: float = 0.0,
        text_tokens: Tensor | None = None,
        text_mask: Tensor | None = None,
        threshold: Threshold = "static",
        dynamic_percentile: float = 0.995,
        image_size: int | None = None,
        use_ema: bool = True,
        x_T: Tensor | None = None,
        text_embed: Tensor | None = None,
    ) -> Tensor:
        """Images ``(B, 3, S, S)`` in [-1, 1] for CLIP image embeddings ``image_embed (B, D)`` (normalised here).

        ``guidance_scale != 1`` uses classifier-free guidance (unconditional = image embedding and text dropped);
        ``threshold``: ``static`` clips x0 to [-1, 1], ``dynamic`` is Imagen's dynamic thresholding.  With
        ``use_text`` and no ``text_tokens`` the text is dropped (the text-unconditional branch).  The noise comes
        from ``generator`` (same seed -> same images).
        """
        return self.sampling_stage(use_ema=use_ema).sample(
            image_embed,
            steps=steps,
            sampler=sampler,
            guidance_scale=guidance_scale,
            eta=eta,
            generator=generator,
            text_tokens=text_tokens,
            text_mask=text_mask,
            text_embed=text_embed,
            threshold=threshold,
            dynamic_percentile=dynamic_percentile,
            image_size=image_size,
            x_T=x_T,
        )

    def sampling_stage(self, *, use_ema: bool = True) -> DecoderStage:
        """This decoder as the pipeline samples it (:class:`dalle2.decoder.stage.DecoderStage`; shares the network)."""
        return DecoderStage(
            net=self._network(use_ema),
            diffusion=self.diffusion,
            image_size=self.image_size,
            use_text=self.use_text,
            vocabulary=self.vocabulary,
        )

    def preview(
        self,
        batch: dict,
        *,
        steps: int = 20,
        sampler: str = "ddim",
        guidance_scale: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> dict:
        kw = self.conditioning(batch)
        imgs = self.sample(
            kw["image_embed"],
            steps=steps,
            sampler=sampler,
            guidance_scale=guidance_scale,
            generator=generator,
            text_tokens=kw.get("text_tokens"),
            text_mask=kw.get("text_mask"),
            text_embed=kw.get("text_embed"),
        )
        return {"samples": imgs, "reference": batch.get("image"), "metrics": {}, "captions": batch.get("caption")}


class UpsamplerModule(_CascadeStageModule):
    """Super-resolution stage: ``p(high-res image | low-res image)``.

    The low-res conditioning image is the batch image downsampled (``downsample_mode``; ``area`` by default: what the
    data loader makes of a JPEG decoded at reduced scale, so the base decoder's samples, trained on that view, look
    like the upsampler's training inputs) by ``image_size / lowres_size``, then augmented (:class:`~dalle2.diffusion.LowResAugmentation`: Gaussian blur
    and noise at a random level when training; no blur and ``sample_aug_level`` when sampling).  The network is
    fully convolutional: with ``train_crop_size`` it trains on random crops of that size (of the high-res image,
    the low-res crop being its downsampled copy) and still samples at full size.

    Args (keyword-only):
        network: keyword dict of the SR :class:`~dalle2.decoder.UNet` (``lowres_cond: true``).
        lowres_size / image_size: the low-res input side and the high-res output side (full images).
        lowres_aug: ``{"blur_sigma": [lo, hi], "blur_prob": p, "max_train_level": k, "schedule": "linear",
            "num_levels": 1000}``; training noise levels are uniform in ``[0, max_train_level]``.
        sample_aug_level: the (small) augmentation level used when sampling and validating.
        train_crop_size: random-crop side of the high-res training image (None: whole images); one crop per image.
        train_crop_focus: the fraction of the crops centred on a pixel drawn in proportion to the detail bicubic
            misses there (``|image - bicubic(low-res)|``), the rest uniform: on pictures of one object on a plain
            background most uniform crops hold no edge, and the edges are what the upsampler has to learn.
        residual: diffuse the residual ``image - bicubic(low-res)`` instead of the image (the sample is then
            ``bicubic(low-res) + residual``): an untrained network already gives bicubic, and training only has to
            learn the missing detail. False (the paper's SR UNet) by default.
        residual_gain: the residual is diffused multiplied by this (and the sample divided by it): the residual of
            these pictures is a thin line of edge pixels (RMS ~0.03 at 256 px), which the schedule's noise buries at
            all but the first few percent of the timesteps at gain 1 (docs/cascade.md "Causes").
        sample_spacing: the sampling timesteps (``dalle2.diffusion.sample``'s ``spacing``); ``leading`` (default) ends
            with a step at t = 0: the sample is the network's estimate from an almost clean image, with the edges drawn
            (``trailing`` stops at T / steps - 1, whose estimate is a blur of them).
        sample_start_t: with ``residual`` (best with ``network.regression_mean``), start sampling at this training
            timestep from the noised deterministic estimate and step uniformly down to 0 (SDEdit); None: the whole
            chain from pure noise.
    """

    stage = "upsampler"

    def __init__(
        self,
        *,
        network: dict,
        diffusion: dict | None = None,
        lowres_size: int = 64,
        image_size: int = 256,
        lowres_aug: dict | None = None,
        sample_aug_level: int = 0,
        train_crop_size: int | None = None,
        train_crop_focus: float = 0.0,
        downsample_mode: Literal["bicubic", "area", "bilinear"] = "area",
        residual: bool = False,
        residual_gain: float = 1.0,
        sample_spacing: Literal["uniform", "trailing", "leading", "karras"] = "leading",
        sample_start_t: int | None = None,
        mean_loss: Literal["mse", "l1"] = "mse",
        ema_decay: float = 0.9999,
        ema_warmup: int = 10,
        ema_update_every: int = 1,
        channels_last: bool = False,
        grad_checkpointing: bool = False,
        sample_every_n_steps: int | None = None,
        compile: bool = False,
        optimizer: Callable | None = None,
        scheduler: Callable | None = None,
    ):
        super().__init__(
            diffusion=decoder_diffusion_config(diffusion, network),
            ema_decay=ema_decay,
            ema_warmup=ema_warmup,
            ema_update_every=ema_update_every,
            optimizer=optimizer,
            scheduler=scheduler,
            compile=compile,
        )
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        if not network.get("lowres_cond", False):
            raise ValueError("the upsampler network needs lowres_cond: true")
        if image_size % lowres_size:
            raise ValueError(f"image_size {image_size} must be a multiple of lowres_size {lowres_size}")
        self.scale = image_size // lowres_size
        if train_crop_size is not None and train_crop_size % self.scale:
            raise ValueError(f"train_crop_size {train_crop_size} must be a multiple of the scale {self.scale}")
        if not 0.0 <= train_crop_focus <= 1.0:
            raise ValueError(f"train_crop_focus must be in [0, 1], got {train_crop_focus}")
        if residual_gain <= 0:
            raise ValueError(f"residual_gain must be > 0, got {residual_gain}")
        if mean_loss not in ("mse", "l1"):
            raise ValueError(f"mean_loss must be 'mse' or 'l1', got {mean_loss!r}")
        self.lowres_aug = lowres_augmentation(lowres_aug)
        if not 0 <= sample_aug_level <= self.lowres_aug.num_levels:
            raise ValueError(f"sample_aug_level must be in [0, {self.lowres_aug.num_levels}], got {sample_aug_level}")
        self.sample_aug_level = int(sample_aug_level)
        # dalle2.decoder.sr_mean: the diffusion refines a regression mean
        if network.get("regression_mean") is not None:
            if not residual:
                raise ValueError("network.regression_mean needs residual: true (the diffusion models image - mean)")
            mean = {"scale": self.scale, "gain": residual_gain, **network["regression_mean"]}
            if int(mean["scale"]) != self.scale:
                raise ValueError(
                    f"network.regression_mean.scale {mean['scale']} != image_size / lowres_size {self.scale}"
                )
            network = {**network, "regression_mean": mean}
            self.hparams["network"] = network  # the stage (UpsamplerStage.from_hparams) builds the same network
        self._build_net(network, channels_last=channels_last, grad_checkpointing=grad_checkpointing)

    def lowres(self, images: Tensor) -> Tensor:
        """High-res images ``(B, C, H, W)`` -> their clean low-res copies ``(B, C, H/scale, W/scale)``."""
        return downsample(images, images.shape[-1] // self.scale, mode=self.hparams.downsample_mode)

    def base(self, lowres_images: Tensor, *, use_ema: bool = False) -> Tensor:
        """What the network's output is added to: with ``residual``, the regression mean of the network's
        (``network.regression_mean``) or ``bicubic(low-res)``; else zeros. No gradient."""
        with torch.no_grad():
            return upsampler_base(self._network(use_ema), lowres_images, self.scale, residual=self.hparams.residual)

    @property
    def has_regression_mean(self) -> bool:
        return self.hparams.network.get("regression_mean") is not None

    def _random_crop(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One random ``train_crop_size`` crop per image, on the ``scale`` grid; with ``train_crop_focus`` = f, a
        fraction f of them centred on a pixel drawn in proportion to the detail bicubic misses there."""
        c, H, W = self.hparams.train_crop_size, images.shape[-2], images.shape[-1]
        if c is None or (c >= H and c >= W):
            return images
        c_h, c_w, s, B = min(c, H), min(c, W), self.scale, images.shape[0]
        gen_device = generator.device if generator is not None else images.device
        tops = torch.randint(0, (H - c_h) // s + 1, (B,), generator=generator, device=gen_device).cpu() * s
        lefts = torch.randint(0, (W - c_w) // s + 1, (B,), generator=generator, device=gen_device).cpu() * s
        focus = float(self.hparams.get("train_crop_focus", 0.0) or 0.0)
        if focus > 0:
            with torch.no_grad():
                lo = self.lowres(images)
                detail = (images.float() - residual_base(lo, s, residual=True)).abs().sum(1).flatten(1)  # (B, H*W)
            u = torch.rand(B, generator=generator, device=gen_device).cpu()
            for i in range(B):
                if u[i] < focus and float(detail[i].sum()) > 0:
                    k = int(torch.multinomial(detail[i].float(), 1, generator=generator).cpu())
                    cy, cx = k // W, k % W
                    tops[i] = min(max(cy - c_h // 2, 0), H - c_h) // s * s
                    lefts[i] = min(max(cx - c_w // 2, 0), W - c_w) // s * s
        return torch.stack(
            [images[i, :, t : t + c_h, x : x + c_w] for i, (t, x) in enumerate(zip(tops.tolist(), lefts.tolist()))]
        )

    def training_inputs(
        self, batch: dict, *, train: bool, generator: torch.Generator | None = None
    ) -> tuple[Tensor, dict]:
        """``(x0, model_kwargs)``: the (cropped, when training with ``train_crop_size``) high-res image — or its residual
        over bicubic / the regression mean — and its augmented low-res copy with the augmentation level."""
        x0, kwargs, _ = self.sr_inputs(batch, train=train, generator=generator)
        return x0, kwargs

    def inputs_and_losses(
        self, batch: dict, *, train: bool, generator: torch.Generator | None = None, use_ema: bool = False
    ) -> tuple[Tensor, dict, dict[str, Tensor]]:
        x0, kwargs, mean_loss = self.sr_inputs(batch, train=train, generator=generator, use_ema=use_ema)
        return x0, kwargs, ({} if mean_loss is None else {"loss/mean": mean_loss})

    def sr_inputs(
        self, batch: dict, *, train: bool, generator: torch.Generator | None = None, use_ema: bool = False
    ) -> tuple[Tensor, dict, Tensor | None]:
        """``(x0, model_kwargs, mean_loss)``: :meth:`training_inputs` and, with a regression mean, its MSE loss
        (gradient to the mean network; the diffusion target is taken over its detached output)."""
        hi = batch["image"]
        if train:
            hi = self._random_crop(hi, generator)
            # the degraded low-res copy (blur or BSR); the residual is taken over ITS bicubic upsampling, as it is over
            # the given low-res image's when sampling
            clean = self.lowres_aug.degrade(hi, self.scale, self.lowres, generator=generator)
        else:
            clean = self.lowres(hi)
        lo, level = self.lowres_aug.add_noise(clean, train=train, level=self.sample_aug_level, generator=generator)
        hp, mean_loss = self.hparams, None
        if self.has_regression_mean:
            net = self._network(use_ema)
            predicted = net.mean_residual(clean)
            bicubic_up = residual_base(clean, self.scale, residual=True)
            gain = float(hp.network["regression_mean"]["gain"])
            err = predicted.float() - (hi.float() - bicubic_up) * gain
            mean_loss = err.abs().mean() if hp.get("mean_loss", "mse") == "l1" else err.pow(2).mean()
            base = bicubic_up + predicted.detach().float() / gain
        else:
            base = self.base(clean)
        target = (hi - base.to(hi.dtype)) * float(hp.get("residual_gain", 1.0)) if hp.residual else hi
        return self._image_input(target), {"lowres_image": self._image_input(lo), "lowres_aug_level": level}, mean_loss

    @torch.no_grad()
    def upsample(
        self,
        lowres_images: Tensor,
        *,
        steps: int = 50,
        sampler: str = "ddim",
        generator: torch.Generator | None = None,
        aug_level: int | None = None,
        eta: float = 0.0,
        threshold: Threshold = "static",
        dynamic_percentile: float = 0.995,
        use_ema: bool = True,
        x_T: Tensor | None = None,
        spacing: str | None = None,
        start_t: int | None = None,
    ) -> Tensor:
        """``lowres_images (B, C, h, w)`` in [-1, 1] -> ``(B, C, h * scale, w * scale)`` in [-1, 1].

        The low-res images are noised at ``aug_level`` (default ``sample_aug_level``, no blur) with noise from
        ``generator``, as in training; the network sees that level.
        """
        return self.sampling_stage(use_ema=use_ema).upsample(
            lowres_images,
            steps=steps,
            sampler=sampler,
            generator=generator,
            aug_level=aug_level,
            eta=eta,
            threshold=threshold,
            dynamic_percentile=dynamic_percentile,
            x_T=x_T,
            spacing=spacing,
            start_t=start_t,
        )

    def sampling_stage(self, *, use_ema: bool = True) -> UpsamplerStage:
        """This upsampler as the pipeline samples it (:class:`dalle2.decoder.stage.UpsamplerStage`; shares the network)."""
        hp = self.hparams
        return UpsamplerStage(
            net=self._network(use_ema),
            diffusion=self.diffusion,
            lowres_size=hp.lowres_size,
            image_size=hp.image_size,
            lowres_aug=self.lowres_aug,
            sample_aug_level=self.sample_aug_level,
            residual=hp.residual,
            residual_gain=float(hp.get("residual_gain", 1.0)),
            sample_spacing=hp.sample_spacing,
            downsample_mode=hp.downsample_mode,
            sample_start_t=hp.get("sample_start_t"),
        )

    def preview(
        self,
        batch: dict,
        *,
        steps: int = 20,
        sampler: str = "ddim",
        guidance_scale: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> dict:
        hi = batch["image"].to(self.device).float()
        lo = self.lowres(hi)
        up = self.upsample(lo, steps=steps, sampler=sampler, generator=generator)
        bicubic = F.interpolate(lo, size=hi.shape[-2:], mode="bicubic", align_corners=False).clamp(-1, 1)
        metrics = {"val/psnr": float(psnr(up, hi).mean()), "val/psnr_bicubic": float(psnr(bicubic, hi).mean())}
        return {
            "samples": up,
            "reference": hi,
            "baseline": bicubic,
            "metrics": metrics,
            "captions": batch.get("caption"),
        }
