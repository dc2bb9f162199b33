"""Schedules, GaussianDiffusion (forward process, conversions, losses), guidance, low-res augmentation."""

from __future__ import annotations

import math

import pytest
import torch

from dalle2.diffusion import (
    GaussianDiffusion,
    LowResAugmentation,
    Schedule,
    cfg_model_fn,
    dynamic_threshold,
    gaussian_blur,
    make_betas,
    respace_timesteps,
    static_clip,
)

# -- schedules ---------------------------------------------------------------------------------------------


def test_cosine_matches_formula():
    T, s = 1000, 0.008
    f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    abar = Schedule.make("cosine", T).alphas_cumprod
    for t in [0, 1, 10, 500, 900]:
        expected = f((t + 1) / T) / f(0)
        assert abar[t].item() == pytest.approx(expected, rel=1e-10)
    assert make_betas("cosine", T).max().item() == pytest.approx(0.999)
    assert make_betas("cosine", T).dtype == torch.float64


def test_linear_and_sigmoid():
    b = make_betas("linear", 1000)
    assert torch.allclose(b, torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))
    assert torch.allclose(make_betas("linear", 100), torch.linspace(1e-3, 0.2, 100, dtype=torch.float64))
    sig = Schedule.make("sigmoid", 1000).alphas_cumprod
    assert bool((sig[1:] < sig[:-1]).all()) and 0 < sig[-1] < 1e-3 and sig[0] > 0.999
    with pytest.raises(ValueError, match="unknown schedule"):
        make_betas("quadratic", 10)


@pytest.mark.parametrize("kind", ["linear", "cosine", "sigmoid"])
def test_zero_terminal_snr(kind):
    ref = Schedule.make(kind, 1000).alphas_cumprod
    z = Schedule.make(kind, 1000, zero_terminal_snr=True).alphas_cumprod
    assert z[-1].item() == 0.0
    assert z[0].item() == pytest.approx(ref[0].item(), rel=1e-12)
    assert bool((z[1:] <= z[:-1]).all())


@pytest.mark.parametrize("kind", ["linear", "cosine", "sigmoid"])
def test_snr_shift_divides_every_snr_by_its_square(kind):
    """snr_shift k (simple diffusion): log-SNR lowered by 2 log k at every step; k=1 is the plain schedule; a
    diffusion built from the stage config carries it (so sampling uses the schedule the model trained on)."""
    from dalle2.diffusion import build_diffusion
    from dalle2.diffusion.schedules import log_snr_from_alpha_bar

    ref = Schedule.make(kind, 1000).alphas_cumprod
    shifted = Schedule.make(kind, 1000, snr_shift=2.0).alphas_cumprod
    keep = ref < 0.99  # the last steps of cosine are capped at max_beta; compare where neither is saturated
    keep &= ref > 1e-4
    gap = log_snr_from_alpha_bar(ref) - log_snr_from_alpha_bar(shifted)
    torch.testing.assert_close(gap[keep], torch.full_like(gap[keep], 2 * math.log(2.0)))
    assert torch.equal(Schedule.make(kind, 1000, snr_shift=1.0).alphas_cumprod, ref)
    built = build_diffusion({"schedule": kind, "snr_shift": 2.0}).schedule.alphas_cumprod
    torch.testing.assert_close(built.to(shifted.dtype), shifted)
    with pytest.raises(ValueError, match="snr_shift"):
        make_betas(kind, 10, snr_shift=0.0)


def test_respace_alpha_bar_is_subsampled():
    s = Schedule.make("cosine", 1000)
    ts = respace_timesteps(1000, 37, "uniform")
    r = s.respace(ts)
    assert torch.allclose(r.alphas_cumprod, s.alphas_cumprod[ts.flip(0)], rtol=1e-9, atol=0)
    assert torch.equal(r.timesteps, ts.flip(0))
    assert respace_timesteps(1000, 4, "trailing").tolist() == [999, 749, 499, 249]
    assert respace_timesteps(1000, 4, "leading").tolist() == [750, 500, 250, 0]
    assert respace_timesteps(1000, 4, "uniform").tolist() == [999, 666, 333, 0]
    for kind in ["uniform", "trailing", "leading"]:
        ts = respace_timesteps(1000, 1000, kind)
        assert len(ts) == 1000


def test_helpers_sigma_logsnr():
    s = Schedule.make("linear", 1000)
    abar = s.alphas_cumprod
    assert torch.allclose(s.sigmas, ((1 - abar) / abar).sqrt())
    assert torch.allclose(s.log_snr, torch.log(abar / (1 - abar)))


# -- forward process -----------------------------------------------------------------------------------------


def test_q_posterior_matches_gaussian_conditioning():
    d = GaussianDiffusion(schedule=Schedule.make("cosine", 100))
    abar, betas = d.schedule.alphas_cumprod, d.schedule.betas
    x0, xt = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    for ti in [1, 2, 50, 99]:
        t = torch.full((5,), ti)
        mean, var, logvar = d.q_posterior(x0, xt, t)
        # joint of (x_{t-1}, x_t) | x0: x_{t-1} ~ N(sqrt(ab') x0, 1-ab'), x_t = sqrt(alpha) x_{t-1} + sqrt(beta) e
        ab_p, a = abar[ti - 1], 1 - betas[ti]
        cov, var_t = a.sqrt() * (1 - ab_p), 1 - abar[ti]
        exp_mean = ab_p.sqrt() * x0 + cov / var_t * (xt - abar[ti].sqrt() * x0)
        exp_var = (1 - ab_p) - cov**2 / var_t
        assert torch.allclose(mean, exp_mean, atol=1e-12)
        assert torch.allclose(var.flatten(), exp_var.expand(5), rtol=1e-10)
        assert torch.allclose(logvar.flatten(), exp_var.log().expand(5), rtol=1e-10)


def test_q_sample_statistics():
    d = GaussianDiffusion(schedule=Schedule.make("linear", 1000))
    x0 = torch.full((20000, 1), 2.0)
    t = torch.full((20000,), 400)
    x = d.q_sample(x0, t)
    ab = d.schedule.alphas_cumprod[400].item()
    assert x.mean().item() == pytest.approx(2.0 * math.sqrt(ab), abs=0.03)
    assert x.std().item() == pytest.approx(math.sqrt(1 - ab), abs=0.02)


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
def test_conversions_round_trip(objective):
    d = GaussianDiffusion(schedule=Schedule.make("cosine", 1000), objective=objective)
    x0, eps = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64)
    t = torch.tensor([0, 1, 10, 100, 500, 900, 990, 999])
    xt = d.q_sample(x0, t, eps)
    out = d.target(x0, t, eps)
    x0_hat, eps_hat = d.model_output_to_x0_eps(out, xt, t)
    assert torch.allclose(x0_hat, x0, atol=1e-6) and torch.allclose(eps_hat, eps, atol=1e-8)
    assert torch.allclose(d.predict_x0_from_eps(xt, t, eps), x0, atol=1e-6)
    assert torch.allclose(d.predict_eps_from_x0(xt, t, x0), eps, atol=1e-8)
    v = d.predict_v(x0, t, eps)
    assert torch.allclose(d.predict_x0_from_v(xt, t, v), x0, atol=1e-10)
    assert torch.allclose(d.predict_eps_from_v(xt, t, v), eps, atol=1e-10)


def test_zero_snr_rejects_eps():
    s = Schedule.make("linear", 100, zero_terminal_snr=True)
    with pytest.raises(ValueError, match="zero-terminal-SNR"):
        GaussianDiffusion(schedule=s, objective="eps")
    GaussianDiffusion(schedule=s, objective="v")


# -- losses ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
def test_min_snr_weighting(objective):
    d = GaussianDiffusion(
        schedule=Schedule.make("cosine", 1000), objective=objective, weighting="min_snr", min_snr_gamma=5.0
    )
    t = torch.tensor([0, 100, 300, 600, 999])
    snr = d.schedule.snr[t]
    expected = {"x0": snr.clamp(max=5), "eps": snr.clamp(max=5) / snr, "v": snr.clamp(max=5) / (snr + 1)}[objective]
    assert torch.allclose(d.loss_weight(t).double(), expected, rtol=1e-6)
    x0, noise = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4)
    model = lambda x, t: torch.zeros_like(x)  # noqa: E731
    losses, per = d.training_losses(model, x0, t, noise=noise, return_per_sample=True)
    target = d.target(x0, t, noise)
    mse = (target**2).mean(dim=(1, 2, 3))
    assert torch.allclose(per["loss"], expected.float() * mse, rtol=1e-5)
    assert torch.allclose(per["mse"], mse) and torch.equal(per["t"], t)
    assert losses["loss"].ndim == 0 and losses["loss/mse"].ndim == 0


def test_l1_loss_and_generator_reproducible():
    d = GaussianDiffusion(schedule=Schedule.make("linear", 100), loss="l1")
    x0 = torch.randn(4, 6)
    model = lambda x, t: x * 0.5  # noqa: E731
    a = d.training_losses(model, x0, generator=torch.Generator().manual_seed(3))
    b = d.training_losses(model, x0, generator=torch.Generator().manual_seed(3))
    assert set(a) == {"loss", "loss/l1"} and torch.equal(a["loss"], b["loss"])


@pytest.mark.parametrize("shape,nll", [((4, 3, 8, 8), "discretized"), ((4, 16), "gaussian")])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_hybrid_loss_finite_under_autocast(shape, nll, dtype):
    T = 1000
    d = GaussianDiffusion(schedule=Schedule.make("linear", T), learned_variance=True, decoder_nll=nll)
    x0 = torch.rand(shape) * 2 - 1
    x0[0] = -1.0  # edge bins
    x0[1] = 1.0
    w = torch.nn.Parameter(torch.tensor(1.0))
    for t_val in [0, T - 1]:
        for scale in [1.0, 1e4, -6e4]:

            def model(x, t):  # large but representable outputs (mean and variance channels)
                return (torch.cat([x, x], dim=1) * 0 + w * scale).to(dtype)

            with torch.autocast("cpu", dtype=torch.bfloat16):
                losses = d.training_losses(model, x0, torch.full((shape[0],), t_val))
            for k, v in losses.items():
                assert torch.isfinite(v).all(), (k, t_val, scale, v)
            (g,) = torch.autograd.grad(losses["loss"], w)
            assert torch.isfinite(g), (t_val, scale)


def test_vlb_zero_for_exact_model():
    """With the exact x0 and the true posterior variance (v = -1) the KL term vanishes for t > 0."""
    d = GaussianDiffusion(schedule=Schedule.make("cosine", 100), objective="x0", learned_variance=True)
    x0 = torch.randn(3, 2, 4, 4)
    model = lambda x, t: torch.cat([x0, -torch.ones_like(x0)], dim=1)  # noqa: E731
    _, per = d.training_losses(model, x0, torch.tensor([1, 50, 99]), return_per_sample=True)
    assert per["vlb"].abs().max().item() < 1e-4


def test_tiny_mlp_loss_decreases():
    torch.manual_seed(0)
    d = GaussianDiffusion(schedule=Schedule.make("cosine", 100), objective="v", weighting="min_snr")
    net = torch.nn.Sequential(
        torch.nn.Linear(3, 64), torch.nn.SiLU(), torch.nn.Linear(64, 64), torch.nn.SiLU(), torch.nn.Linear(64, 2)
    )
    model = lambda x, t: net(torch.cat([x, (t.float() / 100)[:, None]], dim=1))  # noqa: E731
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)

    def data(n):  # two-moons-ish 2-D toy
        u = torch.rand(n, generator=gen) * math.pi
        side = (torch.rand(n, generator=gen) < 0.5).float()
        return torch.stack([torch.cos(u) + side, torch.sin(u) * (1 - 2 * side) + 0.5 * side], 1) * 0.7

    eval_x, eval_t, eval_n = data(512), torch.randint(0, 100, (512,), generator=gen), torch.randn(512, 2, generator=gen)
    with torch.no_grad():
        before = d.training_losses(model, eval_x, eval_t, noise=eval_n)["loss"].item()
    for _ in range(120):
        loss = d.training_losses(model, data(128), generator=gen)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = d.training_losses(model, eval_x, eval_t, noise=eval_n)["loss"].item()
    assert after < 0.8 * before, (before, after)


def test_training_losses_shape_error():
    d = GaussianDiffusion(schedule=Schedule.make("linear", 10), learned_variance=True)
    with pytest.raises(ValueError, match="does not match"):
        d.training_losses(lambda x, t: x, torch.randn(2, 4, 3, 3))


# -- guidance ----------------------------------------------------------------------------------------------------


class _CountingModel:
    def __init__(self, lv=False):
        self.calls = 0
        self.lv = lv

    def __call__(self, x, t, *, cond, drop_cond):
        self.calls += 1
        c = torch.where(drop_cond[:, None], torch.zeros_like(cond), cond)
        out = x * 0.5 + c + t[:, None].float() * 0.01
        return torch.cat([out, out * 0 + c.sum(1, keepdim=True)], 1) if self.lv else out


def test_cfg_scale_one_zero_and_batched_call():
    B = 4
    x, t, cond = torch.randn(B, 3), torch.arange(B), torch.randn(B, 3)
    kw = dict(cond=cond, drop_cond=torch.zeros(B, dtype=torch.bool))
    m = _CountingModel()
    c_out = m(x, t, **kw)
    u_out = m(x, t, cond=cond, drop_cond=torch.ones(B, dtype=torch.bool))
    for scale, expected in [(1.0, c_out), (0.0, u_out), (3.0, u_out + 3 * (c_out - u_out))]:
        m.calls = 0
        out = cfg_model_fn(m, guidance_scale=scale)(x, t, **kw)
        assert m.calls == 1 and torch.allclose(out, expected, atol=1e-6)
    # tensor scales force the batched path; per-sample scale; per-call override
    m.calls = 0
    s = torch.tensor([0.0, 1.0, 2.0, 3.0])
    out = cfg_model_fn(m, guidance_scale=s)(x, t, **kw)
    assert m.calls == 1 and torch.allclose(out, u_out + s[:, None] * (c_out - u_out), atol=1e-6)
    out = cfg_model_fn(m, guidance_scale=5.0)(x, t, guidance_scale=torch.ones(B), **kw)
    assert torch.allclose(out, c_out, atol=1e-6)
    # explicit uncond kwargs
    out = cfg_model_fn(m, guidance_scale=0.0, uncond_kwargs={"cond": torch.zeros(B, 3)})(x, t, **kw)
    assert torch.allclose(out, u_out, atol=1e-6)


def test_cfg_learned_variance_keeps_cond_variance():
    B = 3
    x, t, cond = torch.randn(B, 2), torch.zeros(B, dtype=torch.long), torch.randn(B, 2)
    kw = dict(cond=cond, drop_cond=torch.zeros(B, dtype=torch.bool))
    m = _CountingModel(lv=True)
    c_out = m(x, t, **kw)
    u_out = m(x, t, cond=cond, drop_cond=torch.ones(B, dtype=torch.bool))
    m.calls = 0
    out = cfg_model_fn(m, guidance_scale=0.0, learned_variance=True)(x, t, **kw)
    assert m.calls == 1
    assert torch.allclose(out[:, :2], u_out[:, :2]) and torch.allclose(out[:, 2:], c_out[:, 2:])


def test_cfg_needs_drop_flags():
    with pytest.raises(ValueError, match="drop_"):
        cfg_model_fn(lambda x, t, **k: x, guidance_scale=2.0)(
            torch.randn(2, 2), torch.zeros(2, dtype=torch.long), cond=torch.randn(2, 2)
        )


def test_x0_transforms():
    x = torch.tensor([[0.5, -3.0, 2.0, 0.1]])
    assert torch.equal(static_clip(x), torch.tensor([[0.5, -1.0, 1.0, 0.1]]))
    y = dynamic_threshold(x, percentile=1.0)
    assert torch.allclose(y, x / 3.0)
    small = torch.tensor([[0.5, -0.2]])
    assert torch.equal(dynamic_threshold(small), small)  # threshold never below 1


# -- low-res augmentation ----------------------------------------------------------------------------------------


def test_blur_identity_and_mean():
    x = torch.randn(2, 3, 16, 16)
    assert torch.allclose(gaussian_blur(x, 0.0), x)
    assert torch.allclose(gaussian_blur(x, 1e-4), x, atol=1e-6)
    assert torch.allclose(gaussian_blur(x, torch.tensor([0.0, 1e-5])), x, atol=1e-6)
    const = torch.full((2, 3, 8, 8), 0.3)
    assert torch.allclose(gaussian_blur(const, torch.tensor([0.5, 2.0])), const, atol=1e-6)
    blurred = gaussian_blur(x, torch.tensor([0.0, 2.0]))
    assert torch.allclose(blurred[0], x[0]) and blurred[1].std() < x[1].std()
    # separable and per-sample: a blurred impulse is a normalised symmetric bump
    imp = torch.zeros(1, 1, 15, 15)
    imp[0, 0, 7, 7] = 1
    b = gaussian_blur(imp, 1.5)
    assert (
        b.sum().item() == pytest.approx(1.0, abs=1e-5)
        and torch.allclose(b, b.flip(-1))
        and torch.allclose(b, b.transpose(-1, -2))
    )


def test_lowres_aug_levels():
    aug = LowResAugmentation(max_train_level=200)
    x = torch.rand(6, 3, 8, 8) * 2 - 1
    out, lv = aug(x, train=False, level=0)
    assert torch.equal(out, x) and lv.tolist() == [0] * 6 and lv.dtype == torch.int64
    out, lv = aug(x, train=False, level=250)
    ab = aug.schedule.alphas_cumprod[249].item()
    assert (lv == 250).all() and not torch.allclose(out, x)
    assert (out - math.sqrt(ab) * x).std().item() == pytest.approx(math.sqrt(1 - ab), rel=0.2)
    out, lv = aug(x, train=True, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and int(lv.max()) <= 200 and lv.shape == (6,)
    out2, lv2 = aug(x, train=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, out2) and torch.equal(lv, lv2)
