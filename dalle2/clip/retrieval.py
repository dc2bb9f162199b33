"""Zero-shot image <-> text retrieval metrics (Recall@K, mean rank), computed in chunks."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _ranks(queries: torch.Tensor, keys: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """1-based rank of key i among all keys for query i (ties counted in the query's favour).  -> (N,) long"""
    ranks = []
    for start in range(0, queries.shape[0], chunk_size):
        q = queries[start : start + chunk_size]
        sims = q @ keys.t()  # (C, N)
        idx = torch.arange(start, start + q.shape[0], device=q.device)
        correct = sims.gather(1, idx[:, None])  # (C, 1)
        ranks.append((sims > correct).sum(dim=1) + 1)
    return torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long, device=queries.device)


@torch.no_grad()
def retrieval_metrics(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    *,
    ks: tuple[int, ...] = (1, 5, 10),
    chunk_size: int = 256,
) -> dict[str, float]:
    """image_features, text_features: (N, D), pair i matches pair i (cosine similarity; normalised here) ->
    ``{"image_to_text_R@1", ..., "text_to_image_R@10", "image_to_text_mean_rank", "text_to_image_mean_rank",
    "num_samples"}``.  Memory is O(chunk_size x N)."""
    if image_features.shape != text_features.shape or image_features.dim() != 2:
        raise ValueError(
            f"image/text features must both be (N, D); got {tuple(image_features.shape)} "
            f"and {tuple(text_features.shape)}"
        )
    n = image_features.shape[0]
    if n == 0:
        raise ValueError("retrieval_metrics needs at least one pair")
    img = F.normalize(image_features.float(), dim=-1)
    txt = F.normalize(text_features.float(), dim=-1)
    out: dict[str, float] = {}
    for name, q, k in (("image_to_text", img, txt), ("text_to_image", txt, img)):
        ranks = _ranks(q, k, chunk_size)
        for kk in ks:
            out[f"{name}_R@{kk}"] = (ranks <= kk).float().mean().item()
        out[f"{name}_mean_rank"] = ranks.float().mean().item()
    out["num_samples"] = n
    return out
