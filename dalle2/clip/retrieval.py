"""Zero-shot image <-> text retrieval metrics (Recall@K, mean rank) and the contrastive loss over a whole set,
computed per query row in chunks: memory O(chunk_size x N), never an N x N matrix.

Every quantity is per query row (a rank, a cross-entropy term), so the rows can also be split over ranks and the
per-row values gathered (``rows=``; :meth:`dalle2.lit.clip_module.CLIPModule.on_validation_epoch_end`): each rank
then computes 1/W of the similarities.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["pair_ranks", "pair_losses", "metrics_from_ranks", "retrieval_metrics", "contrastive_loss"]


def _rows(n: int, rows: torch.Tensor | None, device) -> torch.Tensor:
    return torch.arange(n, device=device) if rows is None else rows.to(device=device, dtype=torch.long)


def pair_ranks(
    queries: torch.Tensor, keys: torch.Tensor, *, rows: torch.Tensor | None = None, chunk_size: int = 256
) -> torch.Tensor:
    """queries, keys (N, D), query i matches key i -> (R,) long: the 1-based rank of key i among all keys for each
    query i in ``rows`` (default all), ties counted in the query's favour (1 + number of strictly better keys)."""
    idx = _rows(queries.shape[0], rows, queries.device)
    out = []
    for start in range(0, len(idx), chunk_size):
        i = idx[start : start + chunk_size]
        sims = queries[i] @ keys.t()  # (C, N)
        correct = sims.gather(1, i[:, None])
        out.append((sims > correct).sum(dim=1) + 1)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=queries.device)


def pair_losses(
    queries: torch.Tensor,
    keys: torch.Tensor,
    logit_scale: torch.Tensor | float,
    *,
    rows: torch.Tensor | None = None,
    chunk_size: int = 256,
) -> torch.Tensor:
    """(R,) cross-entropy terms ``logsumexp_j(s q_i.k_j) - s q_i.k_i`` of the rows ``rows`` (default all): the mean
    over all rows is ``F.cross_entropy(s Q K^T, arange(N))``."""
    idx = _rows(queries.shape[0], rows, queries.device)
    out = []
    for start in range(0, len(idx), chunk_size):
        i = idx[start : start + chunk_size]
        logits = logit_scale * (queries[i] @ keys.t())
        out.append(torch.logsumexp(logits, dim=1) - logits.gather(1, i[:, None]).squeeze(1))
    return torch.cat(out) if out else torch.zeros(0, device=queries.device)


def metrics_from_ranks(
    image_to_text: torch.Tensor, text_to_image: torch.Tensor, *, ks: tuple[int, ...] = (1, 5, 10)
) -> dict[str, float]:
    """Per-pair ranks of both directions (any order) -> R@k, mean rank and ``num_samples``."""
    out: dict[str, float] = {}
    for name, ranks in (("image_to_text", image_to_text), ("text_to_image", text_to_image)):
        for kk in ks:
            out[f"{name}_R@{kk}"] = (ranks <= kk).float().mean().item()
        out[f"{name}_mean_rank"] = ranks.float().mean().item()
    out["num_samples"] = int(image_to_text.numel())
    return out


def _check(image_features: torch.Tensor, text_features: torch.Tensor) -> None:
    if image_features.shape != text_features.shape or image_features.dim() != 2:
        raise ValueError(
            f"image/text features must both be (N, D); got {tuple(image_features.shape)} "
            f"and {tuple(text_features.shape)}"
        )
    if image_features.shape[0] == 0:
        raise ValueError("retrieval needs at least one pair")


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
    _check(image_features, text_features)
    img = F.normalize(image_features.float(), dim=-1)
    txt = F.normalize(text_features.float(), dim=-1)
    return metrics_from_ranks(
        pair_ranks(img, txt, chunk_size=chunk_size), pair_ranks(txt, img, chunk_size=chunk_size), ks=ks
    )


@torch.no_grad()
def contrastive_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    *,
    chunk_size: int = 256,
) -> torch.Tensor:
    """The symmetric InfoNCE of unit-norm features over the whole set, ``(CE(s I T^T) + CE(s T I^T)) / 2``, in
    chunks of query rows (memory O(chunk_size x N))."""
    _check(image_features, text_features)
    i2t = pair_losses(image_features, text_features, logit_scale, chunk_size=chunk_size)
    t2i = pair_losses(text_features, image_features, logit_scale, chunk_size=chunk_size)
    return 0.5 * (i2t.mean() + t2i.mean())
