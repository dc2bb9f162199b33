"""Exponential moving average of a module's parameters, updated with ``torch._foreach_*`` kernels."""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch
from torch import nn

from dalle2.distributed import local_shard


class EMA(nn.Module):
    """Holds a frozen shadow copy of ``model`` whose parameters track ``decay``-weighted averages.

    ``decay_at(step) = min(decay, (1 + step) / (warmup + step))`` (warm-up as in guided-diffusion/DALLE2-pytorch);
    buffers (e.g. norm statistics) are copied as they are.  The shadow is a real module: call ``ema.module(x)``.
    It is an ``nn.Module`` so that it lands in the LightningModule's state_dict and checkpoint.
    """

    def __init__(self, model: nn.Module, *, decay: float = 0.9999, warmup: int = 10, update_every: int = 1):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay, self.warmup, self.update_every = decay, warmup, update_every
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (self.warmup + step)) if self.warmup > 0 else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int | None = None) -> None:
        step = int(self.num_updates) if step is None else step
        self.num_updates += 1
        if step % self.update_every:
            return
        d = self.decay_at(step)
        # sharded (FSDP2) parameters: the EMA copy is sharded alike, so each rank averages its own shards
        ema_p = [local_shard(p) for p in self.module.parameters() if p.dtype.is_floating_point]
        src_p = [local_shard(p.detach()) for p in model.parameters() if p.dtype.is_floating_point]
        if len(ema_p) != len(src_p) or any(a.shape != b.shape for a, b in zip(ema_p, src_p)):
            raise ValueError("EMA shadow and model have different parameter lists (or shardings)")
        torch._foreach_lerp_(ema_p, src_p, 1.0 - d)
        for b_ema, b in zip(self.module.buffers(), model.buffers()):
            b_ema.copy_(b)

    def train(self, mode: bool = True) -> "EMA":
        # the shadow always stays in eval mode
        super().train(mode)
        self.module.eval()
        return self

    @contextmanager
    def swapped_into(self, model: nn.Module):
        """Temporarily load the EMA weights into ``model`` (restored on exit)."""
        backup = copy.deepcopy(model.state_dict())
        model.load_state_dict(self.module.state_dict())
        try:
            yield model
        finally:
            model.load_state_dict(backup)
