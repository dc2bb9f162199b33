"""Pre-LN transformer blocks shared by the CLIP towers and the diffusion prior."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from dalle2.nn.attention import MLP, Attention


class ResidualAttentionBlock(nn.Module):
    """``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))`` (OpenAI CLIP's block; names ``ln_1``/``attn``/``ln_2``/``mlp``).

    forward(x: (B, N, D), mask: (B, N) bool | (B, 1|H, N, N) bool | None) -> (B, N, D)
    """

    def __init__(
        self,
        dim: int,
        *,
        heads: int,
        mlp_ratio: float = 4.0,
        causal: bool = False,
        activation: str = "gelu",
        dropout: float = 0.0,
    ):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads=heads, causal=causal, dropout=dropout)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, hidden_dim=int(dim * mlp_ratio), activation=activation, dropout=dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask=mask)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of ``ResidualAttentionBlock`` with optional gradient checkpointing.

    forward(x: (B, N, D), mask=None) -> (B, N, D)
    """

    def __init__(
        self,
        *,
        width: int,
        layers: int,
        heads: int,
        mlp_ratio: float = 4.0,
        causal: bool = False,
        activation: str = "gelu",
        dropout: float = 0.0,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        self.width, self.layers = width, layers
        self.grad_checkpointing = grad_checkpointing
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(
                width, heads=heads, mlp_ratio=mlp_ratio, causal=causal, activation=activation, dropout=dropout
            )
            for _ in range(layers)
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.resblocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, mask, use_reentrant=False)
            else:
                x = block(x, mask)
        return x
