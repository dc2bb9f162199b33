"""Gaussian diffusion: forward process, parametrisations (eps / x0 / v) and training losses.

:class:`GaussianDiffusion` owns a :class:`~dalle2.diffusion.schedules.Schedule` and knows nothing of networks:
``model_fn(x_t, t, **model_kwargs)`` is any callable; ``t`` is an int64 ``(B,)`` tensor of training timesteps.
Data may have any shape ``(B, ...)``: the prior diffuses ``(B, D)`` embeddings, the decoder ``(B, C, H, W)``
images.  With ``learned_variance=True`` the model returns twice the channels along dim 1: ``[mean part;
v]`` with ``v`` in ``[-1, 1]`` interpolating ``log beta`` (v = 1) and ``log beta-tilde`` (v = -1)
(Nichol & Dhariwal 2021), trained with the hybrid loss ``L_simple + vlb_weight * T * L_vlb``.

The parametrisation conversions are module-level functions of ``alpha_bar`` (so samplers on any subset of
timesteps share them) with thin ``t``-indexed methods on the class.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from .schedules import Schedule, extract

Objective = Literal["eps", "x0", "v"]
ModelFn = Callable[..., Tensor]
X0Transform = Callable[[Tensor], Tensor]

__all__ = [
    "GaussianDiffusion",
    "Denoised",
    "x0_from_eps",
    "eps_from_x0",
    "x0_from_v",
    "eps_from_v",
    "v_from_x0_eps",
    "output_to_x0_eps",
    "interpolate_log_variance",
    "normal_kl",
    "discretized_gaussian_log_likelihood",
    "gaussian_log_likelihood",
]


# -- parametrisations (abar broadcasts against x) --------------------------------------------------------


def x0_from_eps(x_t: Tensor, eps: Tensor, abar: Tensor) -> Tensor:
    return (x_t - (1.0 - abar).sqrt() * eps) / abar.sqrt()


def eps_from_x0(x_t: Tensor, x0: Tensor, abar: Tensor) -> Tensor:
    return (x_t - abar.sqrt() * x0) / (1.0 - abar).sqrt()


def x0_from_v(x_t: Tensor, v: Tensor, abar: Tensor) -> Tensor:
    return abar.sqrt() * x_t - (1.0 - abar).sqrt() * v


def eps_from_v(x_t: Tensor, v: Tensor, abar: Tensor) -> Tensor:
    return (1.0 - abar).sqrt() * x_t + abar.sqrt() * v


def v_from_x0_eps(x0: Tensor, eps: Tensor, abar: Tensor) -> Tensor:
    """Salimans & Ho 2022: ``v = sqrt(abar) eps - sqrt(1 - abar) x0``."""
    return abar.sqrt() * eps - (1.0 - abar).sqrt() * x0


def output_to_x0_eps(objective: Objective, out: Tensor, x_t: Tensor, abar: Tensor) -> tuple[Tensor, Tensor]:
    """Raw model output (mean part only) for ``objective`` -> ``(x0, eps)``."""
    if objective == "eps":
        return x0_from_eps(x_t, out, abar), out
    if objective == "x0":
        return out, eps_from_x0(x_t, out, abar)
    if objective == "v":
        return x0_from_v(x_t, out, abar), eps_from_v(x_t, out, abar)
    raise ValueError(f"unknown objective {objective!r}; expected 'eps', 'x0' or 'v'")


def interpolate_log_variance(v: Tensor, log_beta: Tensor, log_beta_tilde: Tensor) -> Tensor:
    """Learned variance (Nichol & Dhariwal eq. 15): ``frac = (v + 1)/2`` with ``v`` clamped to ``[-1, 1]``
    so that the variance stays between beta-tilde and beta whatever the network outputs (no overflow)."""
    frac = (v.clamp(-1.0, 1.0) + 1.0) / 2.0
    return frac * log_beta + (1.0 - frac) * log_beta_tilde


# -- likelihood terms (call in float32) ------------------------------------------------------------------


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """Elementwise KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: Tensor, *, means: Tensor, log_scales: Tensor, bins: int = 256) -> Tensor:
    """Elementwise log P(x) for x in [-1, 1] quantised to ``bins`` levels, under N(means, e^(2 log_scales)).

    Edge bins take the whole tail; the middle uses whichever tail of the CDF is accurate (no cancellation).
    """
    half = 1.0 / (bins - 1)
    inv_std = torch.exp(-log_scales)
    plus_in = inv_std * (x - means + half)
    min_in = inv_std * (x - means - half)
    log_cdf_plus = torch.special.log_ndtr(plus_in)
    log_one_minus_cdf_min = torch.special.log_ndtr(-min_in)
    right = min_in > 0  # both points in the right tail: 1 - cdf is the accurate side
    delta = torch.where(
        right,
        torch.special.ndtr(-min_in) - torch.special.ndtr(-plus_in),
        torch.special.ndtr(plus_in) - torch.special.ndtr(min_in),
    )
    log_mid = torch.log(delta.clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_mid))


def gaussian_log_likelihood(x: Tensor, *, means: Tensor, log_var: Tensor) -> Tensor:
    """Elementwise continuous Gaussian log density (for non-image data such as CLIP embeddings)."""
    return -0.5 * (math.log(2 * math.pi) + log_var + (x - means) ** 2 * torch.exp(-log_var))


def _mean_flat(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1).mean(dim=1)


@dataclass
class Denoised:
    """What a sampler gets from the model at ``(x_t, t)``: ``x0`` (after any x0 transform), the matching
    ``eps``, and the raw learned-variance output ``v`` (same shape as x) or None."""

    x0: Tensor
    eps: Tensor
    v: Tensor | None = None


class GaussianDiffusion:
    """Forward process, conversions and losses for one schedule and objective.

    Args (keyword-only):
        schedule: a :class:`Schedule` (or give ``betas``).
        objective: what the model predicts: ``eps``, ``x0`` or ``v``.
        loss: ``mse`` or ``l1`` on the objective's target (mean over all non-batch dims).
        weighting: ``none`` or ``min_snr`` (Hang et al. 2023; weight ``min(snr, gamma)`` expressed for the
            objective: x0 -> ``min(snr, g)``, eps -> ``min(snr, g)/snr``, v -> ``min(snr, g)/(snr + 1)``).
        learned_variance: model output has doubled channels (dim 1); adds the VLB term.
        vlb_weight: lambda of the hybrid loss (1e-3 as in improved DDPM); the term is ``lambda * T * L_t``.
        decoder_nll: the t = 0 VLB term: ``discretized`` (images in [-1, 1], 256 levels) or ``gaussian``
            (continuous data such as embeddings).
    """

    def __init__(
        self,
        *,
        schedule: Schedule | None = None,
        betas: Tensor | None = None,
        objective: Objective = "eps",
        loss: Literal["mse", "l1"] = "mse",
        weighting: Literal["none", "min_snr"] = "none",
        min_snr_gamma: float = 5.0,
        learned_variance: bool = False,
        vlb_weight: float = 1e-3,
        decoder_nll: Literal["discretized", "gaussian"] = "discretized",
    ):
        if (schedule is None) == (betas is None):
            raise ValueError("give exactly one of schedule= or betas=")
        self.schedule = schedule if schedule is not None else Schedule.from_betas(betas)
        for name, value, allowed in [
            ("objective", objective, ("eps", "x0", "v")),
            ("loss", loss, ("mse", "l1")),
            ("weighting", weighting, ("none", "min_snr")),
            ("decoder_nll", decoder_nll, ("discretized", "gaussian")),
        ]:
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; expected one of {allowed}")
        if objective == "eps" and float(self.schedule.alphas_cumprod[-1]) == 0.0:
            raise ValueError("a zero-terminal-SNR schedule needs objective 'v' or 'x0' (eps cannot give x0 at SNR 0)")
        self.objective: Objective = objective
        self.loss_type = loss
        self.weighting = weighting
        self.min_snr_gamma = float(min_snr_gamma)
        self.learned_variance = bool(learned_variance)
        self.vlb_weight = float(vlb_weight)
        self.decoder_nll = decoder_nll
        # cached float64 tables
        s = self.schedule
        self.alphas_cumprod = s.alphas_cumprod
        self.snr = s.snr
        self.log_betas = s.betas.log()
        self.posterior_variance = s.posterior_variance
        self.posterior_log_variance_clipped = s.posterior_log_variance_clipped
        self.posterior_mean_coef1 = s.posterior_mean_coef1
        self.posterior_mean_coef2 = s.posterior_mean_coef2

    @property
    def num_timesteps(self) -> int:
        return self.schedule.num_timesteps

    def __repr__(self) -> str:
        return (
            f"GaussianDiffusion(T={self.num_timesteps}, objective={self.objective!r}, loss={self.loss_type!r}, "
            f"weighting={self.weighting!r}, learned_variance={self.learned_variance})"
        )

    # -- forward process ---------------------------------------------------------------------------------
    def abar(self, t: Tensor, like: Tensor) -> Tensor:
        """alpha_bar[t] shaped ``(B, 1, ...)`` like ``like``."""
        return extract(self.alphas_cumprod, t, like)

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
        """``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``."""
        if noise is None:
            noise = torch.randn_like(x0)
        abar = self.abar(t, x0)
        return abar.sqrt() * x0 + (1.0 - abar).sqrt() * noise

    def q_posterior(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q(x_{t-1} | x_t, x0) -> ``(mean, variance, log_variance_clipped)`` (the latter two as ``(B, 1, ...)``)."""
        mean = extract(self.posterior_mean_coef1, t, x_t) * x0 + extract(self.posterior_mean_coef2, t, x_t) * x_t
        return mean, extract(self.posterior_variance, t, x_t), extract(self.posterior_log_variance_clipped, t, x_t)

    # -- conversions (t-indexed) ---------------------------------------------------------------------------
    def predict_x0_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        return x0_from_eps(x_t, eps, self.abar(t, x_t))

    def predict_eps_from_x0(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        return eps_from_x0(x_t, x0, self.abar(t, x_t))

    def predict_x0_from_v(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        return x0_from_v(x_t, v, self.abar(t, x_t))

    def predict_eps_from_v(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        return eps_from_v(x_t, v, self.abar(t, x_t))

    def predict_v(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        return v_from_x0_eps(x0, eps, self.abar(t, x0))

    def target(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """The regression target of this objective."""
        return {"eps": lambda: eps, "x0": lambda: x0, "v": lambda: self.predict_v(x0, t, eps)}[self.objective]()

    def split_output(self, out: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(mean part, v or None)``: with learned variance the output's dim 1 is doubled."""
        if not self.learned_variance:
            return out, None
        if out.shape[1] % 2:
            raise ValueError(f"learned_variance expects an even channel count along dim 1, got {tuple(out.shape)}")
        return out.chunk(2, dim=1)

    def model_output_to_x0_eps(self, out: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Model output (mean part, or the full output if it has learned-variance channels) -> ``(x0, eps)``."""
        if self.learned_variance and out.shape[1] == 2 * x_t.shape[1]:
            out = out.chunk(2, dim=1)[0]
        return output_to_x0_eps(self.objective, out, x_t, self.abar(t, x_t))

    def denoise(
        self,
        model_fn: ModelFn,
        x_t: Tensor,
        t: Tensor,
        *,
        model_kwargs: Mapping[str, Any] | None = None,
        x0_transform: X0Transform | None = None,
    ) -> Denoised:
        """One model call -> :class:`Denoised` in ``x_t``'s dtype.  ``x0_transform`` (clipping, dynamic
        thresholding) is applied to x0 and eps is recomputed to match it."""
        out = model_fn(x_t, t, **dict(model_kwargs or {}))
        mean_out, v = self.split_output(out.to(x_t.dtype))
        abar = self.abar(t, x_t)
        x0, eps = output_to_x0_eps(self.objective, mean_out, x_t, abar)
        if x0_transform is not None:
            x0 = x0_transform(x0)
            eps = eps_from_x0(x_t, x0, abar)
        return Denoised(x0=x0, eps=eps, v=v)

    # -- training ------------------------------------------------------------------------------------------
    def sample_timesteps(self, batch_size: int, *, device=None, generator: torch.Generator | None = None) -> Tensor:
        """Uniform int64 timesteps ``(B,)`` in ``[0, T)``."""
        gen_device = generator.device if generator is not None else device
        return torch.randint(0, self.num_timesteps, (batch_size,), generator=generator, device=gen_device).to(device)

    def loss_weight(self, t: Tensor) -> Tensor:
        """Per-sample weight ``(B,)`` float32 of the objective's loss (1 unless ``weighting='min_snr'``)."""
        if self.weighting == "none":
            return torch.ones(t.shape[0], device=t.device)
        snr = self.snr.to(t.device)[t.long()]
        clipped = snr.clamp(max=self.min_snr_gamma)
        if self.objective == "x0":
            w = clipped
        elif self.objective == "eps":
            w = torch.where(snr > 0, clipped / snr.clamp(min=1e-20), torch.ones_like(snr))
        else:
            w = clipped / (snr + 1.0)
        return w.float()

    def vlb_terms(self, x0: Tensor, x_t: Tensor, t: Tensor, mean_out: Tensor, v: Tensor) -> Tensor:
        """Per-sample VLB term L_t in bits/dim (``(B,)`` float32): KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) for t > 0,
        the decoder NLL at t = 0.  Computed in float32 with autocast off; pass ``mean_out`` detached for the
        hybrid loss (the VLB then only trains the variance)."""
        with torch.autocast(device_type=x0.device.type, enabled=False):
            x0, x_t, mean_out, v = x0.float(), x_t.float(), mean_out.float(), v.float()
            true_mean, _, true_logvar = self.q_posterior(x0, x_t, t)
            x0_pred, _ = output_to_x0_eps(self.objective, mean_out, x_t, self.abar(t, x_t))
            model_mean, _, _ = self.q_posterior(x0_pred, x_t, t)
            model_logvar = interpolate_log_variance(
                v, extract(self.log_betas, t, x_t), extract(self.posterior_log_variance_clipped, t, x_t)
            )
            kl = _mean_flat(normal_kl(true_mean, true_logvar, model_mean, model_logvar)) / math.log(2.0)
            if self.decoder_nll == "discretized":
                ll = discretized_gaussian_log_likelihood(x0, means=model_mean, log_scales=0.5 * model_logvar)
            else:
                ll = gaussian_log_likelihood(x0, means=model_mean, log_var=model_logvar)
            nll = -_mean_flat(ll) / math.log(2.0)
            return torch.where(t == 0, nll, kl)

    def training_losses(
        self,
        model_fn: ModelFn,
        x0: Tensor,
        t: Tensor | None = None,
        *,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
        return_per_sample: bool = False,
    ):
        """Noise ``x0 (B, ...)`` at ``t`` (uniform when None), call ``model_fn(x_t, t, **model_kwargs)``, score it.

        Returns a dict of **scalar** tensors, ready to log as is: ``"loss"`` (what to backpropagate: the
        weighted objective loss plus, with learned variance, ``vlb_weight * T * L_vlb``), ``"loss/mse"`` (or
        ``"loss/l1"``: the unweighted objective error) and, with learned variance, ``"loss/vlb"`` (bits/dim).

        With ``return_per_sample=True`` returns ``(losses, per_sample)`` where ``per_sample`` is a dict of
        ``(B,)`` tensors: ``"loss"`` (the per-sample total whose mean is ``losses["loss"]``), ``"t"`` (the
        timesteps used) and ``"mse"``/``"l1"``/``"vlb"`` — e.g. for logging the loss per timestep quartile.
        Noise and timesteps are drawn from ``generator`` when given (on the generator's device).
        """
        B = x0.shape[0]
        if t is None:
            t = self.sample_timesteps(B, device=x0.device, generator=generator)
        t = t.to(device=x0.device, dtype=torch.int64)
        if noise is None:
            gen_device = generator.device if generator is not None else x0.device
            noise = torch.randn(x0.shape, generator=generator, device=gen_device, dtype=x0.dtype).to(x0.device)
        x_t = self.q_sample(x0, t, noise)
        out = model_fn(x_t, t, **dict(model_kwargs or {}))
        mean_out, v = self.split_output(out)
        if mean_out.shape != x0.shape:
            raise ValueError(
                f"model output {tuple(out.shape)} does not match x0 {tuple(x0.shape)}"
                f"{' (with doubled channels for learned variance)' if self.learned_variance else ''}"
            )
        with torch.autocast(device_type=x0.device.type, enabled=False):
            target = self.target(x0.float(), t, noise.float())
            err = mean_out.float() - target
            obj = _mean_flat(err**2 if self.loss_type == "mse" else err.abs())
            per_sample = self.loss_weight(t) * obj
        losses = {}
        extras = {"t": t, self.loss_type: obj.detach()}
        if self.learned_variance:
            vlb = self.vlb_terms(x0, x_t, t, mean_out.detach(), v)
            per_sample = per_sample + self.vlb_weight * self.num_timesteps * vlb
            extras["vlb"] = vlb.detach()
        losses["loss"] = per_sample.mean()
        losses[f"loss/{self.loss_type}"] = obj.mean().detach()
        if self.learned_variance:
            losses["loss/vlb"] = extras["vlb"].mean()
        if return_per_sample:
            extras["loss"] = per_sample.detach()
            return losses, extras
        return losses


def build_diffusion(config: Mapping[str, Any] | None) -> GaussianDiffusion:
    """``{"schedule": "cosine", "num_timesteps": 1000, "zero_terminal_snr": False, "snr_shift": 1, "objective": ...}`` ->
    ``GaussianDiffusion``; keys other than the schedule's go to ``GaussianDiffusion`` as they are (the ``diffusion``
    hyperparameter of every diffusion stage)."""
    cfg = dict(config or {})
    kind = cfg.pop("schedule", "cosine")
    steps = int(cfg.pop("num_timesteps", 1000))
    zero_terminal_snr = bool(cfg.pop("zero_terminal_snr", False))
    snr_shift = float(cfg.pop("snr_shift", 1.0))
    schedule = Schedule.make(kind, steps, zero_terminal_snr=zero_terminal_snr, snr_shift=snr_shift)
    return GaussianDiffusion(schedule=schedule, **cfg)
