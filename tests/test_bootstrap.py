"""dalle2.metrics.bootstrap: percentile bootstrap intervals over per-image verdicts, aggregated over seeds."""

from __future__ import annotations

import numpy as np
import pytest

from dalle2.metrics.bootstrap import bootstrap_ci, format_estimate, fraction_ci, over_seeds


def test_a_constant_input_has_a_zero_width_interval():
    for value in (0.0, 1.0, 0.25):
        est = bootstrap_ci(np.full(50, value))
        assert est["mean"] == est["lo"] == est["hi"] == value and est["n"] == 50 and est["seeds"] == 1


def test_a_bernoulli_sample_interval_covers_p_about_95_percent_of_the_time():
    p, n, trials = 0.3, 150, 120
    rng = np.random.default_rng(0)
    covered = widths = 0
    for t in range(trials):
        est = bootstrap_ci(rng.random(n) < p, n_boot=300, seed=t)
        covered += est["lo"] <= p <= est["hi"]
        widths += est["hi"] - est["lo"]
    assert 0.88 <= covered / trials <= 1.0  # nominal 95 % (120 trials: 0.88 is > 3 standard errors below)
    expected = 2 * 1.96 * np.sqrt(p * (1 - p) / n)  # the normal approximation's width
    assert abs(widths / trials - expected) < 0.2 * expected


def test_seeds_pool_images_and_narrow_the_interval():
    rng = np.random.default_rng(1)
    seeds = [rng.random(100) < 0.8 for _ in range(3)]
    one = bootstrap_ci(seeds[0])
    three = over_seeds(seeds)
    assert three["seeds"] == 3 and three["n"] == 300 and len(three["per_seed"]) == 3
    assert three["mean"] == pytest.approx(np.mean([s.mean() for s in seeds]))
    assert three["lo"] <= three["mean"] <= three["hi"]
    assert three["hi"] - three["lo"] < one["hi"] - one["lo"]
    text = format_estimate(three)
    assert text.startswith(f"{100 * three['mean']:.1f} % [") and "(n=300, 3 seeds)" in text


def test_degenerate_inputs_are_errors():
    with pytest.raises(ValueError, match="non-finite"):
        bootstrap_ci([1.0, np.nan, 0.0])
    with pytest.raises(ValueError, match="at least one value"):
        bootstrap_ci([])
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci([1.0], level=1.5)


def test_fraction_ci_equals_the_bootstrap_of_the_verdicts_it_stands_for():
    verdicts = np.r_[np.ones(30), np.zeros(10)]
    assert fraction_ci([0.75], [40]) == bootstrap_ci(verdicts)
    with pytest.raises(ValueError, match="fraction in"):
        fraction_ci([1.5], [10])


def test_sweep_rows_merge_seeds_and_carry_the_interval():
    from dalle2.sweep import sampling_rows

    def job(name, seed, strict, guidance=2.0):
        return {
            "job": name,
            "status": "finished",
            "overrides": {"seed": str(seed), "guidance.decoder": str(guidance)},
            "settings": {"decoder": {"guidance_scale": guidance, "sampler": "ddim", "steps": 10}},
            "metrics": {"checker/strict/all": strict, "checker/num_samples": 64, "clip_score": 20.0 + seed},
        }

    rows = sampling_rows([job("0", 0, 0.5), job("1", 1, 0.75), job("2", 2, 1.0), job("3", 0, 0.25, guidance=3.0)])
    by = {r["guidance"]: r for r in rows}
    three = by[2.0]
    assert three["seeds"] == 3 and three["job"] == "0,1,2" and three["checked"] == 192
    assert three["strict_all"] == pytest.approx(0.75) and three["clip_score"] == pytest.approx(21.0)
    assert three["strict_all_lo"] < 0.75 < three["strict_all_hi"]
    assert by[3.0]["seeds"] == 1 and by[3.0]["strict_all"] == 0.25
