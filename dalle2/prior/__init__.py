"""The diffusion prior: text (CLIP text embedding + token features) -> CLIP image embedding."""

from dalle2.prior.network import (
    PRIOR_PRESETS,
    CachedTextPrior,
    EmbeddingScaler,
    PriorNetwork,
    RotaryEmbedding,
    TextPrefix,
    prior_from_preset,
)
from dalle2.prior.sampling import rerank_by_similarity, sample_prior, sample_prior_candidates

__all__ = [
    "PRIOR_PRESETS",
    "CachedTextPrior",
    "EmbeddingScaler",
    "PriorNetwork",
    "RotaryEmbedding",
    "TextPrefix",
    "prior_from_preset",
    "rerank_by_similarity",
    "sample_prior",
    "sample_prior_candidates",
]
