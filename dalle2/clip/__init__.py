"""CLIP: model (ViT / modified ResNet + causal text transformer), contrastive loss, retrieval metrics, weights.

The tokenizer lives in ``dalle2.clip.tokenizer`` (imported lazily by its users: it needs ``regex``/``ftfy``).
"""

from dalle2.clip.loss import ClipLoss
from dalle2.clip.model import (
    CLIP,
    CLIP_MEAN,
    CLIP_PRESETS,
    CLIP_STD,
    ModifiedResNet,
    TextFeatures,
    TextTransformer,
    VisionTransformer,
    clip_preset,
    preprocess_for_clip,
    text_mask,
)
from dalle2.clip.pretrained import load_clip_checkpoint, load_safetensors, save_safetensors
from dalle2.clip.retrieval import retrieval_metrics

__all__ = [
    "TextFeatures",
    "text_mask",
    "CLIP",
    "CLIP_MEAN",
    "CLIP_PRESETS",
    "CLIP_STD",
    "ClipLoss",
    "ModifiedResNet",
    "TextTransformer",
    "VisionTransformer",
    "clip_preset",
    "load_clip_checkpoint",
    "load_safetensors",
    "preprocess_for_clip",
    "retrieval_metrics",
    "save_safetensors",
]
