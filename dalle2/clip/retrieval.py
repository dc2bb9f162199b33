"""Zero-shot image <-> text retrieval metrics (Recall@K, mean rank) and the contrastive loss over a whole set,
computed per query row in chunks: memory O(chunk_size x N), never an N x N matrix.

Every quantity is per query row (a rank, a cross-entropy term), so the rows can also be split over ranks and the
per-row values gathered (``rows=``; :meth:`dalle2.lit.clip_module.CLIPModule.on_validation_epoch_end`): each rank
then computes 1/W of the similarities.

**Ties** count as a uniformly random tie-break would, in expectation: with ``b`` keys strictly more similar to the
query than its own key and ``t`` other keys exactly as similar, the rank is uniform on ``b+1 .. b+t+1``, so the row
contributes ``clamp((k - b) / (t + 1), 0, 1)`` to R@k and ``b + 1 + t / 2`` to the mean rank.  Counting ties in the
query's favour (``1 + b``, the former rule) gave a collapsed or NaN model -- every similarity equal -- R@1 = 1.0;
counting them against it (``1 + b + t``) would give it 0, but would also push a perfect model to 0 wherever the data
hold duplicate captions (the built-in shapes data do).  The expectation is the only rule under which a model that
cannot tell the keys apart scores exactly chance (R@k = k / N, mean rank (N + 1) / 2), and exact duplicates score
what a retrieval system that returns one of them would.  Non-finite embeddings are an error
(:func:`check_finite`), never ranked.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "check_finite",
    "pair_rank_counts",
    "expected_hits",
    "expected_ranks",
    "pair_losses",
    "metrics_from_ranks",
    "retrieval_metrics",
    "contrastive_loss",
    "embedding_spread",
]


def check_finite(features: torch.Tensor, *, metric: str, what: str) -> None:
    """Raise ``ValueError`` naming ``metric``, ``what`` and how many rows hold NaN or inf (a diverged model must not
    be ranked: every comparison with NaN is False, which used to read as a perfect score)."""
    bad = ~torch.isfinite(features)
    if bad.any():
        rows = int(bad.reshape(len(features), -1).any(dim=1).sum()) if features.dim() > 1 else int(bad.sum())
        raise ValueError(
            f"{metric}: {rows} of {len(features)} {what} rows hold NaN/inf values (a diverged model?); "
            "refusing to rank them"
        )


def _rows(n: int, rows: torch.Tensor | None, device) -> torch.Tensor:
    return torch.arange(n, device=device) if rows is None else rows.to(device=device, dtype=torch.long)


def pair_rank_counts(
    queries: torch.Tensor, keys: torch.Tensor, *, rows: torch.Tensor | None = None, chunk_size: int = 256
) -> torch.Tensor:
    """queries, keys (N, D), query i matches key i -> (R, 2) long for each query i in ``rows`` (default all):
    column 0 the number of keys strictly more similar than key i, column 1 the number of OTHER keys exactly as
    similar (ties; see the module docstring for how they count)."""
    idx = _rows(queries.shape[0], rows, queries.device)
    out = []
    for start in range(0, len(idx), chunk_size):
        i = idx[start : start + chunk_size]
        sims = queries[i] @ keys.t()  # (C, N)
        correct = sims.gather(1, i[:, None])
        better = (sims > correct).sum(dim=1)
        ties = (sims == correct).sum(dim=1) - 1  # the matching key itself is equal to itself
        out.append(torch.stack([better, ties], dim=1))
    return torch.cat(out) if out else torch.zeros(0, 2, dtype=torch.long, device=queries.device)


def _as_counts(ranks: torch.Tensor) -> torch.Tensor:
    """(R, 2) counts as they are; (R,) 1-based ranks without ties -> counts ``(rank - 1, 0)``."""
    if ranks.dim() == 2 and ranks.shape[1] == 2:
        return ranks.long()
    if ranks.dim() != 1:
        raise ValueError(f"expected (R,) ranks or (R, 2) rank counts, got {tuple(ranks.shape)}")
    return torch.stack([ranks.long() - 1, torch.zeros_like(ranks, dtype=torch.long)], dim=1)


def expected_hits(counts: torch.Tensor, k: int) -> torch.Tensor:
    """(R, 2) rank counts -> (R,) float64: the probability that the row's key ranks within the first ``k`` under a
    uniformly random order of its ties, ``clamp((k - better) / (ties + 1), 0, 1)``."""
    c = _as_counts(counts).double()
    return ((k - c[:, 0]) / (c[:, 1] + 1.0)).clamp(0.0, 1.0)


def expected_ranks(counts: torch.Tensor) -> torch.Tensor:
    """(R, 2) rank counts -> (R,) float64 expected 1-based ranks under a random tie-break, ``1 + better + ties/2``."""
    c = _as_counts(counts).double()
    return 1.0 + c[:, 0] + 0.5 * c[:, 1]


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
    """Per-pair rank counts of both directions (:func:`pair_rank_counts`, (R, 2), any row order; or (R,) 1-based
    ranks without ties) -> R@k and mean rank, ties counted as a random tie-break would in expectation, and
    ``num_samples``."""
    out: dict[str, float] = {}

    def mean(values: torch.Tensor) -> float:  # summed in sorted order: the same float whatever order rows came in
        return values.sort().values.mean().item()

    for name, ranks in (("image_to_text", image_to_text), ("text_to_image", text_to_image)):
        for kk in ks:
            out[f"{name}_R@{kk}"] = mean(expected_hits(ranks, kk))
        out[f"{name}_mean_rank"] = mean(expected_ranks(ranks))
    out["num_samples"] = int(len(image_to_text))
    return out


def _check(image_features: torch.Tensor, text_features: torch.Tensor, metric: str) -> None:
    if image_features.shape != text_features.shape or image_features.dim() != 2:
        raise ValueError(
            f"image/text features must both be (N, D); got {tuple(image_features.shape)} "
            f"and {tuple(text_features.shape)}"
        )
    if image_features.shape[0] == 0:
        raise ValueError("retrieval needs at least one pair")
    check_finite(image_features, metric=metric, what="image embedding")
    check_finite(text_features, metric=metric, what="text embedding")


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
    "num_samples"}`` (ties: see the module docstring; NaN/inf rows raise ``ValueError``).  Memory is O(chunk_size
    x N)."""
    _check(image_features, text_features, "retrieval_metrics")
    img = F.normalize(image_features.float(), dim=-1)
    txt = F.normalize(text_features.float(), dim=-1)
    return metrics_from_ranks(
        pair_rank_counts(img, txt, chunk_size=chunk_size), pair_rank_counts(txt, img, chunk_size=chunk_size), ks=ks
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
    _check(image_features, text_features, "contrastive_loss")
    i2t = pair_losses(image_features, text_features, logit_scale, chunk_size=chunk_size)
    t2i = pair_losses(text_features, image_features, logit_scale, chunk_size=chunk_size)
    return 0.5 * (i2t.mean() + t2i.mean())


@torch.no_grad()
def embedding_spread(features: torch.Tensor) -> dict[str, float]:
    """features (N, D), N >= 2 -> how spread the unit-normalised embeddings are (a collapse detector):

    - ``mean_cosine``: the mean cosine similarity over all pairs i != j (1.0: every embedding points the same way);
    - ``std``: the per-dimension standard deviation of the unit vectors, averaged over dimensions and times sqrt(D)
      (about 1 for directions spread evenly over the sphere, 0 when they all coincide).

    Computed from the sum of the unit vectors (O(N D), no N x N matrix)."""
    if features.dim() != 2 or len(features) < 2:
        raise ValueError(f"embedding_spread needs (N, D) features with N >= 2, got {tuple(features.shape)}")
    u = F.normalize(features.double(), dim=-1)
    n, d = u.shape
    total = u.sum(dim=0)
    mean_cosine = (total.square().sum() - u.square().sum()) / (n * (n - 1))
    std = u.std(dim=0, unbiased=False).mean() * d**0.5
    return {"mean_cosine": float(mean_cosine), "std": float(std)}
