"""Optimiser helpers shared by every stage: decay/no-decay parameter groups and warm-up + cosine schedules."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

# Parameter names that never get weight decay, besides every tensor with ndim < 2 (gains and biases).
NO_DECAY_KEYWORDS = ("embedding", "class_embedding", "positional", "logit_scale", "null", "query", "pos_emb")


def param_groups(module: nn.Module, *, weight_decay: float) -> list[dict]:
    """AdamW groups: ``weight_decay`` on matrices/kernels, 0 on gains, biases, embeddings and learned tokens."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or any(k in name for k in NO_DECAY_KEYWORDS):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def default_adamw(
    params: Iterable, *, lr: float = 3e-4, betas=(0.9, 0.99), eps: float = 1e-8, weight_decay=0.0, **kwargs
) -> torch.optim.AdamW:
    """AdamW with the fused kernel (one pass over all parameters, on CPU too: ~10x faster than ``foreach`` there,
    bench/train_step.py compare=optimizer), falling back to the ``foreach`` kernel where fused is unsupported."""
    params = list(params)
    common = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, **kwargs)
    try:
        opt = torch.optim.AdamW(params, fused=True, **common)
    except (RuntimeError, ValueError):  # a device or dtype without the fused kernel
        return torch.optim.AdamW(params, foreach=True, **common)
    # Let a GradScaler unscale the gradients before step() as it does for any optimizer (instead of handing the
    # scale to the fused kernel): Lightning refuses gradient clipping under mixed precision otherwise.
    opt._step_supports_amp_scaling = False
    return opt


def _with_fast_kernel(optimizer: Callable) -> Callable:
    """A ``torch.optim.AdamW`` partial that names neither ``fused`` nor ``foreach`` -> the same partial built by
    :func:`default_adamw` (PyTorch's own default on CPU is the slow per-tensor loop)."""
    if (
        isinstance(optimizer, functools.partial)
        and optimizer.func is torch.optim.AdamW
        and not optimizer.args
        and not {"fused", "foreach"} & set(optimizer.keywords)
    ):
        return functools.partial(default_adamw, **optimizer.keywords)
    return optimizer


def warmup_cosine(
    optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 0 over ``warmup_steps``, then cosine decay to ``min_lr_ratio * lr`` at ``total_steps``."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive for a cosine schedule, got {total_steps}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def constant_with_warmup(optimizer: torch.optim.Optimizer, *, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, warmup_steps)))


def build_optimizers(
    module: nn.Module,
    optimizer: Callable | None,
    scheduler: Callable | None,
    *,
    default_lr: float = 3e-4,
    default_weight_decay: float = 0.0,
) -> dict:
    """The ``configure_optimizers`` return value from Hydra partials (``_partial_: true``) or defaults.

    ``optimizer(params)`` gets decay/no-decay groups whose weight decay is taken from the partial's own
    ``weight_decay`` keyword; ``scheduler(optimizer)`` is stepped every training step.  A plain ``torch.optim.AdamW``
    partial gets the fused kernel (see :func:`default_adamw`) unless it sets ``fused`` or ``foreach`` itself.
    """
    if optimizer is None:
        opt = default_adamw(param_groups(module, weight_decay=default_weight_decay), lr=default_lr)
    else:
        wd = getattr(optimizer, "keywords", {}).get("weight_decay", default_weight_decay)
        opt = _with_fast_kernel(optimizer)(param_groups(module, weight_decay=wd))
    out: dict = {"optimizer": opt}
    if scheduler is not None:
        out["lr_scheduler"] = {"scheduler": scheduler(opt), "interval": "step", "frequency": 1}
    return out
