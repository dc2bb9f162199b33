"""Karlo's decoder and super-resolution networks (Kakao Brain's unCLIP; diffusers' ``UnCLIPTextProjModel`` +
``UNet2DConditionModel``, and two ``UNet2DModel`` s) on our blocks (:class:`~dalle2.decoder.adm_unet.ADMUNet`).

**Decoder** (:class:`KarloDecoderUNet`): DALL-E 2's conditioning, as Karlo does it.  The CLIP image embedding (raw, not
normalised: what Karlo's prior gives) and the pooled CLIP text embedding are projected and *added* to the timestep
embedding; the image embedding is also projected into ``num_image_tokens`` extra context tokens (the projection's
output read as ``(context_dim, n)``, Karlo's layout) that precede the projected, layer-normed CLIP token states.  The
UNet attends GLIDE style over ``[pixels; context]``; its output has ``2 C`` channels (eps and the learned-range
variance).  Classifier-free guidance: ``drop_image_embed`` rows use a learned null image embedding (before both
projections), ``drop_text`` rows the CLIP encoding of the empty prompt (Karlo's unconditional branch; set by the
converter).

**Super-resolution** (:class:`KarloSuperRes`): two UNets of the same shape, ``first`` for every step but the last and
``last`` for the last one.  Karlo's sampler always ends at ``t = 0`` (and reaches it only there), so the pair routes
by timestep: rows at ``t = 0`` go to ``last``.  Each network reads the noised image concatenated with the low-res
image upsampled to its size (bicubic, antialiased, as Karlo's pipeline does); there is no attention and no
augmentation-level input (``lowres_aug_level`` is accepted and ignored).  Fine-tuning trains ``first`` and keeps
``last`` frozen unless ``train_last`` (a batch rarely holds t = 0, which would leave its gradients unused).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dalle2.decoder.adm_unet import ADMUNet
from dalle2.nn import TimestepEmbedding
from dalle2.nn.text_cond import substitute_null_text

__all__ = ["KarloDecoderUNet", "KarloSRUNet", "KarloSuperRes"]


def _rows(flags, b: int, device) -> Tensor | None:
    if flags is None:
        return None
    flags = torch.as_tensor(flags, device=device).to(torch.bool)
    return flags.expand(b) if flags.dim() == 0 else flags.reshape(b)


def _timesteps(t, b: int, device) -> Tensor:
    t = torch.as_tensor(t, device=device)
    return t.expand(b) if t.dim() == 0 else t


class KarloDecoderUNet(nn.Module):
    """forward(x: (B, C, H, W), t: (B,), *, image_embed: (B, clip_dim) raw CLIP embedding, text_embed: (B, clip_dim)
    pooled CLIP text embedding, text_tokens: (B, L, text_dim), text_mask: (B, L) bool, drop_image_embed / drop_text:
    (B,) bool) -> (B, 2 C, H, W) (eps, variance values)."""

    arch = "karlo"
    raw_image_embed = True  # the sampler and the trainer must not normalise the CLIP embedding

    def __init__(
        self,
        *,
        in_channels: int = 3,
        model_channels: int,
        channel_mult: tuple[int, ...],
        num_res_blocks: int,
        attention_levels: tuple[int, ...],
        mid_attention: bool = True,
        head_channels: int = 64,
        norm_groups: int = 32,
        clip_dim: int,
        text_dim: int,
        context_dim: int,
        num_image_tokens: int = 4,
        max_text_len: int = 77,
        learned_variance: bool = True,
        dropout: float = 0.0,
        grad_checkpointing: bool = False,
        arch: str = "karlo",
    ):
        super().__init__()
        if arch != "karlo":
            raise ValueError(f"KarloDecoderUNet builds arch 'karlo', got {arch!r}")
        self.config: dict[str, Any] = dict(
            arch="karlo",
            in_channels=in_channels,
            model_channels=model_channels,
            channel_mult=list(channel_mult),
            num_res_blocks=num_res_blocks,
            attention_levels=list(attention_levels),
            mid_attention=mid_attention,
            head_channels=head_channels,
            norm_groups=norm_groups,
            clip_dim=clip_dim,
            text_dim=text_dim,
            context_dim=context_dim,
            num_image_tokens=num_image_tokens,
            max_text_len=max_text_len,
            learned_variance=learned_variance,
            dropout=dropout,
        )
        self.in_channels, self.learned_variance = in_channels, learned_variance
        self.clip_dim, self.text_dim, self.text_embed_dim = clip_dim, text_dim, clip_dim
        self.num_image_tokens, self.context_dim = num_image_tokens, context_dim
        time_dim = 4 * model_channels
        self.time_embed = TimestepEmbedding(time_dim, freq_dim=model_channels)
        self.null_image_embed = nn.Parameter(torch.zeros(clip_dim))
        self.image_to_time = nn.Linear(clip_dim, time_dim)
        self.text_embed_to_time = nn.Linear(clip_dim, time_dim)
        self.image_to_tokens = nn.Linear(clip_dim, num_image_tokens * context_dim)
        self.text_proj = nn.Linear(text_dim, context_dim)
        self.text_norm = nn.LayerNorm(context_dim)
        self.null_text_embed = nn.Parameter(torch.zeros(clip_dim))
        self.null_text_tokens = nn.Parameter(torch.zeros(max_text_len, text_dim))
        null_mask = torch.zeros(max_text_len, dtype=torch.bool)
        null_mask[:2] = True
        self.register_buffer("null_text_mask", null_mask)
        self.body = ADMUNet(
            in_channels=in_channels,
            out_channels=in_channels * (2 if learned_variance else 1),
            model_channels=model_channels,
            channel_mult=tuple(channel_mult),
            num_res_blocks=num_res_blocks,
            attention_levels=tuple(attention_levels),
            mid_attention=mid_attention,
            head_channels=head_channels,
            context_dim=context_dim,
            norm_groups=norm_groups,
            dropout=dropout,
            grad_checkpointing=grad_checkpointing,
        )

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        *,
        image_embed: Tensor | None = None,
        text_embed: Tensor | None = None,
        text_tokens: Tensor | None = None,
        text_mask: Tensor | None = None,
        drop_image_embed: Tensor | None = None,
        drop_text: Tensor | None = None,
    ) -> Tensor:
        b, dev = x.shape[0], x.device
        dtype = self.image_to_time.weight.dtype
        drop_image, drop_txt = _rows(drop_image_embed, b, dev), _rows(drop_text, b, dev)
        if image_embed is None:
            if drop_image is None or not bool(drop_image.all()):
                raise ValueError(f"image_embed (B, {self.clip_dim}) is required (or drop_image_embed all True)")
            image_embed = self.null_image_embed[None].expand(b, -1)
        img = image_embed.to(device=dev, dtype=dtype)
        if drop_image is not None:
            img = torch.where(drop_image[:, None], self.null_image_embed.to(dtype)[None], img)
        if text_tokens is None or text_embed is None:
            if drop_txt is None or not bool(drop_txt.all()):
                raise ValueError("Karlo's decoder needs text_embed and text_tokens (or drop_text all True)")
            text_tokens = self.null_text_tokens[None].expand(b, -1, -1)
            text_embed, text_mask = self.null_text_embed[None].expand(b, -1), None
        length = text_tokens.shape[1]
        valid = (
            torch.ones(b, length, dtype=torch.bool, device=dev)
            if text_mask is None
            else text_mask.to(device=dev, dtype=torch.bool)
        )
        text_embed, text_tokens, valid = substitute_null_text(
            drop_txt,
            text_embed.to(device=dev, dtype=dtype),
            text_tokens.to(device=dev, dtype=dtype),
            valid,
            null_embed=self.null_text_embed,
            null_tokens=self.null_text_tokens,
            null_valid=self.null_text_mask,
        )
        emb = self.time_embed(_timesteps(t, b, dev))
        emb = emb + (self.text_embed_to_time(text_embed) + self.image_to_time(img)).to(emb.dtype)
        image_tokens = self.image_to_tokens(img).reshape(b, -1, self.num_image_tokens).permute(0, 2, 1)
        context = torch.cat([image_tokens, self.text_norm(self.text_proj(text_tokens))], dim=1)
        mask = torch.cat([torch.ones(b, self.num_image_tokens, dtype=torch.bool, device=dev), valid], dim=1)
        return self.body(x, emb, context, mask)


class KarloSRUNet(nn.Module):
    """One super-resolution network: forward(x: (B, C, H, W), t: (B,), *, lowres_image: (B, C, h, w)) -> (B, C, H, W)."""

    def __init__(
        self,
        *,
        in_channels: int = 3,
        model_channels: int,
        channel_mult: tuple[int, ...],
        num_res_blocks: int,
        mid_attention: bool = False,
        head_channels: int = 64,
        norm_groups: int = 32,
        emb_mode: str = "scale_shift",
        dropout: float = 0.0,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.time_embed = TimestepEmbedding(4 * model_channels, freq_dim=model_channels)
        self.body = ADMUNet(
            in_channels=2 * in_channels,
            out_channels=in_channels,
            model_channels=model_channels,
            channel_mult=tuple(channel_mult),
            num_res_blocks=num_res_blocks,
            attention_levels=(),
            mid_attention=mid_attention,
            head_channels=head_channels,
            norm_groups=norm_groups,
            emb_mode=emb_mode,
            dropout=dropout,
            grad_checkpointing=grad_checkpointing,
        )

    def forward(self, x: Tensor, t: Tensor, *, lowres_image: Tensor, lowres_aug_level: Tensor | None = None) -> Tensor:
        lo = lowres_image.to(x.dtype)  # (no augmentation-level input: lowres_aug_level is ignored)
        if lo.shape[-2:] != x.shape[-2:]:
            lo = F.interpolate(lo, size=x.shape[-2:], mode="bicubic", align_corners=False, antialias=True)
        return self.body(torch.cat([x, lo], dim=1), self.time_embed(_timesteps(t, x.shape[0], x.device)))


class KarloSuperRes(nn.Module):
    """The pair: forward(x: (B, C, H, W), t: (B,), *, lowres_image: (B, C, h, w), lowres_aug_level=None (ignored))
    -> (B, C, H, W); rows at ``t = 0`` (Karlo's last step) go through ``last``, the others through ``first``."""

    arch = "karlo_sr"
    learned_variance = False
    lowres_cond = True

    def __init__(
        self,
        *,
        first: dict,
        last: dict,
        train_last: bool = False,
        arch: str = "karlo_sr",
        learned_variance: bool = False,
        lowres_cond: bool = True,
    ):
        super().__init__()
        if arch != "karlo_sr" or learned_variance or not lowres_cond:
            raise ValueError(
                f"KarloSuperRes is arch 'karlo_sr', lowres_cond, no learned variance; got {arch!r}, "
                f"learned_variance={learned_variance}, lowres_cond={lowres_cond}"
            )
        self.config: dict[str, Any] = dict(
            arch="karlo_sr",
            first=dict(first),
            last=dict(last),
            train_last=bool(train_last),
            learned_variance=False,
            lowres_cond=True,
        )
        self.first, self.last = KarloSRUNet(**first), KarloSRUNet(**last)
        self.in_channels = self.first.in_channels
        if not train_last:
            self.last.requires_grad_(False)

    @property
    def downsample_factor(self) -> int:
        return self.first.body.downsample_factor

    def forward(self, x: Tensor, t: Tensor, *, lowres_image: Tensor, lowres_aug_level: Tensor | None = None) -> Tensor:
        t = _timesteps(t, x.shape[0], x.device)
        at_last = t == 0
        if not bool(at_last.any()):
            return self.first(x, t, lowres_image=lowres_image)
        if bool(at_last.all()):
            return self.last(x, t, lowres_image=lowres_image)
        out = torch.empty_like(x)
        rest = ~at_last
        out[rest] = self.first(x[rest], t[rest], lowres_image=lowres_image[rest]).to(out.dtype)
        out[at_last] = self.last(x[at_last], t[at_last], lowres_image=lowres_image[at_last]).to(out.dtype)
        return out
