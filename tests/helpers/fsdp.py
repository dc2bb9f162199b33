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


class ForwardProbe(L.Callback):
    """What a sharded network does inside its forward passes, written as JSON by rank 0 at the end of fit:

    * ``train_calls``: forward calls of the network's first sharding unit per training step (2 when activation
      checkpointing recomputes it in backward, 1 when it silently does not);
    * ``dtypes``: the dtype of the input and of the weight the first ``nn.Linear`` inside that unit sees in a training
      forward (bf16 under ``param_dtype=bfloat16``; fp32 if the policy silently did nothing);
    * ``val_batches``: validation batches each rank ran (gathered), ``checkpointing``: the units' flags.
    """

    def __init__(self, *, path: str) -> None:
        self.path, self.calls, self.dtypes, self.val_batches, self._in_step = path, [], None, 0, False

    @staticmethod
    def _net(pl_module):
        return pl_module.model if hasattr(pl_module, "model") else pl_module.net

    def on_fit_start(self, trainer, pl_module) -> None:
        from dalle2.lit.fsdp import SHARD_UNITS

        unit = next(m for m in self._net(pl_module).modules() if isinstance(m, SHARD_UNITS))
        linear = next(m for m in unit.modules() if isinstance(m, torch.nn.Linear))
        self.checkpointing = sorted(
            {
                type(m).__name__: bool(m.grad_checkpointing)
                for m in pl_module.modules()
                if hasattr(m, "grad_checkpointing")
            }.items()
        )

        def count(module, args):
            if self._in_step:
                self.calls[-1] += 1

        def seen(module, args):
            if self._in_step and self.dtypes is None:
                self.dtypes = [str(args[0].dtype), str(module.weight.dtype)]

        unit.register_forward_pre_hook(count)
        linear.register_forward_pre_hook(seen)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.calls.append(0)
        self._in_step = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._in_step = False

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.val_batches += 1

    def on_fit_end(self, trainer, pl_module) -> None:
        import json

        per_rank = [None] * trainer.world_size
        torch.distributed.all_gather_object(per_rank, self.val_batches)
        if trainer.is_global_zero:
            out = {"train_calls": self.calls, "dtypes": self.dtypes, "val_batches": per_rank}
            out["checkpointing"] = self.checkpointing
            with open(self.path, "w") as f:
                json.dump(out, f)
