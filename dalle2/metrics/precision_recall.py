"""Improved precision and recall (Kynkäänniemi et al. 2019, "Improved Precision and Recall Metric for Assessing
Generative Models"), on any feature vectors.  **Feature network here: the FID Inception-v3's pool3 features (2048-d),
the same features as FID/KID** -- the paper used VGG-16's fc2 features (4096-d), so our values are not comparable with
the paper's; they are with each other (:data:`PR_FEATURES` says so in every JSON).

**Equal set sizes by default**: the k-NN radii shrink as a set grows, so precision and recall are only defined for
sets of one size (the paper uses equal sizes).  With ``equal_sizes=True`` (the default) the larger set is cut to the
smaller one's size by a seeded draw (``seed``) before anything is computed.

Each set's manifold is the union of balls around its points, the radius of a point being the Euclidean distance to
its ``k``-th nearest neighbour in its own set (``k = 3`` in the paper; the point itself does not count).
precision = the fraction of generated points inside the real manifold, recall = the fraction of real points inside
the generated one.  A point lies inside when its distance to some point of the other set is <= that point's radius.

Memory: distances are computed ``chunk_size`` query rows at a time against the whole other set, so the largest
matrix is ``chunk_size x N`` (float64, squared distances from ``|a|² + |b|² - 2 a·b``, clamped at 0), never N x N.
"""

from __future__ import annotations

import torch

__all__ = ["PR_FEATURES", "equal_size_rows", "knn_radii", "inside_manifold", "precision_recall"]

PR_FEATURES = (
    "FID Inception-v3 pool3 (2048-d), the features of FID/KID; Kynkaenniemi et al. 2019 used VGG-16 fc2 (4096-d)"
)


def _sq_dists(a: torch.Tensor, b: torch.Tensor, b_sq: torch.Tensor) -> torch.Tensor:
    """(n, D), (m, D), (m,) -> (n, m) squared Euclidean distances, float64, >= 0."""
    return (a.square().sum(1, keepdim=True) + b_sq[None, :] - 2.0 * (a @ b.T)).clamp_(min=0.0)


def _check(feats: torch.Tensor, name: str) -> torch.Tensor:
    if feats.dim() != 2 or len(feats) == 0:
        raise ValueError(f"{name}: expected features (N, D) with N >= 1, got {tuple(feats.shape)}")
    return feats.double()


@torch.no_grad()
def knn_radii(feats: torch.Tensor, *, k: int = 3, chunk_size: int = 1024) -> torch.Tensor:
    """feats (N, D) -> (N,) float64: each row's distance to its ``k``-th nearest OTHER row."""
    x = _check(feats, "feats")
    if not 1 <= k < len(x):
        raise ValueError(f"k-NN radii need 1 <= k < N, got k={k} and N={len(x)}")
    x_sq = x.square().sum(1)
    out = torch.empty(len(x), dtype=torch.float64, device=x.device)
    for s in range(0, len(x), chunk_size):
        d = _sq_dists(x[s : s + chunk_size], x, x_sq)
        rows = torch.arange(len(d), device=x.device)
        d[rows, rows + s] = -1.0  # the point itself is the smallest (nearest neighbour 0); kthvalue(k + 1) skips it
        out[s : s + chunk_size] = d.kthvalue(k + 1, dim=1).values
    return out.clamp_(min=0.0).sqrt_()


@torch.no_grad()
def inside_manifold(
    query: torch.Tensor, ref: torch.Tensor, radii: torch.Tensor, *, chunk_size: int = 1024
) -> torch.Tensor:
    """query (Q, D), ref (N, D) with ``radii`` (N,) -> (Q,) bool: within ``radii[j]`` of some ``ref[j]``."""
    q, r = _check(query, "query"), _check(ref, "ref").to(query.device)
    if q.shape[1] != r.shape[1] or radii.shape != (len(r),):
        raise ValueError(
            f"shapes do not match: query {tuple(q.shape)}, ref {tuple(r.shape)}, radii {tuple(radii.shape)}"
        )
    r_sq, rad_sq = r.square().sum(1), radii.double().to(q.device).square()
    out = torch.empty(len(q), dtype=torch.bool, device=q.device)
    for s in range(0, len(q), chunk_size):
        out[s : s + chunk_size] = (_sq_dists(q[s : s + chunk_size], r, r_sq) <= rad_sq[None, :]).any(dim=1)
    return out


def equal_size_rows(n: int, m: int, *, seed: int = 0) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Row indices (sorted) that cut the larger of two sets of sizes ``n`` and ``m`` to the smaller size, drawn with
    a generator seeded with ``seed``; None for a set kept whole."""
    if n == m:
        return None, None
    g = torch.Generator().manual_seed(int(seed))
    pick = torch.randperm(max(n, m), generator=g)[: min(n, m)].sort().values
    return (pick, None) if n > m else (None, pick)


@torch.no_grad()
def precision_recall(
    real: torch.Tensor,
    fake: torch.Tensor,
    *,
    k: int = 3,
    chunk_size: int = 1024,
    real_radii: torch.Tensor | None = None,
    equal_sizes: bool = True,
    seed: int = 0,
) -> dict[str, float]:
    """real (N, D), fake (M, D) -> ``{"precision", "recall"}`` (see the module docstring).  ``real_radii`` may be
    given (cached with the real features: they depend on the real set and ``k`` only); they are recomputed when
    ``equal_sizes`` cuts the real set."""
    if real.dim() != 2 or fake.dim() != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"expected (N, D) and (M, D) features, got {tuple(real.shape)} and {tuple(fake.shape)}")
    if equal_sizes:
        real_rows, fake_rows = equal_size_rows(len(real), len(fake), seed=seed)
        if real_rows is not None:
            real, real_radii = real[real_rows.to(real.device)], None
        if fake_rows is not None:
            fake = fake[fake_rows.to(fake.device)]
    if real_radii is None:
        real_radii = knn_radii(real, k=k, chunk_size=chunk_size)
    fake_radii = knn_radii(fake, k=k, chunk_size=chunk_size)
    precision = inside_manifold(fake, real, real_radii, chunk_size=chunk_size).double().mean()
    recall = inside_manifold(real, fake.to(real.device), fake_radii.to(real.device), chunk_size=chunk_size)
    return {"precision": float(precision), "recall": float(recall.double().mean())}
