"""Lightning-side reductions over ranks: validation means every rank reaches, and logging them as reduced."""

from __future__ import annotations

import functools
import warnings

import torch
import torch.distributed as dist

from dalle2.distributed import gather_ragged, is_distributed

__all__ = ["MeanAccumulator", "gather_ragged", "log_reduced", "release_process_group", "releases_process_group"]


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
