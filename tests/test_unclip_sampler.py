"""The unCLIP sampling process (dalle2.diffusion.unclip) against diffusers' UnCLIPScheduler (test-only reference):
its timestep spacing, each variance type, x0 clipping and whole runs with the same injected noise."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from dalle2.diffusion import GaussianDiffusion, Schedule, sample, unclip_timesteps  # noqa: E402
from dalle2.diffusion.unclip import UnclipTables  # noqa: E402


@pytest.mark.parametrize("steps", [1, 2, 7, 25, 50, 1000])
def test_timesteps_match_the_scheduler(steps):
    ref = diffusers.UnCLIPScheduler(num_train_timesteps=1000)
    if steps > 1:  # the reference divides by zero for one step
        ref.set_timesteps(steps)
        assert unclip_timesteps(1000, steps).tolist() == ref.timesteps.tolist()
    ts = unclip_timesteps(1000, steps)
    assert ts[0] == 999 and len(set(ts.tolist())) == steps and (steps == 1 or ts[-1] == 0)


def test_tables_are_the_schedulers():
    ref = diffusers.UnCLIPScheduler(num_train_timesteps=1000)
    t = UnclipTables(GaussianDiffusion(schedule=Schedule.make("cosine", 1000)))
    assert torch.equal(t.betas, ref.betas) and torch.equal(t.alphas_cumprod, ref.alphas_cumprod)


CASES = [  # (variance_type, prediction_type, clip range or None, objective, learned)
    ("fixed_small_log", "sample", 5.0, "x0", False),  # Karlo's prior
    ("learned_range", "epsilon", 1.0, "eps", True),  # Karlo's decoder
    ("fixed_small_log", "epsilon", 1.0, "eps", False),  # Karlo's super-resolution
    ("fixed_small_log", "epsilon", None, "eps", False),
]


@pytest.mark.parametrize("variance,prediction,clip,objective,learned", CASES)
@pytest.mark.parametrize("steps", [7, 25])
def test_whole_run_matches_the_scheduler(variance, prediction, clip, objective, learned, steps):
    ref = diffusers.UnCLIPScheduler(
        num_train_timesteps=1000,
        variance_type=variance,
        prediction_type=prediction,
        clip_sample=clip is not None,
        clip_sample_range=clip or 1.0,
    )
    ref.set_timesteps(steps)
    diffusion = GaussianDiffusion(schedule=Schedule.make("cosine", 1000), objective=objective, learned_variance=learned)
    shape = (3, 2, 4, 4)

    def model(x, t):  # a smooth nonlinear "network"; variance channels beyond [-1, 1] (the reference does not clamp)
        out = torch.tanh(x) * 0.7 + 0.05 * torch.cos(t.float()[:, None, None, None] / 90.0)
        return torch.cat([out, 1.4 * torch.sin(x + t.float()[:, None, None, None])], dim=1) if learned else out

    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(7)
    x = x_T.clone()
    ts = ref.timesteps
    for i, t in enumerate(ts):
        prev = None if i + 1 == len(ts) else ts[i + 1]
        x = ref.step(model(x, t.expand(shape[0])), t, x, prev_timestep=prev, generator=g).prev_sample
    transform = None if clip is None else (lambda x0: x0.clamp(-clip, clip))
    ours = sample(
        model,
        x_T,
        diffusion=diffusion,
        sampler="unclip",
        steps=steps,
        generator=torch.Generator().manual_seed(7),
        x0_transform=transform,
    )
    assert (ours - x).abs().max() <= 1e-5, (ours - x).abs().max()


def test_per_row_generators_draw_like_the_reference():
    """A list of generators (one per row) draws what randn_tensor draws from the same list."""
    ref = diffusers.UnCLIPScheduler(num_train_timesteps=1000, prediction_type="sample", clip_sample_range=5.0)
    ref.set_timesteps(5)
    d = GaussianDiffusion(schedule=Schedule.make("cosine", 1000), objective="x0")
    model = lambda x, t: torch.tanh(x)
    x = torch.zeros(2, 6)
    gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
    ts = ref.timesteps
    for i, t in enumerate(ts):
        prev = None if i + 1 == len(ts) else ts[i + 1]
        x = ref.step(model(x, t), t, x, prev_timestep=prev, generator=gens).prev_sample
    ours = sample(
        model,
        torch.zeros(2, 6),
        diffusion=d,
        sampler="unclip",
        steps=5,
        generator=[torch.Generator().manual_seed(s) for s in (3, 4)],
        x0_transform=lambda x0: x0.clamp(-5, 5),
    )
    assert (ours - x).abs().max() <= 1e-5
