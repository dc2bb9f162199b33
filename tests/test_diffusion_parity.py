"""Parity with diffusers' schedulers (test-only reference; dalle2 never imports diffusers)."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from dalle2.diffusion import GaussianDiffusion, Schedule, make_timesteps, sample  # noqa: E402
from dalle2.diffusion.samplers import ddim_step, ddpm_step  # noqa: E402

KINDS = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
OBJ = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}


def _const_model(out):
    return lambda x, t: out


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("ztsnr", [False, True])
def test_schedule_parity(kind, ztsnr):
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=KINDS[kind], rescale_betas_zero_snr=ztsnr)
    ours = Schedule.make(kind, 1000, zero_terminal_snr=ztsnr)
    assert torch.allclose(ours.betas.float(), ref.betas, atol=1e-5, rtol=1e-5)
    assert torch.allclose(ours.alphas_cumprod.float(), ref.alphas_cumprod, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("objective", ["eps", "v"])
@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize("spacing", ["trailing", "leading"])
def test_ddim_step_parity(objective, eta, spacing):
    ref = diffusers.DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        clip_sample=False,
        prediction_type=OBJ[objective],
        timestep_spacing=spacing,
        set_alpha_to_one=True,
    )
    ref.set_timesteps(20)
    d = GaussianDiffusion(schedule=Schedule.make("cosine", 1000), objective=objective)
    ts = make_timesteps(d, 20, spacing)
    assert ts.tolist() == ref.timesteps.tolist()
    g = torch.Generator().manual_seed(0)
    abars = [float(d.alphas_cumprod[t]) for t in ts] + [1.0]
    for i in [0, 7, 19]:
        x, out, noise = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(3))
        expected = ref.step(out, int(ts[i]), x, eta=eta, variance_noise=noise).prev_sample
        den = d.denoise(_const_model(out), x, torch.full((2,), int(ts[i])))
        ours = ddim_step(x, den, abars[i], abars[i + 1], eta=eta, noise=noise)
        assert torch.allclose(ours, expected, atol=1e-5, rtol=1e-5), (i, (ours - expected).abs().max())


@pytest.mark.parametrize("learned", [False, True])
def test_ddpm_step_parity(learned):
    var_type = "learned_range" if learned else "fixed_small"
    ref = diffusers.DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        clip_sample=False,
        variance_type=var_type,
        timestep_spacing="trailing",
    )
    ref.set_timesteps(50)
    d = GaussianDiffusion(schedule=Schedule.make("linear", 1000), objective="eps", learned_variance=learned)
    ts = make_timesteps(d, 50, "trailing")
    assert ts.tolist() == ref.timesteps.tolist()
    abars = [float(d.alphas_cumprod[t]) for t in ts] + [1.0]
    for i in [0, 10, 30, 48]:
        x, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
        out = torch.cat([eps, torch.rand(2, 3, 4, 4) * 2 - 1], dim=1) if learned else eps
        expected = ref.step(out, int(ts[i]), x, generator=torch.Generator().manual_seed(i)).prev_sample
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(i))
        den = d.denoise(_const_model(out), x, torch.full((2,), int(ts[i])))
        ours = ddpm_step(x, den, abars[i], abars[i + 1], noise=noise)
        assert torch.allclose(ours, expected, atol=1e-5, rtol=1e-5), (i, (ours - expected).abs().max())


@pytest.mark.parametrize("objective", ["eps", "v"])
def test_dpmpp_2m_parity(objective):
    steps = 20
    ref = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type=OBJ[objective],
        algorithm_type="dpmsolver++",
        solver_order=2,
        timestep_spacing="trailing",
        final_sigmas_type="zero",
        lower_order_final=True,
        thresholding=False,
    )
    ref.set_timesteps(steps)
    d = GaussianDiffusion(schedule=Schedule.make("cosine", 1000), objective=objective)
    assert make_timesteps(d, steps, "trailing").tolist() == ref.timesteps.tolist()

    def model(x, t):  # a smooth nonlinear "network"
        return torch.tanh(x) * 0.5 + 0.1 * torch.sin(t.float()[:, None] / 100)

    x_T = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    x = x_T.clone()
    for t in ref.timesteps:
        x = ref.step(model(x, t.expand(4)), t, x).prev_sample
    ours = sample(model, x_T, diffusion=d, sampler="dpmpp_2m", steps=steps)
    assert torch.allclose(ours, x, atol=1e-4, rtol=1e-4), (ours - x).abs().max()
