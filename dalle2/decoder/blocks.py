"""The UNet's building blocks: scale-shift ResBlock, pixel attention with context tokens, down/up sampling.

Every block has the same call signature ``block(h, emb, context, context_mask)`` so that a ``Stage`` (a short list of
blocks run in order) can be checkpointed as one unit.  Blocks that need no conditioning ignore the extra arguments.

Residual branches end in zero-initialised layers (the second ResBlock conv, the attention output projection), so a
freshly built UNet is the identity along its residual paths.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def num_groups(channels: int) -> int:
    """GroupNorm groups: 32, or the largest power of two dividing ``channels`` when channels are few."""
    return math.gcd(32, channels)


def group_norm(channels: int, groups: int | None = None) -> nn.GroupNorm:
    """GroupNorm over ``channels`` in ``groups`` groups (None: :func:`num_groups`)."""
    return nn.GroupNorm(num_groups(channels) if groups is None else groups, channels, eps=1e-5)


def zero_init(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """``skip(x) + conv(drop(silu(norm(conv(silu(norm(x)))) * (1 + scale) + shift)))`` with (scale, shift) from ``emb``;
    ``groups``: the GroupNorms' group count (None: :func:`num_groups`).

    forward(x: (B, Cin, H, W), emb: (B, E), context=None, context_mask=None) -> (B, Cout, H, W)
    """

    def __init__(
        self, in_channels: int, *, out_channels: int, emb_dim: int, dropout: float = 0.0, groups: int | None = None
    ):
        super().__init__()
        self.in_layers = nn.Sequential(
            group_norm(in_channels, groups), nn.SiLU(), nn.Conv2d(in_channels, out_channels, 3, padding=1)
        )
        self.emb_proj = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * out_channels))
        self.out_norm = group_norm(out_channels, groups)
        self.out_layers = nn.Sequential(
            nn.SiLU(), nn.Dropout(dropout), zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        )
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(
        self,
        x: torch.Tensor,
        emb: torch.Tensor,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        h = self.in_layers(x)
        scale, shift = self.emb_proj(emb)[..., None, None].chunk(2, dim=1)
        h = self.out_norm(h)
        h = h * (1 + scale.to(h.dtype)) + shift.to(h.dtype)
        return self.skip(x) + self.out_layers(h)


class PixelAttention(nn.Module):
    """Multi-head self-attention over the pixels, GLIDE style: when the UNet has context tokens, their keys/values
    (own projection) are concatenated to the pixels' keys/values in the same softmax.

    Pixel keys are always attendable, so a row whose context is entirely masked out still has keys (no NaN).

    forward(x: (B, C, H, W), emb=None, context: (B, M, Dc) | None, context_mask: (B, M) bool | None) -> (B, C, H, W)
    ``context_mask`` is True where a context token may be attended to.
    """

    def __init__(
        self, channels: int, *, head_channels: int = 64, context_dim: int | None = None, groups: int | None = None
    ):
        super().__init__()
        self.heads = max(1, channels // head_channels)
        if channels % self.heads:
            raise ValueError(f"attention channels {channels} not divisible by {self.heads} heads")
        self.norm = group_norm(channels, groups)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.context_kv = nn.Linear(context_dim, 2 * channels) if context_dim is not None else None
        self.proj = zero_init(nn.Linear(channels, channels))

    def forward(
        self,
        x: torch.Tensor,
        emb: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b, c, height, width = x.shape
        n, h = height * width, self.heads
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, N, C)
        q, k, v = self.qkv(tokens).view(b, n, 3, h, c // h).permute(2, 0, 3, 1, 4)  # each (B, h, N, d)
        mask = None
        if self.context_kv is not None:
            if context is None:
                raise ValueError("PixelAttention was built with context_dim but got no context")
            m = context.shape[1]
            ck, cv = self.context_kv(context).view(b, m, 2, h, c // h).permute(2, 0, 3, 1, 4)
            k = torch.cat([k, ck.to(k.dtype)], dim=2)
            v = torch.cat([v, cv.to(v.dtype)], dim=2)
            if context_mask is not None:
                pixels = torch.ones(b, n, dtype=torch.bool, device=x.device)
                mask = torch.cat([pixels, context_mask], dim=1)[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, h, N, d)
        out = self.proj(out.transpose(1, 2).reshape(b, n, c))
        return x + out.transpose(1, 2).reshape(b, c, height, width).to(x.dtype)


class Downsample(nn.Module):
    """Strided 3x3 conv.  forward(x: (B, C, H, W), ...) -> (B, C, H/2, W/2)"""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, emb=None, context=None, context_mask=None) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then 3x3 conv.  forward(x: (B, C, H, W), ...) -> (B, C_out, 2H, 2W); C_out = C unless
    ``out_channels`` is given."""

    def __init__(self, channels: int, out_channels: int | None = None):
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x: torch.Tensor, emb=None, context=None, context_mask=None) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Stage(nn.ModuleList):
    """A few blocks run in order with the shared ``(emb, context, context_mask)``; the unit of grad checkpointing.

    forward(h: (B, C, H, W), emb: (B, E), context: (B, M, Dc) | None, context_mask: (B, M) bool | None) -> (B, C', H', W')
    """

    def forward(
        self,
        h: torch.Tensor,
        emb: torch.Tensor,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        for block in self:
            h = block(h, emb, context, context_mask)
        return h
