"""Sampling the cascaded decoder and the upsamplers: pure functions over a network and its diffusion, like
:mod:`dalle2.prior.sampling`.  The LightningModules (``dalle2.lit.decoder_module``) and the pipeline call these.

    images = sample_decoder(unet, diffusion, image_embed, image_size=64, steps=50, guidance_scale=3.0, generator=g)
    hi = sample_upsampler(sr_unet, diffusion, lo, scale=4, lowres_aug=aug, aug_level=50, residual=False, generator=g)

Images are (B, 3, S, S) in [-1, 1] in and out.  CLIP image embeddings are L2-normalised here (as in training), so
any scale of embedding conditions the decoder the same way.  The networks are put in eval mode for the call and
restored after it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dalle2.diffusion import GaussianDiffusion, LowResAugmentation, cfg_model_fn, dynamic_threshold, sample, static_clip
from dalle2.diffusion.samplers import Generators, randn
from dalle2.diffusion.schedules import respace_timesteps
from dalle2.nn import eval_mode

Threshold = Literal["static", "dynamic", "none"]
DownsampleMode = Literal["bicubic", "area", "bilinear"]

__all__ = ["Threshold", "downsample", "psnr", "residual_base", "sample_decoder", "sample_upsampler", "x0_transform"]


def x0_transform(threshold: Threshold, percentile: float = 0.995) -> Callable[[Tensor], Tensor] | None:
    """The x0 clipping of a sampler: ``static`` (clip to [-1, 1]), ``dynamic`` (Imagen's, at ``percentile``), ``none``."""
    if threshold == "static":
        return static_clip
    if threshold == "dynamic":
        return lambda x0: dynamic_threshold(x0, percentile)
    if threshold == "none":
        return None
    raise ValueError(f"unknown threshold {threshold!r}; expected 'static', 'dynamic' or 'none'")


def downsample(images: Tensor, size: int, *, mode: DownsampleMode = "bicubic") -> Tensor:
    """Antialiased resize of ``images (B, C, H, W)`` in [-1, 1] to ``(size, size)`` (clamped back to [-1, 1])."""
    if mode == "area":
        out = F.interpolate(images.float(), size=(size, size), mode="area")
    else:
        out = F.interpolate(images.float(), size=(size, size), mode=mode, antialias=True, align_corners=False)
    return out.clamp(-1.0, 1.0).to(images.dtype)


def psnr(pred: Tensor, target: Tensor) -> Tensor:
    """Per-image PSNR in dB of ``pred`` vs ``target`` (both (B, C, H, W) in [-1, 1], peak-to-peak 2)."""
    mse = (pred.float() - target.float()).pow(2).flatten(1).mean(1).clamp(min=1e-10)
    return 10.0 * torch.log10(4.0 / mse)


def residual_base(lowres_images: Tensor, scale: int, *, residual: bool) -> Tensor:
    """What an upsampler's output is added to: ``bicubic(low-res)`` when it diffuses the residual, else zeros."""
    size = (lowres_images.shape[-2] * scale, lowres_images.shape[-1] * scale)
    if not residual:
        return lowres_images.new_zeros(*lowres_images.shape[:-2], *size)
    return F.interpolate(lowres_images.float(), size=size, mode="bicubic", align_corners=False)


def upsampler_base(net: nn.Module, lowres_images: Tensor, scale: int, *, residual: bool) -> Tensor:
    """What an upsampler's diffusion output is added to: the network's regression mean when it has one
    (:class:`~dalle2.decoder.sr_mean.MeanResidualSR`), else :func:`residual_base`."""
    if residual and callable(getattr(net, "regression_mean", None)):
        with eval_mode(net):
            return net.regression_mean(lowres_images).float()
    return residual_base(lowres_images, scale, residual=residual)


def decoder_conditioning(
    image_embed: Tensor,
    *,
    use_text: bool,
    text_tokens: Tensor | None = None,
    text_mask: Tensor | None = None,
    text_embed: Tensor | None = None,
    normalize_embed: bool = True,
) -> dict[str, Any]:
    """UNet keyword arguments with nothing dropped: the normalised image embedding (as given with ``normalize_embed``
    False: Karlo's decoder takes raw CLIP embeddings) and, for a text-conditioned decoder, the text — its token states,
    and the pooled ``text_embed`` when given — (dropped, i.e. the text-unconditional branch, when no ``text_tokens``
    are given)."""
    emb = F.normalize(image_embed.float(), dim=-1) if normalize_embed else image_embed.float()
    B, device = emb.shape[0], emb.device
    kw: dict[str, Any] = {"image_embed": emb, "drop_image_embed": torch.zeros(B, dtype=torch.bool, device=device)}
    if use_text:
        if text_tokens is not None:
            kw["text_tokens"] = text_tokens.to(device).float()
            kw["text_mask"] = None if text_mask is None else text_mask.to(device)
            if text_embed is not None:
                kw["text_embed"] = text_embed.to(device).float()
            kw["drop_text"] = torch.zeros(B, dtype=torch.bool, device=device)
        else:
            kw["drop_text"] = torch.ones(B, dtype=torch.bool, device=device)
    return kw


@torch.no_grad()
def sample_decoder(
    net: nn.Module,
    diffusion: GaussianDiffusion,
    image_embed: Tensor,
    *,
    image_size: int,
    use_text: bool = False,
    text_tokens: Tensor | None = None,
    text_mask: Tensor | None = None,
    text_embed: Tensor | None = None,
    normalize_embed: bool = True,
    steps: int = 50,
    sampler: str = "ddim",
    guidance_scale: float = 1.0,
    eta: float = 0.0,
    generator: Generators = None,
    threshold: Threshold = "static",
    dynamic_percentile: float = 0.995,
    x_T: Tensor | None = None,
) -> Tensor:
    """Images ``(B, 3, S, S)`` in [-1, 1] for CLIP image embeddings ``image_embed (B, D)`` (``text_embed``,
    ``normalize_embed``: see :func:`decoder_conditioning`).

    ``guidance_scale != 1``: classifier-free guidance (the unconditional branch drops the image embedding and the
    text).  The noise comes from ``generator`` (one, or one per row).
    """
    device = next(net.parameters()).device
    kw = decoder_conditioning(
        image_embed.to(device),
        use_text=use_text,
        text_tokens=text_tokens,
        text_mask=text_mask,
        text_embed=text_embed,
        normalize_embed=normalize_embed,
    )
    model_fn = net
    if guidance_scale != 1.0:
        model_fn = cfg_model_fn(net, guidance_scale=guidance_scale, learned_variance=diffusion.learned_variance)
    shape = (kw["image_embed"].shape[0], net.in_channels, int(image_size), int(image_size))
    with eval_mode(net):
        out = sample(
            model_fn,
            x_T.to(device) if x_T is not None else shape,
            diffusion=diffusion,
            sampler=sampler,
            steps=steps,
            eta=eta,
            generator=generator,
            model_kwargs=kw,
            x0_transform=x0_transform(threshold, dynamic_percentile),
            device=device,
        )
    return out.float().clamp(-1.0, 1.0)


@torch.no_grad()
def sample_upsampler(
    net: nn.Module,
    diffusion: GaussianDiffusion,
    lowres_images: Tensor,
    *,
    scale: int,
    lowres_aug: LowResAugmentation,
    aug_level: int,
    residual: bool = False,
    residual_gain: float = 1.0,
    steps: int = 50,
    sampler: str = "ddim",
    eta: float = 0.0,
    generator: Generators = None,
    threshold: Threshold = "static",
    dynamic_percentile: float = 0.995,
    spacing: str = "leading",
    x_T: Tensor | None = None,
    start_t: int | None = None,
) -> Tensor:
    """``lowres_images (B, C, h, w)`` in [-1, 1] -> ``(B, C, h * scale, w * scale)`` in [-1, 1].

    The low-res images are noised at ``aug_level`` (no blur) with noise from ``generator``, as in training, and the
    network sees that level.  With ``residual`` the network diffuses ``residual_gain * (image - bicubic(low-res))``:
    its output divided by the gain is added to ``bicubic(low-res)`` (or to the network's regression mean,
    :func:`upsampler_base`), and the x0 clipping applies to that sum (the image), not to the residual.  ``steps=0``
    returns that deterministic estimate alone.  ``start_t`` (with ``residual``) starts the chain at that training
    timestep from the noised estimate (a zero residual: ``x = sqrt(1 - alpha_bar) * noise``) and takes ``steps``
    steps spaced uniformly down to t = 0 (SDEdit, Meng et al. 2022): the few last steps, where the network draws
    the edges (docs/decoder.md "The cascade"), refine the estimate.
    """
    device = next(net.parameters()).device
    lo = lowres_images.to(device).float()
    if int(aug_level) == 0:  # no augmentation: no noise drawn (the generator's next draw is x_T, as in Karlo's)
        lo_aug, level = lo, torch.zeros(lo.shape[0], dtype=torch.int64, device=device)
    else:
        lo_aug, level = lowres_aug(lo, train=False, level=int(aug_level), generator=generator)
    B, C, h, w = lo.shape
    base = upsampler_base(net, lo, scale, residual=residual)
    if steps == 0:  # the deterministic estimate alone (bicubic, or the regression mean of dalle2.decoder.sr_mean)
        return base.float().clamp(-1.0, 1.0)
    transform = x0_transform(threshold, dynamic_percentile)
    gain = float(residual_gain) if residual else 1.0
    if transform is not None and residual:
        image_transform = transform
        transform = lambda r: (image_transform(base + r / gain) - base) * gain  # noqa: E731
    timesteps = None
    if start_t is not None:
        if not residual or not 0 <= int(start_t) < diffusion.num_timesteps:
            raise ValueError(
                f"start_t needs a residual upsampler and 0 <= start_t < {diffusion.num_timesteps}; got {start_t}"
            )
        timesteps = respace_timesteps(int(start_t) + 1, min(int(steps), int(start_t) + 1), "uniform").to(device)
        if x_T is None:
            noise = randn((B, C, h * scale, w * scale), generator=generator, device=device)
            x_T = diffusion.q_sample(torch.zeros_like(noise), torch.full((B,), int(start_t), device=device), noise)
    with eval_mode(net):
        out = sample(
            net,
            x_T.to(device) if x_T is not None else (B, C, h * scale, w * scale),
            diffusion=diffusion,
            sampler=sampler,
            steps=steps,
            eta=eta,
            generator=generator,
            model_kwargs={"lowres_image": lo_aug, "lowres_aug_level": level},
            x0_transform=transform,
            spacing=spacing,
            device=device,
            timesteps=timesteps,
        )
    return (base + out.float() / gain).clamp(-1.0, 1.0)
