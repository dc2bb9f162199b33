"""Intervals on headline figures: the percentile bootstrap 95 % interval of a mean over per-image values (e.g. 0/1
verdicts), and the aggregation of one figure over several seeds.

    est = bootstrap_ci(verdicts)                     # {"mean", "lo", "hi", "n", "seeds": 1}
    est = over_seeds([verdicts_seed0, verdicts_seed1, verdicts_seed2])
    format_estimate(est, percent=True)               # "93.4 % [91.2, 95.3] (n=768, 3 seeds)"

Over seeds, the images are resampled within each seed (a stratified bootstrap) and the figure is the mean of the
per-seed means: the interval covers image-sampling noise of the whole set, not only that of one seed.  The
resampling is deterministic in ``seed``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["bootstrap_ci", "over_seeds", "fraction_ci", "format_estimate", "MIN_SEEDS"]

MIN_SEEDS = 3  # headline figures: at least this many seeds


def _clean(values) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64).ravel()
    if len(x) == 0:
        raise ValueError("bootstrap needs at least one value, got none")
    if not np.isfinite(x).all():
        raise ValueError(f"bootstrap got {int((~np.isfinite(x)).sum())} non-finite values of {len(x)}")
    return x


def over_seeds(per_seed: Sequence, *, level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> dict[str, float | int]:
    """The mean over seeds of each seed's mean of ``per_seed[s]`` (per-image values), with the percentile bootstrap
    ``level`` interval (images resampled with replacement within each seed, ``n_boot`` times).

    Returns ``{"mean", "lo", "hi", "n" (images, all seeds), "seeds", "level", "per_seed" (each seed's mean)}``.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    groups = [_clean(v) for v in per_seed]
    if not groups:
        raise ValueError("over_seeds needs at least one seed's values")
    rng = np.random.default_rng(seed)
    boots = np.zeros(n_boot)
    for x in groups:  # stratified: each seed's images resampled among themselves
        idx = rng.integers(0, len(x), size=(n_boot, len(x)))
        boots += x[idx].mean(axis=1)
    boots /= len(groups)
    per = [float(x.mean()) for x in groups]
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(boots, [alpha, 1.0 - alpha])
    mean = float(np.mean(per))
    return {
        "mean": mean,
        "lo": float(min(lo, mean)),
        "hi": float(max(hi, mean)),
        "n": int(sum(len(x) for x in groups)),
        "seeds": len(groups),
        "level": level,
        "per_seed": per,
    }


def bootstrap_ci(values, *, level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> dict[str, float | int]:
    """The mean of per-image ``values`` and its percentile bootstrap ``level`` interval (one seed)."""
    return over_seeds([values], level=level, n_boot=n_boot, seed=seed)


def fraction_ci(fractions: Sequence[float], counts: Sequence[int], **kw) -> dict[str, float | int]:
    """:func:`over_seeds` of 0/1 verdicts known only as a fraction and a count per seed (e.g. a metrics file's
    ``strict/all`` and ``num_samples``): the verdicts are rebuilt as round(fraction * count) ones, which is all the
    percentile bootstrap of a 0/1 mean looks at."""
    if len(fractions) != len(counts):
        raise ValueError(f"{len(fractions)} fractions but {len(counts)} counts")
    groups = []
    for p, n in zip(fractions, counts):
        n = int(n)
        if n < 1 or not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"a fraction in [0, 1] of n >= 1 verdicts, got {p} of {n}")
        ones = int(round(float(p) * n))
        groups.append(np.r_[np.ones(ones), np.zeros(n - ones)])
    return over_seeds(groups, **kw)


def format_estimate(est: dict, *, percent: bool = True, digits: int = 1) -> str:
    """``"93.4 % [91.2, 95.3] (n=768, 3 seeds)"`` (``percent``: values are fractions shown as %)."""
    k = 100.0 if percent else 1.0
    unit = " %" if percent else ""
    seeds = int(est.get("seeds", 1))
    return (
        f"{k * est['mean']:.{digits}f}{unit} [{k * est['lo']:.{digits}f}, {k * est['hi']:.{digits}f}] "
        f"(n={est['n']}, {seeds} seed{'s' if seeds != 1 else ''})"
    )
