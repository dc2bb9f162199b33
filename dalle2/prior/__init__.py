"""The diffusion prior: text (CLIP text embedding + token features) -> CLIP image embedding."""

from dalle2.prior.network import PRIOR_PRESETS, EmbeddingScaler, PriorNetwork, RotaryEmbedding, prior_from_preset

__all__ = ["PRIOR_PRESETS", "EmbeddingScaler", "PriorNetwork", "RotaryEmbedding", "prior_from_preset"]
