"""The unCLIP sampling process (Karlo's, diffusers' ``UnCLIPScheduler``) as a pure sampler.

Ancestral DDPM on a respaced cosine schedule, with three details of its own:

* **Spacing**: ``round(i * (T - 1) / (n - 1))`` for ``i = n-1 .. 0`` — both ends included, so the last step is always
  ``t = 0`` (:func:`unclip_timesteps`; numpy's / torch's round-half-to-even).
* **Variance**: ``fixed_small_log`` (the posterior variance of the respaced step, ``beta'_t (1 - abar_prev) / (1 -
  abar_t)``, floored at 1e-20, as a standard deviation) when the model has no variance output, ``learned_range``
  (``frac log beta'_t + (1 - frac) log posterior variance``, ``frac = (v + 1) / 2`` — *not* clamped to [-1, 1],
  unlike :func:`dalle2.diffusion.gaussian.interpolate_log_variance`) when it has.  ``beta'_t`` is the respaced beta
  ``1 - abar_t / abar_prev`` (the training beta when the step is one timestep).
* **Arithmetic**: the tables are float32 (betas from the float64 schedule, cast, then cumulated in float32) and the
  step is computed in the reference's order, so that a converted Karlo model gives the reference's images.

``x0_transform`` clips the x0 prediction (the scheduler's ``clip_sample_range``).  Noise is injected: ``noise(x)``
gives each step's standard normal noise, drawn at every step but the last (``t = 0``), in that order.  Through
:func:`dalle2.diffusion.samplers.sample` (``sampler="unclip"``) it is ``randn(x.shape)`` from ``generator`` (one, or
one per row): the reference draws the same numbers from the same generator.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor

from .gaussian import GaussianDiffusion, X0Transform

__all__ = ["UnclipTables", "sample_unclip", "unclip_step", "unclip_timesteps"]

VarianceType = Literal["fixed_small_log", "learned_range"]


def unclip_timesteps(num_timesteps: int, steps: int) -> Tensor:
    """``UnCLIPScheduler.set_timesteps``: ``round(arange(steps) * (T - 1) / (steps - 1))`` descending, int64."""
    T = int(num_timesteps)
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in [1, {T}], got {steps}")
    if steps == 1:
        return torch.tensor([T - 1], dtype=torch.int64)  # the reference divides by zero here; one step from T - 1
    ratio = (T - 1) / (steps - 1)
    ts = (torch.arange(steps, dtype=torch.float64) * ratio).round().to(torch.int64)
    return ts.flip(0)


class UnclipTables:
    """float32 ``betas``, ``alphas``, ``alphas_cumprod`` of a diffusion's schedule, as the reference holds them."""

    def __init__(self, diffusion: GaussianDiffusion):
        self.betas = diffusion.schedule.betas.to(torch.float32)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.one = torch.tensor(1.0)


def unclip_step(
    out: Tensor,
    t: int,
    x: Tensor,
    prev_t: int,
    *,
    tables: UnclipTables,
    objective: str,
    learned_variance: bool,
    x0_transform: X0Transform | None = None,
    noise: Tensor | Callable[[], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """One step ``x_t -> x_prev`` from the raw model output ``out`` -> ``(x_prev, x0)``.

    ``noise``: the step's standard normal noise (a tensor, or a function drawing it; only called when ``t > 0``).
    """
    v = None
    if learned_variance:
        out, v = out.split(x.shape[1], dim=1)
    a_t = tables.alphas_cumprod[t]
    a_prev = tables.alphas_cumprod[prev_t] if prev_t >= 0 else tables.one
    b_t, b_prev = 1 - a_t, 1 - a_prev
    if prev_t == t - 1:
        beta, alpha = tables.betas[t], tables.alphas[t]
    else:
        beta = 1 - a_t / a_prev
        alpha = 1 - beta
    if objective == "eps":
        x0 = (x - b_t**0.5 * out) / a_t**0.5
    elif objective == "x0":
        x0 = out
    elif objective == "v":
        x0 = a_t**0.5 * x - b_t**0.5 * out
    else:
        raise ValueError(f"unknown objective {objective!r}")
    if x0_transform is not None:
        x0 = x0_transform(x0)
    mean = (a_prev**0.5 * beta) / b_t * x0 + alpha**0.5 * b_prev / b_t * x
    if t <= 0:
        return mean, x0
    eps = noise() if callable(noise) else noise
    if eps is None:
        eps = torch.randn_like(x)
    variance = b_prev / b_t * beta
    if v is None:
        std = torch.exp(0.5 * torch.log(torch.clamp(variance, min=1e-20)))
    else:
        frac = (v + 1) / 2
        std = (0.5 * (frac * beta.log() + (1 - frac) * variance.log())).exp()
    return mean + std * eps, x0


@torch.no_grad()
def sample_unclip(
    model_fn: Callable[..., Tensor],
    x: Tensor,
    timesteps: Tensor,
    *,
    diffusion: GaussianDiffusion,
    noise: Callable[[Tensor], Tensor] | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    x0_transform: X0Transform | None = None,
    callback: Callable[[dict], None] | None = None,
) -> Tensor:
    """Run the unCLIP process from ``x`` (the starting noise) over descending training ``timesteps``
    (:func:`unclip_timesteps`).  ``model_fn(x, t (B,) int64, **model_kwargs)``; ``noise(x)``: the step's noise
    (default ``torch.randn_like``); ``callback({"i", "t", "x", "x0"})``."""
    draw = noise or torch.randn_like
    tables = UnclipTables(diffusion)
    ts = [int(t) for t in timesteps]
    kwargs = dict(model_kwargs or {})
    for i, t in enumerate(ts):
        prev_t = ts[i + 1] if i + 1 < len(ts) else -1
        tb = torch.full((x.shape[0],), t, dtype=torch.int64, device=x.device)
        out = model_fn(x, tb, **kwargs).to(x.dtype)
        x, x0 = unclip_step(
            out,
            t,
            x,
            prev_t,
            tables=tables,
            objective=diffusion.objective,
            learned_variance=diffusion.learned_variance,
            x0_transform=x0_transform,
            noise=lambda: draw(x),
        )
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "x0": x0})
    return x
