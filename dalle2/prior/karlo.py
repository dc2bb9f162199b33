"""Karlo's diffusion prior (Kakao Brain's unCLIP; diffusers' ``PriorTransformer``) on our blocks.

The sequence is ``[text tokens (L), text embedding, timestep, noised image embedding, prd]``: the CLIP token states
projected (``text_token_proj``), the pooled text embedding projected (``text_embed_proj``), the timestep's sinusoidal
features through a 2-layer MLP (``time_embed``), the noised embedding projected (``x_proj``) and a learned ``prd``
query token, plus learned positions.  Attention is causal and masks padded text; the output at the last (``prd``)
position, after ``ln_final`` and ``out_proj``, is the prediction (x0: Karlo's prior predicts the clean embedding).
The blocks are :class:`dalle2.prior.network.PriorBlock` (pre-LN, exact GELU MLP), the computation of diffusers'
``BasicTransformerBlock``.  Text positions sit at ``0..L-1`` and the four trailing ones at ``max_text_len + 0..3``,
so a text trimmed to its longest prompt gives the same output as the full 77 (padded keys are never attended).

Differences from our :class:`~dalle2.prior.network.PriorNetwork`, all Karlo's own:

* The diffusion space is CLIP's *raw* image embedding standardised by the training set's mean and std (``clip_mean``,
  ``clip_std``: buffers), not a unit vector times sqrt(D): :meth:`KarloPrior.embedding_scaler`.  Samples come back
  unnormalised, as Karlo's decoder takes them.
* Classifier-free guidance's unconditional branch is the CLIP encoding of the empty prompt (what Karlo's pipeline
  feeds): ``null_text_embed`` / ``null_text_tokens`` / ``null_text_mask``, written by the converter.  ``drop_text``
  rows use them, so our guidance wrapper gives the reference's guidance (and fine-tuning learns the null).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from dalle2.nn import TimestepEmbedding
from dalle2.nn.text_cond import substitute_null_text
from dalle2.prior.network import NUM_TRAILING_TOKENS, PriorBlock

__all__ = ["KarloPrior", "StandardizingScaler"]


class StandardizingScaler:
    """CLIP embedding <-> diffusion space for Karlo: ``(emb - mean) / std`` in, ``x * std + mean`` out (never unit
    normalised: Karlo's decoder takes raw CLIP embeddings).  Reads the network's ``clip_mean`` / ``clip_std`` at
    each call (they follow the network across devices)."""

    def __init__(self, net: KarloPrior):
        self.__dict__["_net"] = net  # a plain reference, not a submodule of whoever holds the scaler

    def scale_embed(self, emb: Tensor) -> Tensor:
        net = self._net
        return (emb.float() - net.clip_mean.float()) / net.clip_std.float()

    def unscale_embed(self, emb: Tensor, *, renormalize: bool = True) -> Tensor:
        """``renormalize`` is ignored: Karlo's embedding space is CLIP's raw one."""
        net = self._net
        return emb.float() * net.clip_std.float() + net.clip_mean.float()


class KarloPrior(nn.Module):
    """forward(x: (B, D), t: (B,), *, text_embed: (B, D), text_tokens: (B, L, Dt), text_mask: (B, L) bool | None,
    drop_text: (B,) bool | None) -> (B, D)."""

    arch = "karlo"
    raw_image_embed = True  # its space is CLIP's raw image embedding, standardised (never unit-normalised)

    def __init__(
        self,
        *,
        embed_dim: int,
        text_token_dim: int | None = None,
        heads: int,
        dim_head: int,
        depth: int,
        max_text_len: int = 77,
        dropout: float = 0.0,
        arch: str = "karlo",
    ):
        super().__init__()
        if arch != "karlo":
            raise ValueError(f"KarloPrior builds arch 'karlo', got {arch!r}")
        width = heads * dim_head
        text_token_dim = embed_dim if text_token_dim is None else text_token_dim
        self.config: dict[str, Any] = dict(
            arch="karlo",
            embed_dim=embed_dim,
            text_token_dim=text_token_dim,
            heads=heads,
            dim_head=dim_head,
            depth=depth,
            max_text_len=max_text_len,
            dropout=dropout,
        )
        self.embed_dim, self.text_token_dim, self.width = embed_dim, text_token_dim, width
        self.max_text_len = max_text_len
        self.time_embed = TimestepEmbedding(width, freq_dim=width)
        self.x_proj = nn.Linear(embed_dim, width)
        self.text_embed_proj = nn.Linear(embed_dim, width)
        self.text_token_proj = nn.Linear(text_token_dim, width)
        self.pos_embed = nn.Parameter(torch.zeros(max_text_len + NUM_TRAILING_TOKENS, width))
        self.prd_token = nn.Parameter(torch.zeros(width))
        self.blocks = nn.ModuleList(
            PriorBlock(width, heads=heads, dim_head=dim_head, mlp_ratio=4.0, dropout=dropout) for _ in range(depth)
        )
        self.ln_final = nn.LayerNorm(width)
        self.out_proj = nn.Linear(width, embed_dim)
        self.register_buffer("clip_mean", torch.zeros(embed_dim))
        self.register_buffer("clip_std", torch.ones(embed_dim))
        # the unconditional branch: the CLIP encoding of the empty prompt (set by the converter)
        self.null_text_embed = nn.Parameter(torch.zeros(embed_dim))
        self.null_text_tokens = nn.Parameter(torch.zeros(max_text_len, text_token_dim))
        null_mask = torch.zeros(max_text_len, dtype=torch.bool)
        null_mask[:2] = True  # start and end token
        self.register_buffer("null_text_mask", null_mask)

    def embedding_scaler(self) -> StandardizingScaler:
        return StandardizingScaler(self)

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        *,
        text_embed: Tensor,
        text_tokens: Tensor | None = None,
        text_mask: Tensor | None = None,
        drop_text: Tensor | None = None,
    ) -> Tensor:
        b = x.shape[0]
        dtype = self.x_proj.weight.dtype
        if text_tokens is None:
            if drop_text is None or not bool(torch.as_tensor(drop_text).all()):
                raise ValueError("Karlo's prior needs text_tokens (B, L, Dt) (or drop_text all True)")
            text_tokens = self.null_text_tokens[None].expand(b, -1, -1)
            text_mask = None
        if text_tokens.shape[-1] != self.text_token_dim:
            raise ValueError(f"text_tokens has width {text_tokens.shape[-1]}, expected {self.text_token_dim}")
        length = text_tokens.shape[1]
        valid = (
            torch.ones(b, length, dtype=torch.bool, device=x.device)
            if text_mask is None
            else text_mask.to(device=x.device, dtype=torch.bool)
        )
        if text_tokens.shape[1] > self.max_text_len:
            raise ValueError(f"text_tokens has length {text_tokens.shape[1]} > max_text_len {self.max_text_len}")
        text_embed, text_tokens, valid = substitute_null_text(
            drop_text,
            text_embed.to(x.device).float(),
            text_tokens.to(x.device).float(),
            valid,
            null_embed=self.null_text_embed,
            null_tokens=self.null_text_tokens,
            null_valid=self.null_text_mask,
        )
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0:
            t = t.expand(b)
        h = torch.cat(
            [
                self.text_token_proj(text_tokens.to(dtype)),
                self.text_embed_proj(text_embed.to(dtype))[:, None],
                self.time_embed(t).to(dtype)[:, None],
                self.x_proj(x.to(dtype))[:, None],
                self.prd_token.to(dtype)[None, None].expand(b, 1, -1),
            ],
            dim=1,
        )
        positions = torch.cat(
            [
                torch.arange(length, device=x.device),
                self.max_text_len + torch.arange(NUM_TRAILING_TOKENS, device=x.device),
            ]
        )
        h = h + self.pos_embed[positions].to(dtype)
        key_valid = torch.cat([valid, torch.ones(b, NUM_TRAILING_TOKENS, dtype=torch.bool, device=x.device)], dim=1)
        n = h.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        eye = torch.eye(n, dtype=torch.bool, device=x.device)  # padded rows see themselves: no empty softmax row
        mask = ((causal & key_valid[:, None, :]) | eye)[:, None]
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            h, _ = block(h, mask, None, None, i == last, False)  # the last block computes the prd row only
        return self.out_proj(self.ln_final(h[:, -1]))
