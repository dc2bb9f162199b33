"""Samplers: pure functions, one per algorithm, no state.

Every sampler has the signature ``sample_X(model_fn, x, timesteps, *, diffusion, ..., model_kwargs=None,
x0_transform=None, callback=None) -> Tensor`` where ``x`` is the starting noise ``x_T`` (variance-preserving,
i.e. ~N(0, I)), ``timesteps`` a strictly **descending** sequence of training timesteps (any subset: this is
respacing), and ``diffusion`` a :class:`~dalle2.diffusion.gaussian.GaussianDiffusion`, used only for its
``alpha_bar`` table and to turn the raw model output into ``(x0, eps)`` (``diffusion.denoise``).  After the
last listed timestep the samplers jump to clean data (``alpha_bar = 1``).  The model is only ever called at
training timesteps (int64 ``(B,)``), so any network trained on the discrete schedule can be used as is.

Algorithms (``abar`` = alpha_bar at the current timestep, ``abar'`` at the next one):
- ``ddpm``: ancestral sampling with the *respaced* posterior (``beta' = 1 - abar/abar'``), learned variance
  interpolating ``log beta'`` and ``log beta-tilde'`` when the model has it.
- ``ddim``: Song et al. 2021, ``eta`` in [0, 1]; eta = 0 is deterministic (and invertible: :func:`ddim_invert`).
- ``dpmpp_2m``: DPM-Solver++(2M), Lu et al. 2022, data prediction, multistep; first order on the first and
  the final step.
- ``unclip``: Karlo's / diffusers' ``UnCLIPScheduler`` (:mod:`dalle2.diffusion.unclip`): ancestral with its own
  spacing (both ends included: it always ends at t = 0, whatever ``spacing`` says), un-clamped learned range.
- ``euler``, ``heun``: Karras et al. 2022 on ``sigma = sqrt((1 - abar)/abar)``, state ``x / sqrt(abar)``.
  Euler on the same timesteps is algebraically DDIM(eta=0); Heun costs 2 model calls per step (1 on the last).
  Pair them with ``spacing="karras"`` for Karras sigmas (snapped to training timesteps).

``callback(info)`` is called after every step with ``{"i", "t", "x", "x0"}``; ``generator`` draws all noise, so
a seed fixes the result.  It is a ``torch.Generator`` (one stream for the whole batch) or a *sequence* of ``n``
generators, one per group of ``B / n`` consecutive rows (per-sample streams: row ``r`` only ever draws from
``generator[r // (B / n)]``, so a sample does not depend on which other samples share its batch); see
:func:`randn`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from .gaussian import Denoised, GaussianDiffusion, ModelFn, X0Transform, interpolate_log_variance
from .schedules import karras_timesteps, respace_timesteps
from .unclip import sample_unclip, unclip_timesteps

SamplerName = Literal["ddpm", "ddim", "dpmpp_2m", "euler", "heun", "unclip"]
Callback = Callable[[dict], None]
Generators = torch.Generator | Sequence[torch.Generator] | None

__all__ = [
    "sample",
    "sample_ddpm",
    "sample_ddim",
    "sample_dpmpp_2m",
    "sample_euler",
    "sample_heun",
    "ddpm_step",
    "ddim_step",
    "ddim_invert",
    "make_timesteps",
    "sampling_timesteps",
    "randn",
    "SAMPLERS",
]


def _timesteps_list(timesteps: Tensor | Sequence[int], T: int) -> list[int]:
    ts = [int(t) for t in (timesteps.tolist() if isinstance(timesteps, Tensor) else timesteps)]
    if not ts or any(b >= a for a, b in zip(ts, ts[1:])) or ts[0] >= T or ts[-1] < 0:
        raise ValueError(
            f"timesteps must be strictly descending within [0, {T}), got {ts[:8]}{'...' if len(ts) > 8 else ''}"
        )
    return ts


def _abars(diffusion: GaussianDiffusion, ts: list[int]) -> list[float]:
    """alpha_bar at each timestep, plus 1.0 (clean data) at the end; Python floats (float64)."""
    ac = diffusion.alphas_cumprod
    return [float(ac[t]) for t in ts] + [1.0]


def _per_row_draw(draw: Callable[..., Tensor], shape: Sequence[int], generator: Generators, device, dtype) -> Tensor:
    """``draw(shape, generator=, device=, dtype=)`` with one generator or one per group of consecutive rows."""
    shape = tuple(int(s) for s in shape)
    if generator is None or isinstance(generator, torch.Generator):
        gen_device = generator.device if generator is not None else device
        return draw(shape, generator=generator, device=gen_device, dtype=dtype).to(device)
    gens = list(generator)
    n, B = len(gens), shape[0]
    if n == 0 or B % n:
        raise ValueError(f"{n} generators cannot split a batch of {B} rows into equal groups")
    rows = (B // n, *shape[1:])
    # a loop over generators only to draw noise (the model calls stay batched)
    parts = [draw(rows, generator=g, device=g.device, dtype=dtype).to(device) for g in gens]
    return torch.cat(parts, dim=0)


def randn(
    shape: Sequence[int], *, generator: Generators = None, device=None, dtype: torch.dtype | None = None
) -> Tensor:
    """Standard normal noise of ``shape`` on ``device``, drawn on each generator's own device.

    ``generator``: None (global RNG), one ``torch.Generator`` for the whole tensor, or a sequence of ``n``
    generators where ``n`` divides ``shape[0]``: generator ``j`` draws rows ``[j B/n, (j+1) B/n)`` (as one
    ``(B/n, ...)`` draw), so those rows depend only on that generator's seed, never on the rest of the batch.
    """
    return _per_row_draw(torch.randn, shape, generator, device, dtype or torch.float32)


def rand(
    shape: Sequence[int], *, generator: Generators = None, device=None, dtype: torch.dtype | None = None
) -> Tensor:
    """Uniform [0, 1) counterpart of :func:`randn` (same generator conventions)."""
    return _per_row_draw(torch.rand, shape, generator, device, dtype or torch.float32)


def _randn(x: Tensor, generator: Generators) -> Tensor:
    return randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _denoiser(diffusion, model_fn, model_kwargs, x0_transform) -> Callable[[Tensor, int], Denoised]:
    def call(x: Tensor, t: int) -> Denoised:
        tb = torch.full((x.shape[0],), t, dtype=torch.int64, device=x.device)
        return diffusion.denoise(model_fn, x, tb, model_kwargs=model_kwargs, x0_transform=x0_transform)

    return call


# -- single steps (exposed for tests / parity) -----------------------------------------------------------


def ddpm_step(x: Tensor, d: Denoised, abar: float, abar_prev: float, *, noise: Tensor | None) -> Tensor:
    """Ancestral step with the posterior of the respaced pair ``(abar, abar_prev)``; ``noise=None`` -> mean only.
    Fixed-small variance (beta-tilde'), or the learned interpolation when ``d.v`` is given."""
    beta = 1.0 - abar / abar_prev
    coef_x0 = beta * math.sqrt(abar_prev) / (1.0 - abar)
    coef_xt = (1.0 - abar_prev) * math.sqrt(1.0 - beta) / (1.0 - abar)
    mean = coef_x0 * d.x0 + coef_xt * x
    if noise is None:
        return mean
    var = beta * (1.0 - abar_prev) / (1.0 - abar)
    if d.v is not None:
        log_var = interpolate_log_variance(d.v.float(), math.log(beta), math.log(max(var, 1e-20)))
        return mean + (0.5 * log_var).exp().to(x.dtype) * noise
    return mean + math.sqrt(max(var, 1e-20)) * noise


def ddim_step(
    x: Tensor, d: Denoised, abar: float, abar_prev: float, *, eta: float = 0.0, noise: Tensor | None = None
) -> Tensor:
    """``x' = sqrt(abar') x0 + sqrt(1 - abar' - s^2) eps + s z``, ``s = eta sqrt((1-abar')/(1-abar) (1 - abar/abar'))``."""
    sigma = eta * math.sqrt(max((1.0 - abar_prev) / (1.0 - abar) * (1.0 - abar / abar_prev), 0.0))
    out = math.sqrt(abar_prev) * d.x0 + math.sqrt(max(1.0 - abar_prev - sigma**2, 0.0)) * d.eps
    if sigma > 0 and noise is not None:
        out = out + sigma * noise
    return out


def _dpm_first_order(x: Tensor, x0: Tensor, abar: float, abar_next: float) -> Tensor:
    """DPM-Solver++(1) (= DDIM eta 0) written without logs: ``(s'/s) x + (a' - s' a / s) x0``."""
    a, s = math.sqrt(abar), math.sqrt(1.0 - abar)
    a_n, s_n = math.sqrt(abar_next), math.sqrt(1.0 - abar_next)
    return (s_n / s) * x + (a_n - s_n * a / s) * x0


def _lambda(abar: float) -> float:
    """Half log-SNR, ``log(alpha / sigma)``; +-inf at the ends."""
    if abar <= 0.0:
        return -math.inf
    if abar >= 1.0:
        return math.inf
    return 0.5 * (math.log(abar) - math.log1p(-abar))


# -- samplers ------------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_ddpm(
    model_fn: ModelFn,
    x: Tensor,
    timesteps: Tensor | Sequence[int],
    *,
    diffusion: GaussianDiffusion,
    generator: Generators = None,
    model_kwargs: Mapping[str, Any] | None = None,
    x0_transform: X0Transform | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """Ancestral DDPM over ``timesteps`` (respaced posterior; learned variance when the model has it)."""
    ts = _timesteps_list(timesteps, diffusion.num_timesteps)
    abars = _abars(diffusion, ts)
    denoise = _denoiser(diffusion, model_fn, model_kwargs, x0_transform)
    for i, t in enumerate(ts):
        d = denoise(x, t)
        last = i == len(ts) - 1
        x = ddpm_step(x, d, abars[i], abars[i + 1], noise=None if last else _randn(x, generator))
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "x0": d.x0})
    return x


@torch.no_grad()
def sample_ddim(
    model_fn: ModelFn,
    x: Tensor,
    timesteps: Tensor | Sequence[int],
    *,
    diffusion: GaussianDiffusion,
    eta: float = 0.0,
    generator: Generators = None,
    model_kwargs: Mapping[str, Any] | None = None,
    x0_transform: X0Transform | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """DDIM with stochasticity ``eta`` (0: deterministic ODE, 1: DDPM-like)."""
    ts = _timesteps_list(timesteps, diffusion.num_timesteps)
    abars = _abars(diffusion, ts)
    denoise = _denoiser(diffusion, model_fn, model_kwargs, x0_transform)
    for i, t in enumerate(ts):
        d = denoise(x, t)
        noise = _randn(x, generator) if eta > 0 and i < len(ts) - 1 else None
        x = ddim_step(x, d, abars[i], abars[i + 1], eta=eta, noise=noise)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "x0": d.x0})
    return x


@torch.no_grad()
def ddim_invert(
    model_fn: ModelFn,
    x: Tensor,
    timesteps: Tensor | Sequence[int],
    *,
    diffusion: GaussianDiffusion,
    fixed_point_iters: int = 3,
    model_kwargs: Mapping[str, Any] | None = None,
) -> Tensor:
    """Undo :func:`sample_ddim` (eta = 0) over the same descending ``timesteps``: clean ``x`` -> ``x_T``.

    Each step is implicit (the model is evaluated at the unknown noisier point); it starts from the model at the
    cleaner point (classic DDIM inversion, ``fixed_point_iters=0``) and refines by fixed-point iteration, which
    converges to the exact inverse for a smooth model.
    """
    ts = _timesteps_list(timesteps, diffusion.num_timesteps)
    abars = _abars(diffusion, ts)
    denoise = _denoiser(diffusion, model_fn, model_kwargs, None)
    for i in reversed(range(len(ts))):  # undo step i: (ts[i], abars[i]) -> (abars[i + 1])
        a, a_n = abars[i], abars[i + 1]
        if a_n < 1.0:
            eps = denoise(x, ts[i + 1]).eps
        else:  # from clean data: evaluate at the noise-free guess
            eps = denoise(math.sqrt(a) * x, ts[i]).eps
        x0 = (x - math.sqrt(1.0 - a_n) * eps) / math.sqrt(a_n)
        x_a = math.sqrt(a) * x0 + math.sqrt(1.0 - a) * eps
        for _ in range(fixed_point_iters):
            d = denoise(x_a, ts[i])
            # iterate on the better-conditioned unknown: x0 at low SNR, eps at high SNR (both contract there)
            if a < 0.5:
                x0, eps = d.x0, (x - math.sqrt(a_n) * d.x0) / math.sqrt(1.0 - a_n)
            else:
                eps, x0 = d.eps, (x - math.sqrt(1.0 - a_n) * d.eps) / math.sqrt(a_n)
            x_a = math.sqrt(a) * x0 + math.sqrt(1.0 - a) * eps
        x = x_a
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    model_fn: ModelFn,
    x: Tensor,
    timesteps: Tensor | Sequence[int],
    *,
    diffusion: GaussianDiffusion,
    model_kwargs: Mapping[str, Any] | None = None,
    x0_transform: X0Transform | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """DPM-Solver++(2M): second-order multistep in ``lambda = log(alpha/sigma)`` on the data prediction."""
    ts = _timesteps_list(timesteps, diffusion.num_timesteps)
    abars = _abars(diffusion, ts)
    lams = [_lambda(a) for a in abars]
    denoise = _denoiser(diffusion, model_fn, model_kwargs, x0_transform)
    x0_prev = None
    for i, t in enumerate(ts):
        d = denoise(x, t)
        D = d.x0
        h = lams[i + 1] - lams[i]
        if x0_prev is not None and i < len(ts) - 1 and math.isfinite(h) and math.isfinite(lams[i - 1]):
            r = (lams[i] - lams[i - 1]) / h
            D = (1.0 + 0.5 / r) * d.x0 - (0.5 / r) * x0_prev
        x = _dpm_first_order(x, D, abars[i], abars[i + 1])
        x0_prev = d.x0
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "x0": d.x0})
    return x


# Heun's trapezoid assumes eps varies linearly in sigma over the step, which fails badly on the jump from the
# schedule's top sigma (1e2..1e4 for cosine) down to the Karras ramp; above this sigma Heun takes an Euler
# (= DDIM) step, which is near exact there because eps is nearly constant at very low SNR.
HEUN_MAX_SIGMA = 80.0


def _sigma(abar: float) -> float:
    return math.inf if abar <= 0.0 else math.sqrt((1.0 - abar) / abar)


@torch.no_grad()
def _sample_karras(model_fn, x, timesteps, *, diffusion, second_order, model_kwargs, x0_transform, callback):
    ts = _timesteps_list(timesteps, diffusion.num_timesteps)
    abars = _abars(diffusion, ts)
    sig = [_sigma(a) for a in abars]
    denoise = _denoiser(diffusion, model_fn, model_kwargs, x0_transform)
    for i, t in enumerate(ts):
        d = denoise(x, t)
        s, s_n = sig[i], sig[i + 1]
        if math.isinf(s):  # start at SNR 0 (zero-terminal-SNR): x / sqrt(abar) is infinite; step on the x0 form
            x_ve = d.x0 + s_n * d.eps
        else:
            x_ve = x / math.sqrt(abars[i]) + (s_n - s) * d.eps  # Euler: dx/dsigma = (x - x0)/sigma = eps
            if second_order and s_n > 0 and s <= HEUN_MAX_SIGMA:
                d2 = denoise(x_ve * math.sqrt(abars[i + 1]), ts[i + 1])
                x_ve = x / math.sqrt(abars[i]) + (s_n - s) * 0.5 * (d.eps + d2.eps)
        x = x_ve * math.sqrt(abars[i + 1])
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "x0": d.x0})
    return x


def sample_euler(
    model_fn: ModelFn,
    x: Tensor,
    timesteps: Tensor | Sequence[int],
    *,
    diffusion: GaussianDiffusion,
    model_kwargs: Mapping[str, Any] | None = None,
    x0_transform: X0Transform | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """Euler on the probability-flow ODE in sigma (deterministic)."""
    return _sample_karras(
        model_fn,
        x,
        timesteps,
        diffusion=diffusion,
        second_order=False,
        model_kwargs=model_kwargs,
        x0_transform=x0_transform,
        callback=callback,
    )


def sample_heun(
    model_fn: ModelFn,
    x: Tensor,
    timesteps: Tensor | Sequence[int],
    *,
    diffusion: GaussianDiffusion,
    model_kwargs: Mapping[str, Any] | None = None,
    x0_transform: X0Transform | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """Heun (2nd order) on the probability-flow ODE in sigma; Euler on the last step (to sigma = 0) and on
    steps starting above ``HEUN_MAX_SIGMA`` (the jump from T-1 onto the Karras ramp)."""
    return _sample_karras(
        model_fn,
        x,
        timesteps,
        diffusion=diffusion,
        second_order=True,
        model_kwargs=model_kwargs,
        x0_transform=x0_transform,
        callback=callback,
    )


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "dpmpp_2m": sample_dpmpp_2m,
    "euler": sample_euler,
    "heun": sample_heun,
    "unclip": sample_unclip,
}


def make_timesteps(
    diffusion: GaussianDiffusion,
    steps: int,
    spacing: Literal["uniform", "trailing", "leading", "karras", "unclip"] = "trailing",
    *,
    rho: float = 7.0,
) -> Tensor:
    """Descending training timesteps for ``steps`` sampling steps (see :func:`respace_timesteps`; ``karras``
    snaps Karras sigmas to training timesteps; ``unclip``: :func:`~dalle2.diffusion.unclip.unclip_timesteps`)."""
    if spacing == "unclip":
        return unclip_timesteps(diffusion.num_timesteps, steps)
    if spacing == "karras":
        return karras_timesteps(diffusion.schedule, steps, rho=rho)
    return respace_timesteps(diffusion.num_timesteps, steps, spacing)


def sampling_timesteps(
    diffusion: GaussianDiffusion, sampler: str, steps: int, spacing: str = "trailing", *, rho: float = 7.0
) -> Tensor:
    """The timesteps :func:`sample` runs ``sampler`` on (the ``unclip`` sampler always uses its own spacing)."""
    return make_timesteps(diffusion, steps, "unclip" if sampler == "unclip" else spacing, rho=rho)


def sample(
    model_fn: ModelFn,
    shape_or_x_T: Tensor | Sequence[int],
    *,
    diffusion: GaussianDiffusion,
    sampler: SamplerName = "ddim",
    steps: int = 50,
    eta: float = 0.0,
    generator: Generators = None,
    callback: Callback | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    x0_transform: X0Transform | None = None,
    spacing: Literal["uniform", "trailing", "leading", "karras"] = "trailing",
    rho: float = 7.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    timesteps: Tensor | None = None,
) -> Tensor:
    """Draw samples: the one entry point the prior, decoder and pipeline use.

    ``shape_or_x_T``: a shape (noise drawn from ``generator``, see :func:`randn`, moved to ``device``, in ``dtype``,
    default float32) or the
    starting noise itself (kept in its dtype unless ``dtype`` is given).  The sampler state stays in that dtype
    (model outputs are cast to it), so run the network under autocast rather than sampling in half precision.
    ``spacing``: how the ``steps`` timesteps are chosen (``trailing`` measured best on the analytic benchmark
    for every sampler; ``karras`` snaps Karras sigmas, rho = ``rho``, to training timesteps).
    ``eta`` only applies to ``ddim``.  ``x0_transform`` (e.g. :func:`~dalle2.diffusion.guidance.static_clip`)
    is applied to every x0 prediction.  ``timesteps`` (descending training timesteps) replaces ``steps`` /
    ``spacing``: a chain that starts below T - 1 takes ``x_T`` as the noisy image at its first timestep (SDEdit).
    Returns the clean sample, same shape as ``x_T``.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {sorted(SAMPLERS)}")
    if isinstance(shape_or_x_T, Tensor):
        x = shape_or_x_T if dtype is None else shape_or_x_T.to(dtype=dtype)
    else:
        if device is None and isinstance(generator, torch.Generator):
            device = generator.device
        x = randn(shape_or_x_T, generator=generator, device=device, dtype=dtype or torch.float32)
    if timesteps is None:
        timesteps = sampling_timesteps(diffusion, sampler, steps, spacing, rho=rho)
    kwargs: dict[str, Any] = dict(
        diffusion=diffusion, model_kwargs=model_kwargs, x0_transform=x0_transform, callback=callback
    )
    if sampler in ("ddpm", "ddim"):
        kwargs["generator"] = generator
    if sampler == "unclip":
        kwargs["noise"] = lambda like: randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)
    if sampler == "ddim":
        kwargs["eta"] = eta
    return SAMPLERS[sampler](model_fn, x, timesteps, **kwargs)
