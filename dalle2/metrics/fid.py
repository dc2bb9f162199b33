"""Fréchet and kernel distances between two sets of image features (FID / KID, and the same on CLIP features).

The statistics and distances are torchmetrics' (``FrechetInceptionDistance`` accumulates sums and cross products in
float64 and takes ``tr sqrt(S1 S2)`` from the eigenvalues of ``S1 S2``; ``KernelInceptionDistance`` is the unbiased
MMD² with the cubic polynomial kernel averaged over random subsets).  Features are computed once by our extractors
(:class:`~dalle2.metrics.inception.FIDInceptionV3` for FID/KID, the CLIP image tower for CLIP-FD/CLIP-KID) and fed
to the metrics through an identity "feature" module, so one pass of each network serves both distances.

Distributed: call these on features already gathered from every rank (``dalle2.distributed.gather_ragged``)
and put in a canonical order (by sample index): the result is then the same at any world size — never an
average of per-rank distances.  :class:`OrderedKID` draws its subsets from a seeded generator after sorting the
rows canonically, so KID does not depend on the order features arrived in either.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance, poly_mmd
from torchmetrics.utilities import dim_zero_cat

__all__ = [
    "PrecomputedFeatures",
    "OrderedKID",
    "frechet_distance",
    "kernel_distance",
    "make_fid",
    "gaussian_stats",
    "frechet_distance_from_stats",
]


class PrecomputedFeatures(nn.Module):
    """The identity, with ``num_features`` set: lets torchmetrics' image metrics take features (N, D) directly."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features: (N, D) -> (N, D)."""
        if features.dim() != 2 or features.shape[1] != self.num_features:
            raise ValueError(f"expected features (N, {self.num_features}), got {tuple(features.shape)}")
        return features


def make_fid(num_features: int, **kwargs) -> FrechetInceptionDistance:
    """torchmetrics FID over precomputed (N, num_features) features: ``m.update(feats, real=True/False)``."""
    return FrechetInceptionDistance(feature=PrecomputedFeatures(num_features), **kwargs)


class OrderedKID(KernelInceptionDistance):
    """torchmetrics KID over precomputed features, made reproducible.

    - rows of each set are sorted by their projection on a fixed random direction before subsets are drawn, so the
      arrival order (rank count, batch order) does not matter;
    - subsets come from a generator seeded with ``seed``;
    - ``subset_size`` is clamped to the smaller set (torchmetrics raises instead), and the kernel runs in float64.
    """

    def __init__(self, num_features: int, *, subsets: int = 100, subset_size: int = 1000, seed: int = 0, **kwargs):
        with warnings.catch_warnings():  # "will save all extracted features in buffer": that is the point here
            warnings.filterwarnings("ignore", message=".*save all extracted features.*")
            super().__init__(
                feature=PrecomputedFeatures(num_features), subsets=subsets, subset_size=subset_size, **kwargs
            )
        self.seed = int(seed)
        self.num_features = int(num_features)

    def _canonical(self, feats: torch.Tensor) -> torch.Tensor:
        g = torch.Generator().manual_seed(12345)
        direction = torch.randn(self.num_features, generator=g, dtype=torch.float64).to(feats.device)
        return feats[torch.argsort(feats @ direction, stable=True)]

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        real = self._canonical(dim_zero_cat(self.real_features).double())
        fake = self._canonical(dim_zero_cat(self.fake_features).double())
        n = min(self.subset_size, len(real), len(fake))
        if n < 2:
            raise ValueError(f"KID needs >= 2 samples in each set, got {len(real)} real and {len(fake)} fake")
        g = torch.Generator().manual_seed(self.seed)
        scores = []
        for _ in range(self.subsets):
            f_real = real[torch.randperm(len(real), generator=g)[:n].to(real.device)]
            f_fake = fake[torch.randperm(len(fake), generator=g)[:n].to(fake.device)]
            scores.append(poly_mmd(f_real, f_fake, self.degree, self.gamma, self.coef))
        kid = torch.stack(scores)
        return kid.mean(), kid.std(unbiased=False)


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected two feature sets (N, D) and (M, D), got {tuple(a.shape)} and {tuple(b.shape)}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"a Fréchet distance needs >= 2 samples per set, got {len(a)} and {len(b)}")


@torch.no_grad()
def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to ``real`` (N, D) and ``fake`` (M, D) features (FID when the
    features are Inception pool3): ``|mu_r - mu_f|² + tr(S_r + S_f - 2 (S_r S_f)^½)``, via torchmetrics."""
    _check_pair(real, fake)
    metric = make_fid(real.shape[1], sync_on_compute=False).to(real.device)
    metric.update(real.double(), real=True)
    metric.update(fake.double().to(real.device), real=False)
    return float(metric.compute())


@torch.no_grad()
def gaussian_stats(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """feats (N, D), N >= 2 -> mean (D,) and unbiased covariance (D, D), float64 (torchmetrics' FID statistics)."""
    if feats.dim() != 2 or len(feats) < 2:
        raise ValueError(f"Gaussian statistics need features (N, D) with N >= 2, got {tuple(feats.shape)}")
    x = feats.double()
    mu = x.mean(0)
    centred = x - mu
    return mu, centred.T @ centred / (len(x) - 1)


@torch.no_grad()
def frechet_distance_from_stats(
    mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor
) -> float:
    """The Fréchet distance of two Gaussians (cached reference statistics against a sample's), with torchmetrics'
    formula: ``|mu1 - mu2|² + tr S1 + tr S2 - 2 sum sqrt(eigvals(S1 S2))``, in float64."""
    mu1, s1, mu2, s2 = (t.double() for t in (mu1, sigma1, mu2.to(mu1.device), sigma2.to(mu1.device)))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise ValueError(
            f"statistics do not match: {tuple(mu1.shape)}, {tuple(s1.shape)}, {tuple(mu2.shape)}, {tuple(s2.shape)}"
        )
    root = torch.linalg.eigvals(s1 @ s2).sqrt().real.sum()
    return float((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2.0 * root)


@torch.no_grad()
def kernel_distance(
    real: torch.Tensor, fake: torch.Tensor, *, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """KID (mean, std over ``subsets`` random subsets of ``min(subset_size, N, M)`` rows) between (N, D) and (M, D)
    features: unbiased MMD² with the kernel ``(x·y / D + 1)³``, via torchmetrics."""
    _check_pair(real, fake)
    metric = OrderedKID(real.shape[1], subsets=subsets, subset_size=subset_size, seed=seed, sync_on_compute=False)
    metric = metric.to(real.device)
    metric.update(real, real=True)
    metric.update(fake.to(real.device), real=False)
    mean, std = metric.compute()
    return float(mean), float(std)
