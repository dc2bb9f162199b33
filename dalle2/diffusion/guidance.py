"""Classifier-free guidance and x0 transforms, as wrappers (never flags inside a network).

``cfg_model_fn(model_fn, guidance_scale=s)`` returns a model function that evaluates the conditional and the
unconditional branch in ONE batched call on ``[cond; uncond]`` and returns ``uncond + s (cond - uncond)``.
The networks' convention for dropping conditioning is keyword flags ``drop_<name>: (B,) bool`` (True -> the
learned null embedding); by default the unconditional kwargs are the conditional ones with every ``drop_*``
flag set to all-True.  ``static_clip`` / ``dynamic_threshold`` are ``x0_transform`` functions for the samplers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["cfg_model_fn", "drop_all_conditioning", "static_clip", "dynamic_threshold"]


def drop_all_conditioning(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Default unconditional kwargs: every ``drop_*`` flag (must be present, e.g. all-False) set to all-True."""
    keys = [k for k in kwargs if k.startswith("drop_")]
    if not keys:
        raise ValueError(
            "classifier-free guidance needs drop_* kwargs (e.g. drop_image_embed=torch.zeros(B, dtype=torch.bool)) "
            "or an explicit make_uncond= / uncond_kwargs="
        )
    out = dict(kwargs)
    for k in keys:
        v = kwargs[k]
        out[k] = torch.ones_like(v, dtype=torch.bool) if isinstance(v, Tensor) else True
    return out


def _cat(a: Any, b: Any, batch: int, name: str) -> Any:
    if isinstance(a, Tensor) and isinstance(b, Tensor) and a.ndim > 0 and a.shape[0] == batch and b.shape[0] == batch:
        return torch.cat([a, b.to(a.device)], dim=0)
    if a is b or (not isinstance(a, Tensor) and not isinstance(b, Tensor) and a == b):
        return a
    if isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and torch.equal(a, b):
        return a
    raise ValueError(f"cfg: kwarg {name!r} differs between cond and uncond but is not a (B, ...) tensor")


def cfg_model_fn(
    model_fn: Callable[..., Tensor],
    *,
    guidance_scale: float | Tensor,
    make_uncond: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None,
    uncond_kwargs: Mapping[str, Any] | None = None,
    learned_variance: bool = False,
) -> Callable[..., Tensor]:
    """Wrap ``model_fn(x, t, **kwargs)`` with classifier-free guidance.

    Args:
        guidance_scale: ``s`` (float or ``(B,)`` tensor); 1 = conditional model, 0 = unconditional.  A call
            may override it with a ``guidance_scale=`` keyword (popped before the model sees the kwargs).
        make_uncond: cond kwargs -> uncond kwargs (default :func:`drop_all_conditioning`).
        uncond_kwargs: alternative: a dict merged over the cond kwargs.
        learned_variance: the output's dim 1 is ``[mean; variance]``: guide the mean half only and keep the
            conditional variance channels.

    The wrapped function makes exactly one ``model_fn`` call per invocation (on the batch ``[cond; uncond]``,
    or on the cond/uncond batch alone when the scale is the scalar 1 or 0).
    """
    if make_uncond is not None and uncond_kwargs is not None:
        raise ValueError("give make_uncond= or uncond_kwargs=, not both")
    if uncond_kwargs is not None:
        fixed = dict(uncond_kwargs)
        make_uncond = lambda kw: {**kw, **fixed}  # noqa: E731
    make_uncond = make_uncond or drop_all_conditioning
    default_scale = guidance_scale

    def guided(x: Tensor, t: Tensor, **kwargs: Any) -> Tensor:
        scale = kwargs.pop("guidance_scale", default_scale)
        uncond = make_uncond(kwargs)
        if not isinstance(scale, Tensor):
            if scale == 1.0:
                return model_fn(x, t, **kwargs)
            if scale == 0.0 and not learned_variance:  # (with learned variance the cond variance is still needed)
                return model_fn(x, t, **uncond)
        B = x.shape[0]
        keys = set(kwargs) | set(uncond)
        both = {k: _cat(kwargs.get(k), uncond.get(k), B, k) for k in keys}
        out = model_fn(torch.cat([x, x]), torch.cat([t, t]), **both)
        cond, unc = out[:B], out[B:]
        if learned_variance:
            (c_mean, c_var), (u_mean, _) = cond.chunk(2, dim=1), unc.chunk(2, dim=1)
        else:
            c_mean, u_mean, c_var = cond, unc, None
        s = torch.as_tensor(scale, device=x.device, dtype=c_mean.dtype)
        if s.ndim == 1:
            s = s.reshape(-1, *([1] * (c_mean.ndim - 1)))
        mean = u_mean + s * (c_mean - u_mean)
        return torch.cat([mean, c_var], dim=1) if c_var is not None else mean

    return guided


def static_clip(x0: Tensor, limit: float = 1.0) -> Tensor:
    """Clamp the x0 prediction to ``[-limit, limit]`` (images in [-1, 1])."""
    return x0.clamp(-limit, limit)


def dynamic_threshold(x0: Tensor, percentile: float = 0.995, *, min_threshold: float = 1.0) -> Tensor:
    """Imagen dynamic thresholding: per sample ``s = max(quantile(|x0|, p), 1)``; clamp to ``[-s, s]`` and divide by s."""
    flat = x0.reshape(x0.shape[0], -1).abs().float()
    s = torch.quantile(flat, percentile, dim=1).clamp(min=min_threshold).to(x0.dtype)
    s = s.reshape(-1, *([1] * (x0.ndim - 1)))
    return torch.maximum(torch.minimum(x0, s), -s) / s
