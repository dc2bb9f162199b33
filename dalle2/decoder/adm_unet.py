"""The ADM / GLIDE UNet body (Dhariwal & Nichol 2021; Karlo's decoder and super-resolution networks) on our blocks.

Our :class:`~dalle2.decoder.unet.UNet` resamples with strided / nearest-neighbour convolutions; ADM resamples inside
residual blocks ("BigGAN" up/down: :class:`ResampleResBlock`), and puts attention (GLIDE style, over
``[pixels; context tokens]``) after every residual block of the levels that have it.  Everything else is the same
computation: :class:`~dalle2.decoder.blocks.ResBlock` (scale-shift norm), :class:`~dalle2.decoder.blocks.PixelAttention`
and :class:`~dalle2.decoder.blocks.Stage`.  The body takes an already made embedding and context:

    body = ADMUNet(in_channels=3, out_channels=6, model_channels=320, channel_mult=(1, 2, 3, 4), num_res_blocks=3,
                   attention_levels=(1, 2, 3), context_dim=1536, head_channels=64)
    out = body(x, emb, context, context_mask)      # x (B, C, H, W), emb (B, 4 * model_channels)
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dalle2.decoder.blocks import PixelAttention, ResBlock, Stage, group_norm

__all__ = ["ADMResBlock", "ADMUNet"]

EmbMode = Literal["scale_shift", "add"]


class ADMResBlock(ResBlock):
    """A :class:`ResBlock` with ADM's two options: ``resample`` halves (``down``: 2x2 average pooling) or doubles
    (``up``: nearest) the resolution between its first norm + SiLU and its first conv, on both the residual branch and
    the skip (BigGAN style); ``emb_mode="add"`` adds the projected embedding to the features before the second norm
    (ADM without ``use_scale_shift_norm``; diffusers' ``resnet_time_scale_shift="default"``) instead of scaling and
    shifting after it.  With neither it is exactly a :class:`ResBlock`.

    forward(x: (B, C, H, W), emb: (B, E), ...) -> (B, C_out, H | H / 2 | 2 H, W | W / 2 | 2 W)
    """

    def __init__(
        self,
        in_channels: int,
        *,
        out_channels: int,
        emb_dim: int,
        resample: Literal["up", "down"] | None = None,
        emb_mode: EmbMode = "scale_shift",
        **kw,
    ):
        super().__init__(in_channels, out_channels=out_channels, emb_dim=emb_dim, **kw)
        if resample not in (None, "up", "down"):
            raise ValueError(f"resample must be None, 'up' or 'down', got {resample!r}")
        if emb_mode not in ("scale_shift", "add"):
            raise ValueError(f"emb_mode must be 'scale_shift' or 'add', got {emb_mode!r}")
        self.resample, self.emb_mode = resample, emb_mode
        if emb_mode == "add":
            self.emb_proj[1] = nn.Linear(emb_dim, out_channels)

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "down":
            return F.avg_pool2d(x, kernel_size=2, stride=2)
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x

    def forward(self, x, emb, context=None, context_mask=None):
        norm, act, conv = self.in_layers
        h = conv(self._resample(act(norm(x))))
        e = self.emb_proj(emb)[..., None, None].to(h.dtype)
        if self.emb_mode == "add":
            h = self.out_norm(h + e)
        else:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_norm(h) * (1 + scale) + shift
        return self.skip(self._resample(x)) + self.out_layers(h)


class ADMUNet(nn.Module):
    """forward(x: (B, in_channels, H, W), emb: (B, 4 * model_channels), context: (B, M, context_dim) | None,
    context_mask: (B, M) bool | None) -> (B, out_channels, H, W).  H, W divisible by ``2 ** (levels - 1)``.

    ``attention_levels`` index ``channel_mult``; ``mid_attention``: attention between the two middle blocks;
    ``context_dim`` None: self-attention only.  ``norm_groups``: every GroupNorm's group count.  ``emb_mode``: how the
    residual blocks take the embedding (:class:`ADMResBlock`).
    """

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        model_channels: int,
        channel_mult: tuple[int, ...],
        num_res_blocks: int,
        attention_levels: tuple[int, ...] = (),
        mid_attention: bool = True,
        head_channels: int = 64,
        context_dim: int | None = None,
        norm_groups: int = 32,
        emb_mode: EmbMode = "scale_shift",
        dropout: float = 0.0,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        channel_mult, attention_levels = tuple(channel_mult), tuple(attention_levels)
        self.channel_mult, self.grad_checkpointing = channel_mult, grad_checkpointing
        emb_dim = 4 * model_channels

        def res(cin: int, cout: int, resample: str | None = None) -> ResBlock:
            kw = dict(out_channels=cout, emb_dim=emb_dim, dropout=dropout, groups=norm_groups)
            if resample is None and emb_mode == "scale_shift":
                return ResBlock(cin, **kw)
            return ADMResBlock(cin, resample=resample, emb_mode=emb_mode, **kw)

        def attn(ch: int) -> PixelAttention:
            return PixelAttention(ch, head_channels=head_channels, context_dim=context_dim, groups=norm_groups)

        self.input_conv = nn.Conv2d(in_channels, model_channels, 3, padding=1)
        self.down = nn.ModuleList()
        skips, ch = [model_channels], model_channels
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                blocks = [res(ch, model_channels * mult)]
                ch = model_channels * mult
                if level in attention_levels:
                    blocks.append(attn(ch))
                self.down.append(Stage(blocks))
                skips.append(ch)
            if level < len(channel_mult) - 1:
                self.down.append(Stage([res(ch, ch, "down")]))
                skips.append(ch)
        self.middle = Stage([res(ch, ch), *([attn(ch)] if mid_attention else []), res(ch, ch)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                blocks = [res(ch + skips.pop(), model_channels * mult)]
                ch = model_channels * mult
                if level in attention_levels:
                    blocks.append(attn(ch))
                if level > 0 and i == num_res_blocks:
                    blocks.append(res(ch, ch, "up"))
                self.up.append(Stage(blocks))
        self.out = nn.Sequential(group_norm(ch, norm_groups), nn.SiLU(), nn.Conv2d(ch, out_channels, 3, padding=1))

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    def _run(self, stage: Stage, h, emb, context, context_mask) -> torch.Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(stage, h, emb, context, context_mask, use_reentrant=False)
        return stage(h, emb, context, context_mask)

    def forward(self, x, emb, context=None, context_mask=None) -> torch.Tensor:
        f = self.downsample_factor
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(f"x spatial size {tuple(x.shape[-2:])} must be divisible by {f}")
        h = self.input_conv(x)
        skips = [h]
        for stage in self.down:
            h = self._run(stage, h, emb, context, context_mask)
            skips.append(h)
        h = self._run(self.middle, h, emb, context, context_mask)
        for stage in self.up:
            h = self._run(stage, torch.cat([h, skips.pop()], dim=1), emb, context, context_mask)
        return self.out(h)
