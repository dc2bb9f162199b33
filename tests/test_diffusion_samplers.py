"""Samplers against analytic targets: for Gaussian (mixture) data the exact denoiser E[x0 | x_t] is closed form."""

from __future__ import annotations

import pytest
import torch

from dalle2.diffusion import (
    GaussianDiffusion,
    Schedule,
    ddim_invert,
    karras_timesteps,
    make_timesteps,
    sample,
    sample_ddim,
    sample_ddpm,
    static_clip,
)
from dalle2.diffusion.gaussian import eps_from_x0, v_from_x0_eps

SAMPLERS = ["ddpm", "ddim", "dpmpp_2m", "euler", "heun"]
# steps at which each sampler is within ~5% on the std of a N(mu, 0.5^2) target (first-order ones need more)
STEPS = {"ddpm": 200, "ddim": 100, "euler": 100, "dpmpp_2m": 25, "heun": 20}


def mixture_x0(x, abar, means, std, weights):
    """E[x0 | x_t] for x0 ~ sum_k w_k N(m_k, std^2 I), x_t = sqrt(abar) x0 + sqrt(1 - abar) eps."""
    a = abar.sqrt()
    var = abar * std**2 + (1 - abar)  # (B, 1)
    diff = x[:, None, :] - a[:, None] * means[None]  # (B, K, D)
    logits = weights.log()[None] - (diff**2).sum(-1) / (2 * var)
    r = torch.softmax(logits, dim=1)  # (B, K)
    comp = means[None] + (a * std**2 / var)[:, None] * diff
    return (r[..., None] * comp).sum(1)


def analytic_model(diffusion, means, std, weights=None):
    """A model_fn returning the exact prediction for diffusion.objective."""
    weights = torch.ones(len(means), dtype=means.dtype) / len(means) if weights is None else weights

    def model_fn(x, t):
        assert t.dtype == torch.int64
        abar = diffusion.alphas_cumprod.to(x.dtype)[t][:, None]
        x0 = mixture_x0(x, abar, means.to(x.dtype), std, weights.to(x.dtype))
        if diffusion.objective == "x0":
            return x0
        eps = eps_from_x0(x, x0, abar)
        return eps if diffusion.objective == "eps" else v_from_x0_eps(x0, eps, abar)

    return model_fn


def _diffusion(objective="eps", kind="linear", **kw):
    return GaussianDiffusion(schedule=Schedule.make(kind, 1000, **kw), objective=objective)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
def test_gaussian_target_moments(sampler, objective):
    d = _diffusion(objective)
    mu, s = torch.tensor([[0.5, -1.0]], dtype=torch.float64), 0.5
    model = analytic_model(d, mu, s)
    steps = STEPS[sampler]
    x = sample(
        model,
        (2000, 2),
        diffusion=d,
        sampler=sampler,
        steps=steps,
        generator=torch.Generator().manual_seed(0),
        dtype=torch.float64,
    )
    assert torch.allclose(x.mean(0), mu[0], atol=0.04), x.mean(0)
    assert torch.allclose(x.std(0), torch.full((2,), s, dtype=torch.float64), rtol=0.06), x.std(0)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_zero_terminal_snr_v(sampler):
    d = _diffusion("v", zero_terminal_snr=True)
    mu, s = torch.tensor([[0.3, 0.0]], dtype=torch.float64), 0.5
    x = sample(
        analytic_model(d, mu, s),
        (2000, 2),
        diffusion=d,
        sampler=sampler,
        steps=STEPS[sampler],
        generator=torch.Generator().manual_seed(1),
        dtype=torch.float64,
    )
    assert torch.isfinite(x).all()
    assert torch.allclose(x.mean(0), mu[0], atol=0.06) and torch.allclose(
        x.std(0), torch.full((2,), s, dtype=torch.float64), rtol=0.1
    )


def test_ddim_deterministic_and_invertible():
    d = _diffusion("eps", kind="cosine")
    model = analytic_model(d, torch.tensor([[1.0, -1.0], [-1.0, 0.5]], dtype=torch.float64), 0.4)
    x_T = torch.randn(64, 2, dtype=torch.float64)
    ts = make_timesteps(d, 50, "uniform")
    a = sample_ddim(model, x_T, ts, diffusion=d)
    b = sample_ddim(model, x_T, ts, diffusion=d, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    back = ddim_invert(model, a, ts, diffusion=d, fixed_point_iters=20)
    assert (back - x_T).abs().max().item() < 1e-6


def test_reproducible_per_seed_and_callback():
    d = _diffusion("eps")
    model = analytic_model(d, torch.zeros(1, 3, dtype=torch.float64), 1.0)
    seen = []
    a = sample(
        model,
        (4, 3),
        diffusion=d,
        sampler="ddpm",
        steps=10,
        generator=torch.Generator().manual_seed(7),
        callback=lambda info: seen.append(info["t"]),
    )
    b = sample(model, (4, 3), diffusion=d, sampler="ddpm", steps=10, generator=torch.Generator().manual_seed(7))
    c = sample(model, (4, 3), diffusion=d, sampler="ddpm", steps=10, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert seen == make_timesteps(d, 10).tolist() and seen[0] == 999


def _ode_error(sampler, steps, d, model, x_T, ref, spacing=None):
    x = sample(model, x_T, diffusion=d, sampler=sampler, steps=steps, spacing=spacing, dtype=torch.float64)
    return (x - ref).abs().mean().item()


def test_dpmpp_2m_beats_ddim_on_mixture():
    d = _diffusion("eps", kind="cosine")
    means = torch.tensor([[1.5, 0.0], [-1.5, 0.5]], dtype=torch.float64)
    model = analytic_model(d, means, 0.3)
    x_T = torch.randn(128, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = sample(model, x_T, diffusion=d, sampler="heun", steps=1000, spacing="uniform", dtype=torch.float64)
    e_ddim = _ode_error("ddim", 20, d, model, x_T, ref, "trailing")
    e_dpm = _ode_error("dpmpp_2m", 20, d, model, x_T, ref, "trailing")
    e_heun = _ode_error("heun", 10, d, model, x_T, ref, "trailing")
    assert e_dpm < 0.5 * e_ddim, (e_dpm, e_ddim)
    assert e_heun < e_ddim, (e_heun, e_ddim)
    # converges: error shrinks with steps
    assert _ode_error("dpmpp_2m", 50, d, model, x_T, ref, "trailing") < e_dpm


def test_ddpm_learned_variance_lower_bound_equals_fixed_small():
    """v = -1 is beta-tilde (fixed small), so DDPM with that learned variance equals the plain one."""
    d = _diffusion("eps")
    d_lv = GaussianDiffusion(schedule=d.schedule, objective="eps", learned_variance=True)
    base = analytic_model(d, torch.zeros(1, 2, dtype=torch.float64), 0.7)
    lv_model = lambda x, t: torch.cat([base(x, t), -torch.ones_like(x)], dim=1)  # noqa: E731
    ts = make_timesteps(d, 15)
    x_T = torch.randn(8, 2, dtype=torch.float64)
    a = sample_ddpm(base, x_T, ts, diffusion=d, generator=torch.Generator().manual_seed(0))
    b = sample_ddpm(lv_model, x_T, ts, diffusion=d_lv, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(a, b, atol=1e-10)
    # v = +1 (beta') differs
    lv_hi = lambda x, t: torch.cat([base(x, t), torch.ones_like(x)], dim=1)  # noqa: E731
    c = sample_ddpm(lv_hi, x_T, ts, diffusion=d_lv, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(a, c)


def test_x0_transform_applied():
    d = _diffusion("x0")
    model = analytic_model(d, torch.full((1, 2), 3.0, dtype=torch.float64), 0.1)
    for sampler in SAMPLERS:
        x = sample(
            model,
            (16, 2),
            diffusion=d,
            sampler=sampler,
            steps=8,
            x0_transform=static_clip,
            generator=torch.Generator().manual_seed(0),
            dtype=torch.float64,
        )
        assert x.abs().max().item() <= 1.0 + 1e-6, sampler


def test_timesteps_choices():
    s = Schedule.make("linear", 1000)
    for n in [1, 5, 20, 100, 999]:
        ts = karras_timesteps(s, n)
        assert len(ts) == n and bool((ts[1:] < ts[:-1]).all()) and int(ts[-1]) >= 0
    with pytest.raises(ValueError, match="descending"):
        sample_ddim(lambda x, t: x, torch.zeros(1, 1), [1, 5], diffusion=_diffusion())
    with pytest.raises(ValueError, match="unknown sampler"):
        sample(lambda x, t: x, (1, 1), diffusion=_diffusion(), sampler="plms", steps=3)


def test_image_shaped_and_kwargs():
    d = _diffusion("v", kind="cosine")
    calls = []

    def model(x, t, *, emb):
        calls.append(x.shape)
        return torch.zeros_like(x) + emb[:, :, None, None]

    x = sample(model, (2, 3, 4, 4), diffusion=d, sampler="dpmpp_2m", steps=5, model_kwargs={"emb": torch.zeros(2, 3)})
    assert x.shape == (2, 3, 4, 4) and len(calls) == 5 and torch.isfinite(x).all()
