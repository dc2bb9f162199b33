"""Multi-head attention through ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels on GPU)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


class QuickGELU(nn.Module):
    """OpenAI CLIP's activation, ``x * sigmoid(1.702 x)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def make_activation(name: Literal["gelu", "quick_gelu", "silu"]) -> nn.Module:
    if name == "gelu":
        return nn.GELU()
    if name == "quick_gelu":
        return QuickGELU()
    if name == "silu":
        return nn.SiLU()
    raise ValueError(f"unknown activation {name!r}; expected 'gelu', 'quick_gelu' or 'silu'")


class MLP(nn.Module):
    """Transformer feed-forward: ``fc -> act -> proj`` (OpenAI CLIP names: ``c_fc``/``c_proj``)."""

    def __init__(self, dim: int, *, hidden_dim: int, activation: str = "gelu", dropout: float = 0.0):
        super().__init__()
        self.fc = nn.Linear(dim, hidden_dim)
        self.act = make_activation(activation)
        self.drop = nn.Dropout(dropout)
        self.proj = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.drop(self.act(self.fc(x))))


class Attention(nn.Module):
    """Multi-head (self- or cross-) attention.

    Self-attention uses one fused ``qkv`` projection (the layout of ``nn.MultiheadAttention.in_proj_weight``,
    so OpenAI CLIP weights map onto it directly); cross-attention (``context_dim`` given) uses ``q`` and ``kv``.

    forward(x: (B, N, D), context: (B, M, Dc) | None, mask: (B, M) bool | (B, 1|H, N, M) bool | None) -> (B, N, D)
    ``mask`` is True where attention is *allowed*.  ``causal=True`` adds a lower-triangular mask.
    """

    def __init__(
        self,
        dim: int,
        *,
        heads: int,
        dim_head: int | None = None,
        context_dim: int | None = None,
        causal: bool = False,
        qkv_bias: bool = True,
        dropout: float = 0.0,
    ):
        super().__init__()
        if dim_head is None:
            if dim % heads:
                raise ValueError(f"dim {dim} is not divisible by heads {heads}")
            dim_head = dim // heads
        self.heads, self.dim_head, self.causal, self.dropout = heads, dim_head, causal, dropout
        inner = heads * dim_head
        self.cross = context_dim is not None
        if self.cross:
            self.q = nn.Linear(dim, inner, bias=qkv_bias)
            self.kv = nn.Linear(context_dim, 2 * inner, bias=qkv_bias)
        else:
            self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        self.proj = nn.Linear(inner, dim)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        b, n, _ = x.shape
        h, d = self.heads, self.dim_head
        if self.cross:
            if context is None:
                raise ValueError("cross-attention needs a context tensor")
            q = self.q(x).view(b, n, h, d).transpose(1, 2)
            k, v = self.kv(context).view(b, context.shape[1], 2, h, d).permute(2, 0, 3, 1, 4)
        else:
            q, k, v = self.qkv(x).view(b, n, 3, h, d).permute(2, 0, 3, 1, 4)
        attn_mask = None
        if mask is not None:
            attn_mask = mask[:, None, None, :] if mask.dim() == 2 else mask
            if self.causal:
                causal = torch.ones(n, k.shape[2], dtype=torch.bool, device=x.device).tril()
                attn_mask = attn_mask & causal
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=self.causal and attn_mask is None,
        )
        return self.proj(out.transpose(1, 2).reshape(b, n, h * d))
