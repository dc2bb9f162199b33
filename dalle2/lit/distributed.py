"""Lightning-side collectives every rank reaches, and a failing rank that ends the job.

* :class:`MeanAccumulator`, :func:`log_reduced`: validation means over ranks, one collective every rank reaches.
* :class:`SameBatchCount`: the same number of evaluation batches on every rank (what sharded networks need).
* :class:`FailFast`, :class:`DDPStrategy`: a rank that fails prints one line naming itself (rank, step, error), and
  the ranks Lightning started on this node are stopped instead of waiting for the process-group timeout
  (``trainer.strategy.timeout``: a collective that waits longer than that fails on every rank still in it).
* :func:`releases_process_group`: every entry point releases the process group on exit.
"""

from __future__ import annotations

import functools
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy as _LightningDDP
from lightning.pytorch.utilities.exceptions import SIGTERMException

from dalle2.distributed import gather_ragged, is_distributed

__all__ = [
    "DDPStrategy",
    "FailFast",
    "MeanAccumulator",
    "SameBatchCount",
    "gather_ragged",
    "log_reduced",
    "release_process_group",
    "releases_process_group",
]


class MeanAccumulator:
    """Batch-size-weighted means of named scalars over one evaluation pass, reduced over ranks at its end.

    ``add`` is local; ``reduce`` is one collective (``all_gather_object``) that every rank reaches whether or not
    it saw a batch, so a rank whose validation shard is empty neither hangs the others nor skews the mean (it
    contributes no weight). Keys may differ between ranks (e.g. loss quartiles absent from a batch).
    """

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.weights: dict[str, float] = {}

    def add(self, metrics: dict[str, torch.Tensor | float], weight: float) -> None:
        for k, v in metrics.items():
            v = float(v.detach().float()) if isinstance(v, torch.Tensor) else float(v)
            self.sums[k] = self.sums.get(k, 0.0) + v * weight
            self.weights[k] = self.weights.get(k, 0.0) + weight

    def reduce(self) -> dict[str, float]:
        """The global means (an empty dict when no rank saw a sample); resets the accumulator."""
        parts = [(self.sums, self.weights)]
        if is_distributed():
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, (self.sums, self.weights))
        sums: dict[str, float] = {}
        weights: dict[str, float] = {}
        for s, w in parts:
            for k in s:
                sums[k] = sums.get(k, 0.0) + s[k]
                weights[k] = weights.get(k, 0.0) + w[k]
        self.sums, self.weights = {}, {}
        return {k: sums[k] / weights[k] for k in sorted(sums) if weights[k] > 0}


class SameBatchCount:
    """An evaluation dataloader that yields the same number of batches on every rank: the smallest rank's count.

    Before each batch every rank tells the others whether it has one (one ``all_gather`` of a flag), and all stop as
    soon as one has none — so every rank runs the same forward passes. That is what a sharded (FSDP) network needs:
    each forward all-gathers its weights, so a rank whose val shards ran out (or were empty) would otherwise leave the
    others waiting in their next forward (a hang), or meet them in a different collective (gloo: "Received data size
    doesn't match expected size"). Under DDP a forward is local and the reductions at the end (:class:`MeanAccumulator`,
    ``gather_ragged``) are reached by every rank, so DDP needs none of this and keeps every rank's batches.

    The batches a longer rank did not get to are left out; rank 0 warns (once per distinct count), naming the ranks
    that ran out. The wrapped loader's attributes (``worker_init_fn``, ``num_workers``, ...) read and write through.

    Args:
        dataloader: the rank's own evaluation loader (any iterable).
        device: where the flag lives (the process group's device: CUDA for NCCL).
        what: names the pass in the warning.
    """

    def __init__(self, dataloader: Any, *, device: torch.device | str = "cpu", what: str = "validation") -> None:
        object.__setattr__(self, "dataloader", dataloader)
        object.__setattr__(self, "device", torch.device(device))
        object.__setattr__(self, "what", what)
        object.__setattr__(self, "last_count", None)  # batches every rank ran in the last pass

    def __getattr__(self, name: str) -> Any:
        if name == "dataloader":  # not yet set (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.dataloader, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("device", "what", "last_count"):
            object.__setattr__(self, name, value)
        else:
            setattr(self.dataloader, name, value)

    def __iter__(self) -> Iterator[Any]:
        it = iter(self.dataloader)
        count = 0
        while True:
            try:
                batch, has = next(it), 1
            except StopIteration:
                batch, has = None, 0
            flags = _gather_flags(has, self.device)
            if min(flags) == 0:
                object.__setattr__(self, "last_count", count)
                if max(flags) == 1:
                    self._warn_uneven(count, flags)
                return
            count += 1
            yield batch

    def _warn_uneven(self, count: int, flags: list[int]) -> None:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() != 0:
            return
        out = [r for r, f in enumerate(flags) if not f]
        more = [r for r, f in enumerate(flags) if f]
        what = f"{count} batch(es) per rank" if count else "no batch on any rank (its metrics are not logged)"
        warnings.warn(
            f"{self.what} ran {what}: rank(s) {out} had no more {self.what} data, and every rank stops with the "
            f"smallest count (each forward of a sharded network is a collective); the remaining batches of rank(s) "
            f"{more} were left out. Give every rank the same number of {self.what} batches: as many shards of equal "
            "size per rank, or fewer shards than ranks (then every rank reads every shard and keeps its share of "
            "the samples)",
            stacklevel=2,
        )


def _gather_flags(flag: int, device: torch.device) -> list[int]:
    """Every rank's ``flag`` (one collective); ``[flag]`` outside a distributed run."""
    if not is_distributed():
        return [flag]
    t = torch.tensor([flag], dtype=torch.int32, device=device)
    out = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [int(o.item()) for o in out]


# what a collective raises when another rank is gone or silent (gloo: "Connection closed by peer", "Timed out
# waiting ... for recv"; NCCL's watchdog: "timed out"): this rank did not fail, it was left behind
_COLLECTIVE_WORDS = ("timed out", "timeout", "connection closed", "connection reset", "broken pipe", "peer")


class FailFast:
    """Mixin for a Lightning multi-process strategy: when a rank fails, the job ends promptly, naming the rank.

    ``on_exception`` (Lightning calls it on the failing process, after the callbacks') prints one line to stderr:

    * ``[dalle2] rank 1 of 8 failed at step 1200: DataStreamError: ...`` — the error arose on this rank;
    * ``[dalle2] rank 0 of 8 stopped at step 1200: a collective failed (...): another rank failed or stopped
      answering within trainer.strategy.timeout=0:10:00; look for its 'failed' line`` — this rank was left waiting.

    Then, on the process that launched this node's other ranks (Lightning's own launcher: ``trainer.devices=N`` run
    directly), those ranks are killed: one blocked in an NCCL collective would otherwise wait for the timeout. Ranks
    started by SLURM or torchrun are ended by them (``srun --kill-on-bad-exit=1``, which ``scripts/slurm/train.sbatch``
    and ``hydra/launcher=slurm`` set; torchrun's agent stops a failed group), and a rank nobody ends leaves its
    collective at the timeout. Preemption (``SIGTERMException``: every rank saves, together) and Ctrl-C are left to
    Lightning.
    """

    def on_exception(self, exception: BaseException) -> None:
        super().on_exception(exception)
        if isinstance(exception, (SIGTERMException, KeyboardInterrupt)):
            return
        print(failure_line(self, exception), file=sys.stderr, flush=True)
        procs = [p for p in getattr(self.launcher, "procs", None) or [] if p.poll() is None]
        if procs:
            print(
                f"[dalle2] rank {self.global_rank}: stopping the {len(procs)} other rank(s) it launched "
                f"(pids {[p.pid for p in procs]})",
                file=sys.stderr,
                flush=True,
            )
            for p in procs:
                p.kill()


def failure_line(strategy, exception: BaseException) -> str:
    """The one line :class:`FailFast` prints for ``exception`` on this rank."""
    trainer = getattr(strategy.lightning_module, "_trainer", None) if strategy.lightning_module is not None else None
    step = f" at step {trainer.global_step}" if trainer is not None else ""
    who = f"[dalle2] rank {strategy.global_rank} of {strategy.world_size}"
    first = (str(exception).strip().splitlines() or [""])[0][:300]
    error = f"{type(exception).__name__}: {first}"
    timeout = getattr(strategy, "_timeout", None)
    if isinstance(exception, dist.DistError) or any(w in first.lower() for w in _COLLECTIVE_WORDS):
        return (
            f"{who} stopped{step}: a collective failed ({error}): another rank failed or stopped answering within "
            f"trainer.strategy.timeout={timeout}; look for its '[dalle2] rank N of {strategy.world_size} failed' line"
        )
    return f"{who} failed{step}: {error}"


class DDPStrategy(FailFast, _LightningDDP):
    """Lightning's ``DDPStrategy`` with :class:`FailFast` (``conf/trainer/ddp.yaml``)."""


def log_reduced(module, metrics: dict[str, float], *, prog_bar: tuple[str, ...] = ()) -> None:
    """``module.log`` of metrics that are already reduced over ranks (the same value on every rank): no
    ``sync_dist``, and without Lightning's advice to use it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\(")
        for k, v in metrics.items():
            module.log(k, v, sync_dist=False, prog_bar=k in prog_bar)


def release_process_group() -> None:
    """Destroy the default process group, if any, before the interpreter exits.

    Lightning's DDP/FSDP strategies leave it initialised after ``fit`` (they destroy an NCCL group at ``atexit``, a
    gloo group never); a gloo group then torn down by static destructors at exit sometimes aborts the process
    ("terminate called without an active exception", exit -6, seen on a 2-process CPU run that had finished and
    saved), which a caller such as train_all reads as a failed stage. For NCCL this is what Lightning's ``atexit``
    does, only earlier. Local: no collective, so it cannot hang; a no-op outside a distributed run.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def releases_process_group(fn):
    """Decorate an entry point's ``main`` (under ``@hydra.main``) so that it calls ``release_process_group`` on the
    way out, whether it returns, raises or exits: every script that runs a Lightning trainer ends the same way."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        finally:
            release_process_group()

    return wrapper
