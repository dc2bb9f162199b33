"""Fault tolerance for every stage: non-finite steps skipped, per-step seeds, preemption, atomic checkpoints.

* :class:`NonFiniteGuard` — a non-finite gradient (a NaN/inf loss makes every gradient non-finite) skips the
  optimizer step (the gradients are dropped, so AdamW leaves weights and moments alone), counts it as
  ``train/nonfinite_skipped`` and stops the run after ``max_consecutive`` in a row with
  :class:`NonFiniteLossError` naming the step and the last checkpoint.
* :class:`StepSeed` — reseeds torch / numpy / random at every training batch from ``(seed, batch, rank)``:
  the randomness of batch ``i`` (noise, timesteps, dropout, CFG drops) does not depend on what ran before,
  so a resumed run draws the same numbers as an uninterrupted one (and validation or sampling in between
  never shifts the training stream). This replaces saving and restoring RNG states.
* :class:`Preemption` — SIGTERM or SIGUSR1 (unless Lightning's SLURM auto-requeue owns it), delivered to any
  one rank, makes every rank finish the same step, save ``checkpoints/last.ckpt``, and ``train/train.py``
  exits with :attr:`Preemption.exit_code` (143 by default: "terminated, resume me").
* :class:`AtomicCheckpointIO` — local checkpoints are written to a temp file in the same directory, fsynced,
  then renamed over the target: a kill or a full disk mid-save leaves the previous file intact.
* :class:`RunCheckpoint` — ``ModelCheckpoint`` keeping the last K periodic checkpoints, and the final step always
  in ``last.ckpt``. (Lightning's own local save
  goes through an fsspec transaction whose temp file lives in ``$TMPDIR``; across filesystems its final
  move is a copy, which a kill can cut short.)
"""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from dalle2.distributed import local_shard
from dalle2.io import atomic_write
from dalle2.seeding import mix_seed

__all__ = [
    "AtomicCheckpointIO",
    "CheckpointSaveError",
    "NonFiniteGuard",
    "NonFiniteLossError",
    "Preemption",
    "RunCheckpoint",
    "StepSeed",
    "last_checkpoint",
]


class NonFiniteLossError(RuntimeError):
    """Too many non-finite steps in a row."""


def last_checkpoint(trainer: L.Trainer) -> str | None:
    """The newest checkpoint this run wrote (``ModelCheckpoint.last_model_path``, else its newest file)."""
    cb = trainer.checkpoint_callback
    if cb is None:
        return None
    if getattr(cb, "last_model_path", "") and os.path.exists(cb.last_model_path):  # a file, or a sharded dir
        return cb.last_model_path
    files = sorted(Path(cb.dirpath).glob("*.ckpt"), key=lambda p: p.stat().st_mtime) if cb.dirpath else []
    return str(files[-1]) if files else None


def _distributed(trainer: L.Trainer) -> bool:
    return trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()


class NonFiniteGuard(L.Callback):
    """Skip optimizer steps whose gradients are not finite; stop after ``max_consecutive`` in a row.

    A skipped step changes nothing that training carries: the gradients are dropped (AdamW leaves weights and
    moments alone), the EMA is not updated (:class:`~dalle2.lit.diffusion_base.DiffusionStageModule` updates it only
    after a step with gradients), and BatchNorm running statistics are put back to where they were before the
    step's forward passes (a NaN batch would otherwise poison them). The step still counts: ``global_step`` and
    the LR schedule advance as if it had been taken.

    The decision is global: under several processes the flags are combined (``all_reduce(MIN)``), so a step is
    skipped on every rank or on none (also when each rank holds only a shard of the gradients). It runs in
    ``on_before_optimizer_step``, after backward (and after ``GradScaler.unscale_`` under ``16-mixed``).
    Under a GradScaler (``16-mixed`` on GPUs) an overflowing step is skipped likewise, but only a step whose
    *loss* is non-finite counts towards ``max_consecutive``: overflows are how the scaler calibrates itself.
    """

    def __init__(self, *, max_consecutive: int = 10, log: bool = True) -> None:
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1, got {max_consecutive}")
        self.max_consecutive, self.log = max_consecutive, log
        self.skipped = 0
        self.consecutive = 0
        self.last_good_step: int | None = None
        self._decided: tuple[int, bool] | None = None  # (step, skipped) of the optimizer step of this batch
        self._bn_snapshot: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    @staticmethod
    def _bn_buffers(pl_module: L.LightningModule) -> list[torch.Tensor]:
        return [
            b
            for m in pl_module.modules()
            if isinstance(m, torch.nn.modules.batchnorm._NormBase)
            for b in (m.running_mean, m.running_var, m.num_batches_tracked)
            if b is not None
        ]

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._bn_snapshot is None:  # the first micro-batch of an accumulation window
            self._bn_snapshot = [(b, b.detach().clone()) for b in self._bn_buffers(pl_module)]

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        finite = True
        if params:
            # each rank checks its own shard of a sharded (FSDP2, DTensor) gradient; the all_reduce below combines them
            norms = torch._foreach_norm([local_shard(p.grad) for p in params])
            finite = bool(torch.isfinite(torch.stack([n.float() for n in norms])).all())  # one sync per step
        if _distributed(trainer):
            flag = torch.tensor([1 if finite else 0], device=pl_module.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            finite = bool(flag.item())
        if not finite:
            for p in params:
                p.grad = None  # AdamW (and SGD, ...) skip parameters without gradients: no update, no decay
            for buf, saved in self._bn_snapshot or []:
                buf.copy_(saved)
        self._bn_snapshot = None
        self._decided = (trainer.global_step, not finite)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if self._decided is None:  # accumulating: no optimizer step in this batch
            return
        step, skipped = self._decided
        self._decided = None
        if not skipped:
            self.consecutive = 0
            self.last_good_step = step
        else:
            self.skipped += 1
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
            loss_finite = isinstance(loss, torch.Tensor) and bool(torch.isfinite(loss.detach()).all())
            scaler = getattr(trainer.precision_plugin, "scaler", None)
            if scaler is not None and _distributed(trainer):
                # every rank reaches this branch (the skip is decided globally): decide the count globally too, or
                # one rank would stop (NonFiniteLossError) while the others wait for it in their next collective
                flag = torch.tensor([1 if loss_finite else 0], device=pl_module.device)
                torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
                loss_finite = bool(flag.item())
            if scaler is None or not loss_finite:
                self.consecutive += 1
                rank_zero_warn(
                    f"non-finite loss/gradients at step {step}: optimizer step skipped "
                    f"({self.consecutive} in a row, {self.skipped} in all)"
                )
        if self.log:
            pl_module.log("train/nonfinite_skipped", float(self.skipped), on_step=True, on_epoch=False)
        if self.consecutive >= self.max_consecutive:
            good = "none yet" if self.last_good_step is None else f"step {self.last_good_step}"
            raise NonFiniteLossError(
                f"{self.consecutive} consecutive non-finite losses/gradients, the last at step {step} "
                f"(last finite step: {good}); stopping. Last good checkpoint: {last_checkpoint(trainer) or 'none saved'}. "
                "Resume from it with a lower learning rate, gradient clipping, or after checking the data."
            )

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "consecutive": self.consecutive, "last_good_step": self.last_good_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))
        self.consecutive = int(state_dict.get("consecutive", 0))
        self.last_good_step = state_dict.get("last_good_step")


class StepSeed(L.Callback):
    """Seed torch (all devices), numpy and random at the start of every training batch from
    ``(seed, total batch index, global rank)``.

    The batch index counts every batch of the fit (it survives a resume, unlike ``batch_idx`` which restarts
    each epoch), so gradient accumulation still draws different numbers for each micro-batch.
    """

    def __init__(self, *, seed: int = 0) -> None:
        self.seed = seed

    def batch_seed(self, batch_index: int, rank: int) -> int:
        return mix_seed(self.seed, batch_index, rank, bits=32)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        s = self.batch_seed(trainer.fit_loop.total_batch_idx, trainer.global_rank)
        torch.manual_seed(s)
        np.random.seed(s)
        random.seed(s)


class Preemption(L.Callback):
    """Stop cleanly when told to (SIGTERM, or SIGUSR1): every rank finishes the same step, saves
    ``checkpoints/last.ckpt`` and ``train/train.py`` exits with :attr:`exit_code` (143: "terminated, resume me").

    A scheduler may signal one process only (rank 0, or any other). The signal handler therefore only notes
    the request (no collective, no forwarding: Lightning's own SIGTERM handler broadcasts from inside the
    handler, which deadlocks when the signal reaches a rank other than 0); at the end of every training batch
    all ranks agree with one ``all_reduce(MAX)`` of the flags, and if any rank was signalled every rank sets
    Lightning's ``received_sigterm`` at the same step. Lightning then raises ``SIGTERMException`` on all ranks
    together and :meth:`on_exception` saves (a collective save, reached by every rank).

    Under SLURM with Lightning's auto-requeue, SIGUSR1 (the requeue signal) stays Lightning's (it saves
    ``hpc_ckpt_<n>.ckpt`` and requeues the job). The checkpoint goes to the ModelCheckpoint's directory as
    ``last.ckpt`` so that ``ckpt_path=last`` finds it.
    """

    def __init__(self, *, exit_code: int = 143, signals: tuple[str, ...] | list[str] = ("SIGUSR1",)) -> None:
        self.exit_code = exit_code
        self.signals = tuple(dict.fromkeys(("SIGTERM", *signals)))
        self.saved_path: str | None = None
        self.saved_step: int | None = None
        self.requested: str | None = None  # the signal this process received (not yet agreed on)
        self._installed: dict[int, Any] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # on_train_start runs after Lightning registered its handlers (Trainer._run), so these replace them
        env = trainer._accelerator_connector.cluster_environment
        slurm_owned = isinstance(env, SLURMEnvironment) and env.auto_requeue
        self.requested = None
        for name in self.signals:
            signum = getattr(signal, name)
            if slurm_owned and signum == env.requeue_signal:
                continue
            try:
                self._installed[signum] = signal.signal(signum, self._handler)
            except ValueError:  # not in the main thread
                pass

    def _handler(self, signum, frame) -> None:
        if self.requested is None:
            print(f"[dalle2] received {signal.Signals(signum).name}: stopping after this step", flush=True)
        self.requested = signal.Signals(signum).name

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        flag = torch.tensor([0 if self.requested is None else 1], device=pl_module.device)
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item():
            trainer._signal_connector.received_sigterm = True  # Lightning stops every rank after this batch

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, old in self._installed.items():
            try:
                signal.signal(signum, old)
            except (ValueError, TypeError):
                pass
        self._installed = {}

    def checkpoint_path(self, trainer: L.Trainer) -> str:
        cb = trainer.checkpoint_callback
        if cb is not None and cb.dirpath:
            return os.path.join(cb.dirpath, cb.CHECKPOINT_NAME_LAST + cb.FILE_EXTENSION)
        return os.path.join(trainer.default_root_dir, "checkpoints", "last.ckpt")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()
        if not isinstance(exception, SIGTERMException):
            return
        path = self.checkpoint_path(trainer)
        cb = trainer.checkpoint_callback
        if cb is not None and hasattr(cb, "last_model_path"):
            cb.last_model_path = path
        trainer.save_checkpoint(path)
        self.saved_path, self.saved_step = path, trainer.global_step
        rank_zero_info(f"[dalle2] preempted at step {trainer.global_step}: saved {path}")


class CheckpointSaveError(OSError):
    """A checkpoint could not be written (disk full, quota, I/O error); the previous file is intact."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to a temp file beside the target, fsync, then ``os.replace`` (:func:`dalle2.io.atomic_write`; remote paths:
    Lightning's default). A failed write (disk full mid-save) removes the temp file, leaves the previous
    checkpoint at ``path`` untouched and raises :class:`CheckpointSaveError` saying so."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path_str = os.fspath(path)
        if "://" in path_str and not path_str.startswith("file://"):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path_str = path_str.removeprefix("file://")
        try:
            with atomic_write(path_str) as f:
                torch.save(checkpoint, f)
        except OSError as exn:
            raise CheckpointSaveError(
                f"could not write checkpoint {path_str}: {exn}. The partial file was removed and no existing "
                "checkpoint was changed (last.ckpt holds the last good save). Free disk space (or point "
                "callbacks.model_checkpoint.dirpath elsewhere), then resume with ckpt_path=last"
            ) from exn


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` with the guarantees a week-long run needs.

    * ``keep_last=K``: keep the K newest periodic checkpoints (``step_*.ckpt``) and remove older ones as new ones
      are written — only files this callback wrote (Lightning's top-k bookkeeping, monitor ``step``, which a
      resumed run restores); ``last.ckpt`` is always kept. ``-1`` keeps every one. Giving ``monitor`` (e.g.
      ``val/loss``) keeps the K best by that metric instead, Lightning's way.
    * The final step is always in ``last.ckpt``: Lightning skips its end-of-training save once any ``last`` was
      written, so a run whose ``max_steps`` is not a multiple of ``every_n_train_steps`` would end with a stale
      ``last.ckpt``.
    * A run dir that was moved or copied resumes into its own ``last.ckpt``: no version counter, which made
      Lightning write ``last-v1.ckpt`` beside the copied ``last.ckpt`` (its restored state named the old dir) and
      left every reader of ``last.ckpt`` on the stale step.  A new run never starts in a used dir
      (``resolve_ckpt_path``), so nothing of another run is overwritten.
    """

    def __init__(self, *, keep_last: int = -1, monitor: str | None = None, mode: str = "max", **kwargs: Any) -> None:
        if monitor is None and keep_last != -1:
            monitor, mode = "step", "max"
        kwargs.setdefault("enable_version_counter", False)
        super().__init__(monitor=monitor, mode=mode, save_top_k=keep_last, **kwargs)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_last and not trainer.sanity_checking and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        super().on_train_end(trainer, pl_module)
