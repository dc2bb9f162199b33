"""Shared building blocks: attention (SDPA), transformer blocks, timestep embeddings, EMA, eval_mode."""

from dalle2.nn.attention import MLP, Attention, QuickGELU
from dalle2.nn.ema import EMA
from dalle2.nn.embeddings import TimestepEmbedding, timestep_embedding
from dalle2.nn.modes import eval_mode
from dalle2.nn.transformer import ResidualAttentionBlock, Transformer

__all__ = [
    "Attention",
    "EMA",
    "MLP",
    "QuickGELU",
    "ResidualAttentionBlock",
    "TimestepEmbedding",
    "Transformer",
    "eval_mode",
    "timestep_embedding",
]
