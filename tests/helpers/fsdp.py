"""What the FSDP tests read out of a training run: a callback, added to a ``train/train.py`` run from the command line
(``+callbacks.probe._target_=helpers.fsdp.FullStateProbe +callbacks.probe.path=...``), that writes — whatever the
strategy (DDP or FSDP2) — the full gradients of every optimizer step, the full final state (network and EMA) and the
bytes each process holds in parameters, optimizer state and EMA."""

from __future__ import annotations

import lightning as L
import torch
from torch.distributed.tensor import DTensor


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (a collective for a DTensor: every rank must call it)."""
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().float().cpu().clone()


def local_bytes(tensors) -> int:
    return sum((t.to_local() if isinstance(t, DTensor) else t).numel() * t.element_size() for t in tensors)


class FullStateProbe(L.Callback):
    """``torch.save({"grads": [{name: grad}, ...per step], "state": {name: tensor}, "bytes": {...per rank}}, path)``
    from rank 0 at the end of training (the gathering is done on every rank)."""

    def __init__(self, *, path: str) -> None:
        self.path, self.grads = path, []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads.append({n: full(p.grad) for n, p in pl_module.net.named_parameters() if p.grad is not None})

    def on_train_end(self, trainer, pl_module) -> None:
        state = {k: full(v) for k, v in pl_module.state_dict().items() if v.is_floating_point()}
        opt = trainer.optimizers[0]
        counts = {
            "params": local_bytes(pl_module.net.parameters()),
            "optimizer": local_bytes(
                t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor) and t.ndim > 0
            ),
            "ema": local_bytes(pl_module.ema.module.parameters()),
        }
        per_rank = [None] * trainer.world_size
        torch.distributed.all_gather_object(per_rank, counts)
        if trainer.is_global_zero:
            torch.save({"grads": self.grads, "state": state, "bytes": per_rank}, self.path)
