"""FID / KID on precomputed features (torchmetrics machinery): zero on a set with itself, the scipy sqrtm formula,
closed forms, and a sane, reproducible, order-independent KID."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchmetrics.image.kid import KernelInceptionDistance

from dalle2.metrics.fid import PrecomputedFeatures, frechet_distance, kernel_distance
from helpers.fid_reference import scipy_fid


def _features(n: int, d: int, *, seed: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    mix = torch.randn(d, d, generator=torch.Generator().manual_seed(1000)) / d**0.5  # correlated features
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g) @ mix) * scale + shift


def test_fid_of_a_set_with_itself_is_zero():
    a = _features(300, 32, seed=0)
    assert abs(frechet_distance(a, a)) < 1e-6
    assert frechet_distance(a, _features(300, 32, seed=1, scale=1.5)) > 0.1


@pytest.mark.parametrize("n,m,d", [(400, 300, 16), (200, 250, 64)])
def test_fid_matches_scipy_sqrtm_reference(n, m, d):
    a = _features(n, d, seed=1)
    b = _features(m, d, seed=2, scale=1.3, shift=0.2)
    ref = scipy_fid(a, b)
    assert ref > 0.5
    assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-6, abs=1e-8)


def test_fid_closed_form_of_a_shift():
    a = _features(500, 8, seed=3).double()
    c = torch.linspace(-1, 1, 8, dtype=torch.float64)  # same covariance: FID = |c|^2
    assert frechet_distance(a, a + c) == pytest.approx(float((c**2).sum()), rel=1e-7)


def test_fid_input_checks():
    with pytest.raises(ValueError, match=">= 2 samples"):
        frechet_distance(torch.zeros(1, 4), torch.zeros(5, 4))
    with pytest.raises(ValueError, match="two feature sets"):
        frechet_distance(torch.zeros(5, 4), torch.zeros(5, 3))


def test_kid_sane_reproducible_and_order_free():
    a, a2 = _features(400, 32, seed=4), _features(400, 32, seed=5)  # same distribution
    b = _features(400, 32, seed=6, scale=1.5, shift=0.3)
    same, same_std = kernel_distance(a, a2, subsets=20, subset_size=200)
    diff, diff_std = kernel_distance(a, b, subsets=20, subset_size=200)
    assert abs(same) < 3 * same_std + 1e-3
    assert diff > 10 * abs(same) and diff > 3 * diff_std
    # deterministic for a seed, and independent of the order the rows arrive in (rank / batch order)
    assert kernel_distance(a, b, subsets=20, subset_size=200) == (diff, diff_std)
    shuffled = kernel_distance(a[torch.randperm(400)], b[torch.randperm(400)], subsets=20, subset_size=200)
    assert shuffled == pytest.approx((diff, diff_std), rel=1e-9)
    assert kernel_distance(a, b, subsets=20, subset_size=200, seed=1) != (diff, diff_std)
    # subset_size larger than a set is clamped instead of raising
    assert np.isfinite(kernel_distance(a[:30], b, subset_size=1000)[0])


def test_kid_equals_torchmetrics_on_whole_sets():
    """With one subset holding every row the subset draw is a permutation: ours == stock torchmetrics KID."""
    a, b = _features(120, 16, seed=7), _features(120, 16, seed=8, shift=0.5)
    stock = KernelInceptionDistance(feature=PrecomputedFeatures(16), subsets=1, subset_size=120)
    stock.update(a.double(), real=True)
    stock.update(b.double(), real=False)
    ours = kernel_distance(a, b, subsets=1, subset_size=120)
    assert ours[0] == pytest.approx(float(stock.compute()[0]), rel=1e-9)
