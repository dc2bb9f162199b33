"""Lightning callbacks shared by the stages."""

from __future__ import annotations

import time

import lightning as L
import torch


class ThroughputMonitor(L.Callback):
    """Logs ``perf/samples_per_sec`` (global, all ranks) and ``perf/step_time`` over a window of training steps."""

    def __init__(self, *, window: int = 10, batch_key: str | None = None):
        self.window, self.batch_key = window, batch_key
        self._t0: float | None = None
        self._samples = 0
        self._steps = 0

    @staticmethod
    def _batch_size(batch) -> int:
        if isinstance(batch, dict):
            for v in batch.values():
                if isinstance(v, torch.Tensor) and v.ndim > 0:
                    return v.shape[0]
                if isinstance(v, list):
                    return len(v)
        if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
            return batch[0].shape[0]
        return 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._t0 is None:
            self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._samples += self._batch_size(batch)
        self._steps += 1
        if self._steps >= self.window:
            dt = time.perf_counter() - self._t0
            world = trainer.world_size
            pl_module.log_dict(
                {"perf/samples_per_sec": self._samples * world / dt, "perf/step_time": dt / self._steps},
                rank_zero_only=True,
            )
            self._t0, self._samples, self._steps = time.perf_counter(), 0, 0
