"""The diffusion prior's network: a causal transformer that maps (text, t, noised CLIP image embedding) to a prediction.

The sequence is ``[text tokens (L), text embedding, timestep, noised image embedding, query]`` and the output at the
final (query) position, after a final LayerNorm and a projection back to the CLIP dimension, is the prediction.
Whether that prediction is x0, eps or v is the diffusion's business; this network knows nothing of noise.

Attention is causal, so the text positions ``[text tokens; text embedding]`` never see ``t`` or ``x_t``: their keys and
values in every block (``encode_text`` -> ``TextPrefix``) are computed once per sampling run and each denoising step
runs only the 3 trailing positions (``CachedTextPrior``; ~(L + 4) / 3 times fewer FLOPs a step at text length L).
Training runs the same two passes, so cached and uncached outputs are the same function.

Classifier-free guidance: where ``drop_text`` is True the text embedding is replaced by a learned null embedding and
the text tokens by one learned null token (the other positions masked, so the unconditional branch does not depend on
the text length).  Guidance itself is a wrapper around the model function (``dalle2.diffusion.guidance``), not a
flag here.

``EmbeddingScaler`` holds the embedding normalisation: CLIP image embeddings are L2-normalised and multiplied by
``scale`` before diffusion; samples are divided by it (and optionally re-normalised) afterwards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dalle2.nn import MLP, Attention, TimestepEmbedding
from dalle2.nn.text_cond import project_text
from dalle2.presets import load_preset, preset_names

Positional = Literal["learned", "rotary"]

# Number of non-text tokens after the text: text embedding, timestep, noised image embedding, query.
NUM_TRAILING_TOKENS = 4

# Constructor kwargs per preset: dalle2/presets/model/prior/*.yaml (defined there only; ``embed_dim`` and
# ``text_token_dim`` are the CLIP's and may be overridden).
PRIOR_PRESETS: dict[str, dict[str, Any]] = {name: load_preset("prior", name) for name in preset_names("prior")}


# --------------------------------------------------------------------------------------------------------------------
# embedding normalisation


@dataclass(frozen=True)
class EmbeddingScaler:
    """L2-normalise then multiply by ``scale`` (into the diffusion's space); divide by it to come back.

    ``scale`` of about ``sqrt(D)`` gives unit-variance coordinates; ``EmbeddingScaler.for_dim(D)`` builds that.
    """

    scale: float

    def __post_init__(self):
        if not self.scale > 0:
            raise ValueError(f"EmbeddingScaler scale must be positive, got {self.scale}")

    @classmethod
    def for_dim(cls, dim: int) -> "EmbeddingScaler":
        return cls(scale=math.sqrt(dim))

    def scale_embed(self, emb: torch.Tensor) -> torch.Tensor:
        """emb: (..., D) raw CLIP embedding -> (..., D) with norm ``scale``."""
        return F.normalize(emb.float(), dim=-1) * self.scale

    def unscale_embed(self, emb: torch.Tensor, *, renormalize: bool = True) -> torch.Tensor:
        """emb: (..., D) in the diffusion's space -> (..., D) CLIP space (unit norm if ``renormalize``)."""
        out = emb.float() / self.scale
        return F.normalize(out, dim=-1) if renormalize else out


# --------------------------------------------------------------------------------------------------------------------
# rotary position embedding


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoFormer) over the whole head dimension, "rotate-half" layout.

    forward(positions: (N,) long) -> (cos, sin), each (N, dim_head) float32; apply with ``apply_rotary``.
    """

    def __init__(self, dim_head: int, *, base: float = 10000.0):
        super().__init__()
        if dim_head % 2:
            raise ValueError(f"rotary embeddings need an even head dimension, got {dim_head}")
        inv_freq = base ** (-torch.arange(0, dim_head, 2, dtype=torch.float32) / dim_head)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None]  # (N, dim_head / 2)
        freqs = torch.cat([freqs, freqs], dim=-1)
        return freqs.cos(), freqs.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, N, d); cos/sin: (N, d) -> (B, H, N, d), computed in float32, returned in x's dtype."""
    xf = x.float()
    return (xf * cos + _rotate_half(xf) * sin).to(x.dtype)


# --------------------------------------------------------------------------------------------------------------------
# transformer block


class PriorBlock(nn.Module):
    """Pre-LN block ``x + attn(ln_1(x))``, ``x + mlp(ln_2(x))`` with optional rotary q/k and cached keys/values.

    Reuses ``dalle2.nn.Attention`` for its projections; the attention itself runs here so that rotary embeddings
    and earlier positions' keys/values can enter.  forward(x: (B, N, W) new positions, mask: (B, 1, N, P + N) bool
    over [past; new] keys, rotary: (cos, sin) of the new positions | None, past: (k, v) (B, H, P, d) | None,
    last_only, kv_only) -> (out, (k, v) of the new positions).  ``out`` is (B, N, W); (B, 1, W) with ``last_only``
    (only the last position's output, which is all the network's final block has to compute); None with
    ``kv_only`` (only the keys and values, which is all the final block needs of the text positions).
    """

    def __init__(self, width: int, *, heads: int, dim_head: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads=heads, dim_head=dim_head, dropout=dropout)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = MLP(width, hidden_dim=int(width * mlp_ratio), dropout=dropout)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
        last_only: bool = False,
        kv_only: bool = False,
    ) -> tuple[torch.Tensor | None, tuple[torch.Tensor, torch.Tensor]]:
        attn, h = self.attn, self.ln_1(x)
        b, n, _ = h.shape
        heads, d = attn.heads, attn.dim_head
        inner = heads * d
        # rows of the fused qkv weight: [q; k; v]
        w, bias = attn.qkv.weight, attn.qkv.bias
        kv = F.linear(h, w[inner:], None if bias is None else bias[inner:])
        k, v = kv.view(b, n, 2, heads, d).permute(2, 0, 3, 1, 4)
        if rotary is not None:
            k = apply_rotary(k, *rotary)
        if kv_only:
            return None, (k, v)
        if last_only:
            h, mask = h[:, -1:], mask[..., -1:, :]
        n_out = h.shape[1]
        q = F.linear(h, w[:inner], None if bias is None else bias[:inner]).view(b, n_out, heads, d).transpose(1, 2)
        if rotary is not None:
            cos, sin = rotary
            q = apply_rotary(q, cos[-n_out:], sin[-n_out:])
        keys, values = (k, v) if past is None else (torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2))
        out = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, dropout_p=attn.dropout if self.training else 0.0
        )
        x = (x[:, -1:] if last_only else x) + attn.proj(out.transpose(1, 2).reshape(b, n_out, inner))
        return x + self.mlp(self.ln_2(x)), (k, v)


@dataclass
class TextPrefix:
    """What the causal prior computes of the text positions ``[text tokens (L); text embedding]``: their keys and
    values in every block (they attend only to each other, so they do not depend on ``x_t`` or ``t`` and can be
    computed once per sampling run, see :meth:`PriorNetwork.encode_text`) and which of them are valid keys."""

    keys: list[torch.Tensor]  # per block (B, heads, P, dim_head), P = L + 1
    values: list[torch.Tensor]
    valid: torch.Tensor  # (B, P) bool

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]


# --------------------------------------------------------------------------------------------------------------------
# the prior network


class PriorNetwork(nn.Module):
    """Decoder-only causal transformer over ``[text tokens, text emb, t, noised image emb, query]``.

    Positions: text token ``i`` sits at position ``i``; the four trailing tokens always sit at ``max_text_len + 0..3``
    so that their positions do not depend on the padded text length.

    forward(x: (B, D), t: (B,), *, text_embed: (B, D), text_tokens: (B, L, Dt) | None, text_mask: (B, L) bool | None,
            drop_text: (B,) bool | None) -> (B, D)
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        text_token_dim: int,
        width: int,
        depth: int,
        heads: int,
        dim_head: int = 64,
        mlp_ratio: float = 4,
        max_text_len: int = 77,
        positional: Positional = "learned",
        dropout: float = 0.0,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        if positional not in ("learned", "rotary"):
            raise ValueError(f"unknown positional {positional!r}; expected 'learned' or 'rotary'")
        self.embed_dim, self.text_token_dim, self.width = embed_dim, text_token_dim, width
        self.max_text_len, self.positional = max_text_len, positional
        self.grad_checkpointing = grad_checkpointing

        self.text_token_proj = nn.Linear(text_token_dim, width)
        self.text_embed_proj = nn.Linear(embed_dim, width)
        self.time_embed = TimestepEmbedding(width)
        self.x_proj = nn.Linear(embed_dim, width)
        self.query = nn.Parameter(torch.randn(width) * width**-0.5)
        # classifier-free guidance: learned null text embedding (CLIP space, unit-ish norm) and one null token (width)
        self.null_text_embed = nn.Parameter(torch.randn(embed_dim) * embed_dim**-0.5)
        self.null_text_token = nn.Parameter(torch.randn(width) * width**-0.5)

        n_pos = max_text_len + NUM_TRAILING_TOKENS
        if positional == "learned":
            self.pos_embed = nn.Parameter(torch.randn(n_pos, width) * 0.01)
            self.rotary = None
        else:
            self.register_parameter("pos_embed", None)
            self.rotary = RotaryEmbedding(dim_head)

        self.blocks = nn.ModuleList(
            PriorBlock(width, heads=heads, dim_head=dim_head, mlp_ratio=mlp_ratio, dropout=dropout)
            for _ in range(depth)
        )
        self.ln_final = nn.LayerNorm(width)
        self.out_proj = nn.Linear(width, embed_dim)

    # ----------------------------------------------------------------------------------------------------------------

    def _text_tokens(
        self,
        text_tokens: torch.Tensor,
        text_mask: torch.Tensor | None,
        drop_text: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> tokens (B, L, W), valid (B, L) bool; padded inputs zeroed, dropped rows replaced by null tokens."""
        b, length, dt = text_tokens.shape
        if length > self.max_text_len:
            raise ValueError(f"text_tokens has length {length} > max_text_len {self.max_text_len}")
        if dt != self.text_token_dim:
            raise ValueError(f"text_tokens has width {dt}, expected text_token_dim {self.text_token_dim}")
        if text_mask is None:
            valid = torch.ones(b, length, dtype=torch.bool, device=text_tokens.device)
        else:
            if text_mask.shape != (b, length):
                raise ValueError(f"text_mask shape {tuple(text_mask.shape)} != {(b, length)}")
            valid = text_mask.bool()
        return project_text(self.text_token_proj, text_tokens, valid, drop_text, self.null_text_token)

    def _attention_mask(self, key_valid: torch.Tensor) -> torch.Tensor:
        """key_valid: (B, N) bool -> (B, 1, N, N) bool: causal, valid keys only, and always the diagonal.

        The diagonal keeps every row (padded text rows included) non-empty, so SDPA never sees a fully masked row
        (which gives NaN that would leak through later layers' values).  Padded rows only see themselves, and no
        unpadded row ever sees a padded key, so padded content cannot reach the output.
        """
        n = key_valid.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=key_valid.device).tril()
        eye = torch.eye(n, dtype=torch.bool, device=key_valid.device)
        return ((causal & key_valid[:, None, :]) | eye)[:, None]

    def _position(
        self, h: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """Learned positions are added to ``h``; rotary ones are returned as (cos, sin) for the blocks."""
        if self.pos_embed is not None:
            return h + self.pos_embed[positions].to(h.dtype), None
        return h, self.rotary(positions)

    def _block(self, i: int, *args) -> tuple[torch.Tensor | None, tuple[torch.Tensor, torch.Tensor]]:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self.blocks[i], *args, use_reentrant=False)
        return self.blocks[i](*args)

    def encode_text(
        self,
        *,
        text_embed: torch.Tensor,
        text_tokens: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        drop_text: torch.Tensor | None = None,
    ) -> TextPrefix:
        """The text part of the sequence, ``[text tokens; text embedding]``, through every block -> its keys/values.

        ``forward(x, t, prefix=net.encode_text(...))`` equals ``forward(x, t, text_embed=..., ...)``; a sampler
        computes the prefix once and then runs only the 3 trailing positions per step (see :class:`CachedTextPrior`).
        """
        b, d = text_embed.shape
        if d != self.embed_dim:
            raise ValueError(f"text_embed has dim {d}, expected embed_dim {self.embed_dim}")
        dtype = self.x_proj.weight.dtype
        if drop_text is not None:
            drop_text = drop_text.to(device=text_embed.device, dtype=torch.bool).reshape(b)
        text_embed = F.normalize(text_embed.float(), dim=-1)
        if drop_text is not None:
            text_embed = torch.where(drop_text[:, None], self.null_text_embed.float()[None], text_embed)
        h = self.text_embed_proj(text_embed.to(dtype))[:, None]  # (B, 1, W)
        positions = torch.tensor([self.max_text_len], device=h.device)
        valid = torch.ones(b, 1, dtype=torch.bool, device=h.device)
        if text_tokens is not None:
            if text_tokens.shape[0] != b:
                raise ValueError(f"text_tokens has batch {text_tokens.shape[0]}, text_embed {b}")
            tokens, text_valid = self._text_tokens(text_tokens, text_mask, drop_text)
            h = torch.cat([tokens.to(h.dtype), h], dim=1)
            valid = torch.cat([text_valid, valid], dim=1)
            positions = torch.cat([torch.arange(tokens.shape[1], device=h.device), positions])
        h, rotary = self._position(h, positions)
        mask = self._attention_mask(valid)
        keys, values, last = [], [], len(self.blocks) - 1
        for i in range(len(self.blocks)):
            h, (k, v) = self._block(i, h, mask, rotary, None, False, i == last)
            keys.append(k)
            values.append(v)
        return TextPrefix(keys, values, valid)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        *,
        text_embed: torch.Tensor | None = None,
        text_tokens: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        drop_text: torch.Tensor | None = None,
        prefix: TextPrefix | None = None,
    ) -> torch.Tensor:
        """x: (B, D) noised (scaled) image embedding; t: (B,) timesteps; text_embed: (B, D) CLIP text embedding
        (L2-normalised here); text_tokens: (B, L, Dt) CLIP text-encoder token features; text_mask: (B, L) True for
        real tokens; drop_text: (B,) True to replace the text by the learned null text.  Or, instead of the text
        arguments, ``prefix``: their :meth:`encode_text`.  Returns (B, D)."""
        b, d = x.shape
        if d != self.embed_dim:
            raise ValueError(f"x has dim {d}, expected embed_dim {self.embed_dim}")
        if prefix is None:
            if text_embed is None:
                raise ValueError("the prior needs text_embed= (or prefix= from encode_text)")
            if text_embed.shape != (b, d):
                raise ValueError(f"text_embed shape {tuple(text_embed.shape)} != {(b, d)}")
            prefix = self.encode_text(
                text_embed=text_embed, text_tokens=text_tokens, text_mask=text_mask, drop_text=drop_text
            )
        elif prefix.batch_size != b:
            raise ValueError(f"prefix has batch {prefix.batch_size}, x has {b}")
        if t.dim() == 0:
            t = t.expand(b)
        dtype = self.x_proj.weight.dtype
        # the trailing positions: timestep, noised image embedding, query (the text embedding ends the prefix)
        h = torch.stack(
            [self.time_embed(t).to(dtype), self.x_proj(x.to(dtype)), self.query.to(dtype)[None].expand(b, -1)], dim=1
        )
        n = NUM_TRAILING_TOKENS - 1
        h, rotary = self._position(h, torch.arange(1, n + 1, device=x.device) + self.max_text_len)
        # rows: the trailing positions; keys: the valid prefix ones, then the trailing ones causally
        causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        mask = torch.cat([prefix.valid[:, None, :].expand(b, n, -1), causal[None].expand(b, -1, -1)], dim=2)[:, None]
        # only the last (query) position is read out, so the final block computes that position alone
        last = len(self.blocks) - 1
        for i in range(len(self.blocks)):
            h, _ = self._block(i, h, mask, rotary, (prefix.keys[i], prefix.values[i]), i == last, False)
        return self.out_proj(self.ln_final(h[:, -1]))


class CachedTextPrior:
    """A sampling-time wrapper of :class:`PriorNetwork` with the same call signature: the text prefix is computed
    once and reused while the text arguments stay equal (compared by value, so it also works under the CFG
    wrapper, which rebuilds the ``[cond; uncond]`` batch every step).  Each step then runs 3 positions instead of
    ``L + 4``.  Use it for one sampling run and drop it (it holds the prefix's keys/values)."""

    def __init__(self, network: PriorNetwork):
        self.network = network
        self._key: tuple | None = None
        self._prefix: TextPrefix | None = None

    @staticmethod
    def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
        if a is None or b is None:
            return a is b
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))

    def __call__(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        *,
        text_embed: torch.Tensor,
        text_tokens: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        drop_text: torch.Tensor | None = None,
    ) -> torch.Tensor:
        key = (text_embed, text_tokens, text_mask, drop_text)
        if self._key is None or not all(self._same(a, b) for a, b in zip(key, self._key)):
            self._prefix = self.network.encode_text(
                text_embed=text_embed, text_tokens=text_tokens, text_mask=text_mask, drop_text=drop_text
            )
            self._key = key
        return self.network(x, t, prefix=self._prefix)


def prior_from_preset(name: str, *, embed_dim: int | None = None, text_token_dim: int | None = None, **overrides):
    """Build a ``PriorNetwork`` from ``PRIOR_PRESETS[name]``; CLIP dims (and any other kwarg) override the preset."""
    if name not in PRIOR_PRESETS:
        raise ValueError(f"unknown prior preset {name!r}; expected one of {sorted(PRIOR_PRESETS)}")
    kwargs = dict(PRIOR_PRESETS[name])
    if embed_dim is not None:
        kwargs["embed_dim"] = embed_dim
    if text_token_dim is not None:
        kwargs["text_token_dim"] = text_token_dim
    kwargs.update(overrides)
    missing = [k for k in ("embed_dim", "text_token_dim") if k not in kwargs]
    if missing:
        raise ValueError(f"prior preset {name!r} needs {', '.join(missing)} (take them from the CLIP model)")
    return PriorNetwork(**kwargs)
