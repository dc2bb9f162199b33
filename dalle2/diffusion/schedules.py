"""Noise schedules (discrete time, ``t = 0 .. T-1``), computed in float64.

``make_betas(kind, T)`` gives the betas; :class:`Schedule` holds every derived quantity (alpha_bar, posterior
coefficients, sigma, log-SNR) and can be *respaced* onto a subset of the training timesteps, and
``respace_timesteps`` chooses that subset.  Everything stays float64 on the CPU; :func:`extract` gathers
per-sample coefficients and casts them to the dtype/device of the data.

Conventions: ``alpha_bar[t] = prod_{s<=t} (1 - beta_s)``; ``x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps``;
``sigma = sqrt((1 - alpha_bar) / alpha_bar)`` (the variance-exploding noise level, k-diffusion's sigma);
``log_snr = log(alpha_bar / (1 - alpha_bar))``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

ScheduleKind = Literal["linear", "cosine", "sigmoid"]
Spacing = Literal["uniform", "trailing", "leading"]

__all__ = [
    "make_betas",
    "rescale_zero_terminal_snr",
    "betas_from_alphas_cumprod",
    "Schedule",
    "respace_timesteps",
    "karras_timesteps",
    "extract",
    "sigma_from_alpha_bar",
    "log_snr_from_alpha_bar",
]


def _cosine_alpha_bar(u: torch.Tensor, s: float) -> torch.Tensor:
    return torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2


def _sigmoid_alpha_bar(u: torch.Tensor, start: float, end: float, tau: float) -> torch.Tensor:
    v_start = torch.sigmoid(torch.tensor(start / tau, dtype=torch.float64))
    v_end = torch.sigmoid(torch.tensor(end / tau, dtype=torch.float64))
    return (v_end - torch.sigmoid((u * (end - start) + start) / tau)) / (v_end - v_start)


def betas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Inverse of cumprod: ``beta_0 = 1 - abar_0``, ``beta_i = 1 - abar_i / abar_{i-1}``."""
    abar = alphas_cumprod.to(torch.float64)
    prev = torch.cat([abar.new_ones(1), abar[:-1]])
    return 1.0 - abar / prev


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Alg. 1: shift/scale ``sqrt(alpha_bar)`` so that ``alpha_bar[-1] = 0`` while
    ``alpha_bar[0]`` is unchanged.  The last beta becomes 1 (use the ``v`` or ``x0`` objective)."""
    abar_sqrt = torch.cumprod(1.0 - betas.to(torch.float64), 0).sqrt()
    first, last = abar_sqrt[0].clone(), abar_sqrt[-1].clone()
    abar_sqrt = (abar_sqrt - last) * first / (first - last)
    return betas_from_alphas_cumprod(abar_sqrt**2)


def make_betas(
    kind: ScheduleKind,
    num_timesteps: int,
    *,
    zero_terminal_snr: bool = False,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    scale_to_num_timesteps: bool = True,
    cosine_s: float = 0.008,
    sigmoid_start: float = -3.0,
    sigmoid_end: float = 3.0,
    sigmoid_tau: float = 1.0,
    max_beta: float = 0.999,
    snr_shift: float = 1.0,
) -> torch.Tensor:
    """Betas ``(num_timesteps,)`` in float64.

    - ``linear``: ``linspace(beta_start, beta_end)`` (DDPM); with ``scale_to_num_timesteps`` both ends are
      multiplied by ``1000 / T`` so that any T has the same total noise as T=1000 (guided-diffusion); capped.
    - ``cosine``: Nichol & Dhariwal 2021, ``abar(u) = cos((u + s)/(1 + s) * pi/2)^2``, betas capped at ``max_beta``.
    - ``sigmoid``: Chen 2023 / Jabri et al., ``abar(u)`` from a sigmoid over ``[start, end] / tau``, capped.
    - ``snr_shift`` = ``k``: every SNR divided by ``k**2`` (log-SNR shifted by ``-2 log k``; Hoogeboom et al. 2023,
      "simple diffusion").  A picture of ``k`` times the side has ``k**2`` times the pixels per feature, so the same
      noise hides it less: ``k = 2`` gives a 64 px model the 32 px schedule's noise on the picture's large shapes.
    - ``zero_terminal_snr``: rescale afterwards (:func:`rescale_zero_terminal_snr`).
    """
    if snr_shift <= 0:
        raise ValueError(f"snr_shift must be > 0, got {snr_shift}")
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    T = num_timesteps
    if kind == "linear":
        scale = 1000.0 / T if scale_to_num_timesteps else 1.0
        betas = torch.linspace(beta_start * scale, beta_end * scale, T, dtype=torch.float64).clamp(max=max_beta)
    elif kind in ("cosine", "sigmoid"):
        u = torch.arange(T + 1, dtype=torch.float64) / T
        if kind == "cosine":
            f = _cosine_alpha_bar(u, cosine_s)
        else:
            f = _sigmoid_alpha_bar(u, sigmoid_start, sigmoid_end, sigmoid_tau)
        betas = (1.0 - f[1:] / f[:-1]).clamp(min=0.0, max=max_beta)
    else:
        raise ValueError(f"unknown schedule kind {kind!r}; expected 'linear', 'cosine' or 'sigmoid'")
    if snr_shift != 1.0:  # abar' = snr' / (1 + snr') with snr' = snr / k^2, written without dividing by 1 - abar
        abar = torch.cumprod(1.0 - betas, dim=0)
        betas = betas_from_alphas_cumprod(abar / (abar + snr_shift**2 * (1.0 - abar))).clamp(max=max_beta)
    if zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
    return betas


def sigma_from_alpha_bar(abar: torch.Tensor) -> torch.Tensor:
    """VE noise level ``sqrt((1 - abar) / abar)`` (inf where abar = 0)."""
    return ((1.0 - abar) / abar).sqrt()


def log_snr_from_alpha_bar(abar: torch.Tensor) -> torch.Tensor:
    """``log(abar / (1 - abar))`` (-inf where abar = 0, +inf where abar = 1)."""
    return torch.log(abar) - torch.log1p(-abar)


@dataclass(frozen=True)
class Schedule:
    """A discrete schedule and all its derived quantities (float64, CPU).

    ``timesteps[i]`` is the *training* timestep the model is called with at index ``i`` (identity for a
    training schedule; the chosen subset for a respaced one, whose betas are ``1 - abar[t_i]/abar[t_{i-1}]``).
    """

    betas: torch.Tensor
    timesteps: torch.Tensor

    @classmethod
    def from_betas(cls, betas: torch.Tensor | Sequence[float]) -> "Schedule":
        betas = torch.as_tensor(betas, dtype=torch.float64).cpu()
        if betas.ndim != 1 or len(betas) == 0:
            raise ValueError(f"betas must be a non-empty 1-D tensor, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must lie in (0, 1]")
        return cls(betas=betas, timesteps=torch.arange(len(betas), dtype=torch.int64))

    @classmethod
    def make(cls, kind: ScheduleKind, num_timesteps: int, **kwargs) -> "Schedule":
        """``Schedule.make("cosine", 1000, zero_terminal_snr=False)``; kwargs go to :func:`make_betas`."""
        return cls.from_betas(make_betas(kind, num_timesteps, **kwargs))

    # -- derived quantities (cheap; recomputed on access) ---------------------------------------------
    @property
    def num_timesteps(self) -> int:
        return len(self.betas)

    @property
    def alphas(self) -> torch.Tensor:
        return 1.0 - self.betas

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return torch.cumprod(self.alphas, 0)

    @property
    def alphas_cumprod_prev(self) -> torch.Tensor:
        return torch.cat([self.betas.new_ones(1), self.alphas_cumprod[:-1]])

    @property
    def sigmas(self) -> torch.Tensor:
        return sigma_from_alpha_bar(self.alphas_cumprod)

    @property
    def log_snr(self) -> torch.Tensor:
        return log_snr_from_alpha_bar(self.alphas_cumprod)

    @property
    def snr(self) -> torch.Tensor:
        abar = self.alphas_cumprod
        return abar / (1.0 - abar)

    @property
    def posterior_variance(self) -> torch.Tensor:
        """beta-tilde: ``beta_t (1 - abar_{t-1}) / (1 - abar_t)`` (0 at t = 0)."""
        return self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)

    @property
    def posterior_log_variance_clipped(self) -> torch.Tensor:
        """log beta-tilde with the t = 0 entry (which is log 0) replaced by the t = 1 entry."""
        pv = self.posterior_variance
        if len(pv) > 1:
            pv = torch.cat([pv[1:2], pv[1:]])
        else:
            pv = self.betas.clone()
        return torch.log(pv)

    @property
    def posterior_mean_coef1(self) -> torch.Tensor:
        """Coefficient of x0 in the posterior mean."""
        return self.betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)

    @property
    def posterior_mean_coef2(self) -> torch.Tensor:
        """Coefficient of x_t in the posterior mean."""
        return (1.0 - self.alphas_cumprod_prev) * self.alphas.sqrt() / (1.0 - self.alphas_cumprod)

    # -- respacing --------------------------------------------------------------------------------------
    def respace(self, timesteps: torch.Tensor | Sequence[int]) -> "Schedule":
        """The schedule restricted to a subset of this schedule's indices (any order; sorted ascending).

        ``abar'_i = abar[t_i]`` exactly, ``beta'_i = 1 - abar[t_i] / abar[t_{i-1}]`` (``beta'_0 = 1 - abar[t_0]``).
        """
        ts = torch.as_tensor(timesteps, dtype=torch.int64).cpu().unique(sorted=True)
        if len(ts) == 0 or int(ts[0]) < 0 or int(ts[-1]) >= self.num_timesteps:
            raise ValueError(f"respaced timesteps must lie in [0, {self.num_timesteps}), got {ts.tolist()}")
        betas = betas_from_alphas_cumprod(self.alphas_cumprod[ts])
        return Schedule(betas=betas, timesteps=self.timesteps[ts])


def respace_timesteps(num_timesteps: int, steps: int, kind: Spacing = "trailing") -> torch.Tensor:
    """``steps`` distinct training timesteps, **descending** (sampling order), int64.

    - ``uniform``: ``round(linspace(0, T-1, steps))`` (both ends included).
    - ``trailing``: ``round(arange(T, 0, -T/steps)) - 1`` (starts at T-1; Lin et al. 2023 recommend it).
    - ``leading``: ``arange(steps) * (T // steps)`` (DDIM / Stable Diffusion; never reaches T-1).
    """
    T = num_timesteps
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in [1, {T}], got {steps}")
    if kind == "uniform":
        ts = torch.linspace(0, T - 1, steps, dtype=torch.float64).round()
    elif kind == "trailing":
        ts = torch.round(torch.arange(T, 0, -T / steps, dtype=torch.float64)) - 1
    elif kind == "leading":
        ts = torch.arange(steps, dtype=torch.float64) * (T // steps)
    else:
        raise ValueError(f"unknown spacing {kind!r}; expected 'uniform', 'trailing' or 'leading'")
    ts = ts.to(torch.int64).unique(sorted=True)
    return ts.flip(0)


def karras_timesteps(
    schedule: Schedule, steps: int, *, rho: float = 7.0, sigma_max: float | None = 80.0
) -> torch.Tensor:
    """Karras et al. 2022 sigmas ``(s_max^(1/rho) + i/(n-1) (s_min^(1/rho) - s_max^(1/rho)))^rho`` snapped to
    the nearest training timestep (in log sigma), made strictly decreasing; descending int64, starting at T-1.

    Snapping keeps the model on the timesteps it was trained on.  ``s_max`` is the schedule's largest finite
    sigma capped at ``sigma_max`` (EDM's 80: cosine / zero-terminal-SNR schedules reach sigma 1e4..inf, where
    a Karras ramp would spend its steps on pure noise); the first step is always T-1 (where x_T ~ N(0, I)).
    """
    T = schedule.num_timesteps
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in [1, {T}], got {steps}")
    if steps == 1:
        return torch.tensor([T - 1], dtype=torch.int64)
    log_sig = schedule.sigmas.log()
    hi = int(torch.isfinite(log_sig).nonzero().max())
    s_min, s_max = schedule.sigmas[0], schedule.sigmas[hi]
    if sigma_max is not None:
        s_max = s_max.clamp(max=sigma_max)
    prepend = hi < T - 1 or bool(s_max < schedule.sigmas[T - 1])
    n = steps - 1 if prepend else steps
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    sig = (s_max ** (1 / rho) + ramp * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
    idx = (sig.log()[:, None] - log_sig[None, : hi + 1]).abs().argmin(dim=1)
    out = [T - 1] if prepend else []
    for i, t in enumerate(idx.tolist()):  # strictly decreasing, leaving room for the remaining steps
        t = min(t, out[-1] - 1) if out else t
        out.append(max(t, n - 1 - i))
    return torch.tensor(out, dtype=torch.int64)


def extract(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``values[t]`` reshaped to ``(B, 1, ..., 1)`` to broadcast against ``like``; cast to its dtype/device.

    ``values`` is float64; the gather happens in float64 (on t's device, no host sync) and only the result is cast.
    """
    out = values.to(t.device)[t.detach().long()]
    out = out.to(device=like.device, dtype=like.dtype if like.is_floating_point() else torch.float32)
    return out.reshape(t.shape[0], *([1] * (like.ndim - 1)))
