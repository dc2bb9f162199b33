"""CLIP score: how well an image matches its prompt, by our CLIP.

``score = 100 * max(cos(image_emb, text_emb), 0)`` per pair (Hessel et al. 2021 with w = 100, as torchmetrics'
``CLIPScore``), reported as the mean over pairs.  torchmetrics' ``CLIPScore`` is tied to Hugging Face models, so the
per-pair score is computed here with any CLIP of ours (a stage=clip checkpoint or loaded OpenAI/open_clip weights);
the evaluator gathers the per-pair scores from every rank and averages them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["clip_score", "ClipScorer"]


def clip_score(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """image_emb (B, D), text_emb (B, D) (row i is pair i; any norm) -> scores (B,) in [0, 100]."""
    if image_emb.shape != text_emb.shape or image_emb.dim() != 2:
        raise ValueError(f"expected two (B, D) embeddings, got {tuple(image_emb.shape)} and {tuple(text_emb.shape)}")
    cos = F.cosine_similarity(image_emb.float(), text_emb.float(), dim=-1)
    return 100.0 * cos.clamp(min=0.0)


class ClipScorer(nn.Module):
    """Our CLIP + tokenizer as a scorer of (image, prompt) pairs.

    Args:
        clip: a ``CLIPModule`` (``dalle2.lit.clip_module.load_clip``): its ``encode_image`` takes [-1, 1] images.
        tokenizer: ``tokenizer(list_of_str, context_length=L) -> (B, L)`` (``dalle2.clip.tokenizer.get_tokenizer``).
    """

    def __init__(self, *, clip: nn.Module, tokenizer):
        super().__init__()
        self.clip = clip
        self.tokenizer = tokenizer

    @property
    def context_length(self) -> int:
        return int(self.clip.model.context_length)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, 3, H, W) in [-1, 1] -> image embeddings (B, D) float32 (not normalised)."""
        return self.clip.encode_image(images).float()

    @torch.no_grad()
    def encode_texts(self, prompts: Sequence[str]) -> torch.Tensor:
        """prompts: B strings -> text embeddings (B, D) float32 (not normalised)."""
        tokens = self.tokenizer(list(prompts), context_length=self.context_length)
        return self.clip.model.encode_text(tokens.to(next(self.clip.parameters()).device)).float()

    @torch.no_grad()
    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """images: (B, 3, H, W) in [-1, 1], prompts: B strings -> CLIP scores (B,) in [0, 100]."""
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        return clip_score(self.encode_images(images), self.encode_texts(prompts))
