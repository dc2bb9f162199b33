"""Lightning callbacks shared by the stages, and the CSV logger that keeps a resumed run's metrics history."""

from __future__ import annotations

import csv
import time

import lightning as L
import torch
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_only

from dalle2.io import atomic_write


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


# -- metrics history across resumes ---------------------------------------------------------------------------------


def _row_step(row: dict) -> float | None:
    try:
        return float(row.get("step") or "")
    except ValueError:
        return None


class _HistoryWriter(ExperimentWriter):
    """Lightning's CSV writer, except that an existing ``metrics.csv`` is kept (Lightning deletes it when the
    writer starts): its rows are read, and at the first save the file is rewritten (atomically) with the rows
    before the first step this run logs, then this run's rows — a resume redoes the steps from its checkpoint on,
    so the dead run's rows of those steps are replaced, the earlier ones kept."""

    def _check_log_dir_exists(self) -> None:
        self._history: tuple[list[str], list[dict]] | None = None
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            self._history = (list(reader.fieldnames or []), rows)

    def save(self) -> None:
        if self._history is not None and self.metrics:
            fieldnames, rows = self._history
            first = min(float(m["step"]) for m in self.metrics)
            kept = [r for r in rows if (s := _row_step(r)) is None or s < first]
            self.metrics_keys = sorted(set(fieldnames) | set().union(*self.metrics))
            with atomic_write(self.metrics_file_path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self.metrics_keys, restval="")
                writer.writeheader()
                writer.writerows(kept)
                writer.writerows(self.metrics)
            self.metrics, self._history = [], None
            dropped = len(rows) - len(kept)
            print(
                f"[dalle2] {self.metrics_file_path}: kept {len(kept)} rows of the earlier run"
                + (f", replaced its {dropped} rows from step {first:.0f} on (redone by this run)" if dropped else ""),
                flush=True,
            )
        super().save()


class HistoryCSVLogger(CSVLogger):
    """Lightning's ``CSVLogger`` for a run that may be resumed: ``metrics.csv`` keeps the whole history.

    Lightning's own deletes ``metrics.csv`` when a run resumes into the same folder (the loss curve of every step
    before the resume is gone). This one keeps the earlier rows before the first step the resumed run logs and
    appends the new ones (see :class:`_HistoryWriter`); and it writes its buffered rows to disk after every
    checkpoint save (and the next row, logged just after it), so what a kill loses is only what the checkpoint
    loses too — not up to ``flush_logs_every_n_steps`` of rows."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._flush_next = False

    @property
    @rank_zero_experiment
    def experiment(self) -> _HistoryWriter:
        if self._experiment is not None:
            return self._experiment
        self._fs.makedirs(self.root_dir, exist_ok=True)
        self._experiment = _HistoryWriter(log_dir=self.log_dir)
        return self._experiment

    @rank_zero_only
    def log_metrics(self, metrics, step=None) -> None:
        super().log_metrics(metrics, step)
        if self._flush_next:
            self._flush_next = False
            self.save()

    @rank_zero_only
    def after_save_checkpoint(self, checkpoint_callback) -> None:
        # the step that was just checkpointed logs its row right after the save: flush now and after that row
        self.save()
        self._flush_next = True
