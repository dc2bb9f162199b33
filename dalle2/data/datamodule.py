"""LightningDataModule over WebDataset shards, and a callback that logs skipped samples.

The datamodule checks shard urls in ``setup()`` (so a missing shard fails before training starts), builds a
resampled training stream and a deterministic validation pass (:mod:`dalle2.data.webdataset`), and pops the
per-batch ``"skipped"`` counts in ``on_before_batch_transfer`` into :attr:`WebDataModule.skipped` — so the
LightningModule never sees them (a module that overrides ``on_before_batch_transfer`` itself is overruled by
Lightning in favour of the datamodule's hook).
"""

from __future__ import annotations

import copy
import warnings
from collections import Counter
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from dalle2.data.guard import StreamGuard
from dalle2.data.webdataset import _rank_world, expand_urls, make_dataset, stream_position


class WebDataModule(pl.LightningDataModule):
    """Batches of ``{"image", "tokens", "caption", "key", "meta"[, "img_emb", "txt_emb", "txt_tokens"]}``.

    Args:
        train_urls, val_urls: brace-expanded shard urls (``/data/{00000..00099}.tar``), ``::``-joined or lists.
        image_size: side S of the (3, S, S) images in [-1, 1].
        batch_size, val_batch_size: per-rank batch sizes (``val_batch_size=None`` → ``batch_size``).
        epoch_size: training samples per rank per epoch (``None``: counted from local shards / world size).
        tokenizer_path: BPE vocab for :func:`dalle2.clip.tokenizer.get_tokenizer` (``None``: the shipped one);
            a callable tokenizer may be passed as ``tokenizer=`` instead.
        load_image / load_embeddings: what each sample must carry (embedding shards add ``*.npy`` members).
        max_consecutive_skips, max_consecutive_bad_shards: the training stream stops with
            :class:`~dalle2.data.guard.DataStreamError` naming why after this many skipped samples in a row, or
            shards in a row that yielded no sample (``None``: unbounded); validation only warns when it yields nothing.
        max_skipped_fraction, skip_window: the training stream also stops when more than this share of a worker's
            last ``skip_window`` samples was skipped (``None``: unbounded), naming the counts.
        url_commands: ``{scheme: "command {url}"}`` reading object-store urls (defaults: ``s3://`` → ``aws s3 cp
            {url} -``, ``gs://`` → ``gcloud storage cat {url}``; see :mod:`dalle2.data.urls`).
    """

    def __init__(
        self,
        *,
        train_urls: str | list[str],
        val_urls: str | list[str] | None = None,
        image_size: int = 64,
        batch_size: int = 32,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        epoch_size: int | None = None,
        shuffle_buffer: int = 1000,
        random_crop: bool = False,
        tokenizer_path: str | None = None,
        context_length: int = 77,
        load_image: bool = True,
        load_embeddings: bool = False,
        seed: int = 0,
        persistent_workers: bool = True,
        pin_memory: bool = False,
        prefetch_factor: int = 2,
        tokenizer: Callable[..., torch.Tensor] | None = None,
        max_consecutive_skips: int | None = 1000,
        max_consecutive_bad_shards: int | None = 50,
        max_skipped_fraction: float | None = 0.5,
        skip_window: int = 1000,
        url_commands: dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.train_urls = train_urls
        self.val_urls = val_urls
        self.image_size = image_size
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.epoch_size = epoch_size
        self.shuffle_buffer = shuffle_buffer
        self.random_crop = random_crop
        self.tokenizer_path = tokenizer_path
        self.context_length = context_length
        self.load_image = load_image
        self.load_embeddings = load_embeddings
        self.seed = seed
        self.persistent_workers = persistent_workers
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor
        self.tokenizer = tokenizer
        # check the bounds now, not at the first training batch
        self.guard_bounds = dict(
            max_consecutive_skips=max_consecutive_skips,
            max_consecutive_bad_shards=max_consecutive_bad_shards,
            max_skipped_fraction=max_skipped_fraction,
            skip_window=skip_window,
        )
        StreamGuard(**self.guard_bounds)
        self.max_consecutive_skips = max_consecutive_skips
        self.max_consecutive_bad_shards = max_consecutive_bad_shards
        self.url_commands = dict(url_commands or {})
        self.epoch = 0
        self.skipped: dict[str, int] = {}
        self._unlogged: Counter = Counter()
        self._train_shards: list[str] | None = None
        self._position: dict | None = None  # the training stream position of the last consumed batch (this rank)
        self._resume_position: dict | None = None
        self._val_shards: list[str] | None = None

    # ----------------------------------------------------------------------------------------- setup

    def setup(self, stage: str | None = None) -> None:
        """Expand and check the shard urls (``FileNotFoundError`` naming a missing shard, ``ValueError`` naming a url
        whose scheme nothing reads) and load the tokenizer."""
        if stage in (None, "fit") and self._train_shards is None:
            self._train_shards = expand_urls(self.train_urls, url_commands=self.url_commands)
        if self.val_urls is not None and self._val_shards is None:
            self._val_shards = expand_urls(self.val_urls, url_commands=self.url_commands)
        if self.tokenizer is None:
            from dalle2.clip.tokenizer import get_tokenizer

            self.tokenizer = get_tokenizer(self.tokenizer_path)

    def _rank_world(self) -> tuple[int, int]:
        """This process's rank and the world size: the trainer's when one is attached (its cluster environment —
        SLURM, torchrun, Lightning's own launcher — is right before any process group exists), else
        torch.distributed or RANK/WORLD_SIZE."""
        trainer = self.trainer
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        return _rank_world()

    def _loader(self, dataset: Any) -> DataLoader:
        kw: dict[str, Any] = {}
        if self.num_workers > 0:
            kw = dict(persistent_workers=self.persistent_workers, prefetch_factor=self.prefetch_factor)
        return StreamLoader(
            dataset,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            generator=torch.Generator().manual_seed(self.seed),
            **kw,
        )

    def train_dataloader(self) -> DataLoader:
        if self._train_shards is None:
            self.setup("fit")
        rank, world = self._rank_world()
        ds = make_dataset(
            self._train_shards,
            image_size=self.image_size,
            tokenizer=self.tokenizer,
            train=True,
            batch_size=self.batch_size,
            context_length=self.context_length,
            random_crop=self.random_crop,
            shuffle_buffer=self.shuffle_buffer,
            epoch_size=self.epoch_size,
            num_workers=self.num_workers,
            seed=self.seed,
            load_image=self.load_image,
            load_embeddings=self.load_embeddings,
            rank=rank,
            world_size=world,
            **self.guard_bounds,
            url_commands=self.url_commands,
        )
        ds.resume_from(self._resume_position, num_workers=self.num_workers)
        return self._loader(ds)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_urls is None:
            return []
        if self._val_shards is None:
            self.setup("validate")
        rank, world = self._rank_world()
        ds = make_dataset(
            self._val_shards,
            image_size=self.image_size,
            tokenizer=self.tokenizer,
            train=False,
            batch_size=self.val_batch_size,
            context_length=self.context_length,
            num_workers=self.num_workers,
            seed=self.seed,
            load_image=self.load_image,
            load_embeddings=self.load_embeddings,
            rank=rank,
            world_size=world,
            url_commands=self.url_commands,
        )
        # a fresh pass every time: persistent workers would keep an exhausted iterator's state
        kw: dict[str, Any] = {"prefetch_factor": self.prefetch_factor} if self.num_workers > 0 else {}
        return DataLoader(
            ds,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            generator=torch.Generator().manual_seed(self.seed),
            **kw,  # leaves the global RNG alone
        )

    def test_dataloader(self) -> DataLoader | list:
        return self.val_dataloader()

    # ----------------------------------------------------------------------------------------- skipped samples

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Move ``batch["skipped"]`` into :attr:`skipped` (totals) and the not-yet-logged counter, and
        ``batch["_stream"]`` (training batches) into the stream position saved with checkpoints."""
        if isinstance(batch, dict):
            if "skipped" in batch:
                self.record_skipped(batch.pop("skipped"))
            if "_stream" in batch:
                self._position = stream_position(self._position, batch.pop("_stream"), num_workers=self.num_workers)
        return batch

    def record_skipped(self, counts: dict[str, int]) -> None:
        """Add per-reason skip counts (e.g. ``batch["skipped"]`` when iterating the loaders by hand)."""
        for reason, n in counts.items():
            if n:
                self.skipped[reason] = self.skipped.get(reason, 0) + int(n)
                self._unlogged[reason] += int(n)

    def pop_unlogged_skipped(self) -> dict[str, int]:
        """Counts recorded since the last call (used by :class:`SkippedSamplesLogger`)."""
        out = dict(self._unlogged)
        self._unlogged.clear()
        return out

    # ----------------------------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """Epoch, seed, skip totals and every rank's training stream position (``stream``: ``{rank: position}``,
        gathered over ranks: call it on every rank, as Lightning's checkpointing does)."""
        positions = {0: copy.deepcopy(self._position)}
        rank, world = self._rank_world()
        if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list = [None] * world
            torch.distributed.all_gather_object(gathered, self._position)
            positions = dict(enumerate(gathered))
        return {"epoch": self.epoch, "seed": self.seed, "skipped": dict(self.skipped), "stream": positions}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the state; the next :meth:`train_dataloader` continues this rank's stream where it stopped."""
        self.epoch = int(state_dict.get("epoch", 0))
        self.seed = int(state_dict.get("seed", self.seed))
        self.skipped = dict(state_dict.get("skipped", {}))
        positions = state_dict.get("stream") or {}
        rank, world = self._rank_world()
        if positions and len(positions) != world:
            warnings.warn(
                f"data stream saved by {len(positions)} ranks, resumed on {world}: the stream restarts", stacklevel=2
            )
            positions = {}
        self._resume_position = copy.deepcopy(positions.get(rank))
        self._position = copy.deepcopy(self._resume_position)


class StreamLoader(DataLoader):
    """A DataLoader over a :class:`~dalle2.data.train_stream.TrainStream` that keeps the stream's epoch counter
    right when workers are not persistent (each epoch then pickles the main process's copy afresh)."""

    def __iter__(self):
        it = super().__iter__()
        ds = self.dataset
        if self.num_workers > 0 and not self.persistent_workers and hasattr(ds, "resume_from"):
            ds.epoch, ds.resume = ds.epoch + 1, None
        return it


class SkippedSamplesLogger(pl.Callback):
    """Logs ``data/skipped_<reason>`` (rank 0's running totals, every ``log_every_n_steps`` steps) and
    prints the totals summed over all ranks at fit end.

    Works with :class:`WebDataModule` (``trainer.datamodule``); does nothing with other datamodules.
    """

    def __init__(self, *, log_every_n_steps: int = 50) -> None:
        self.log_every_n_steps = log_every_n_steps

    @staticmethod
    def _dm(trainer: pl.Trainer) -> WebDataModule | None:
        dm = getattr(trainer, "datamodule", None)
        return dm if isinstance(dm, WebDataModule) else None

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        dm = self._dm(trainer)
        if dm is None or (trainer.global_step % self.log_every_n_steps):
            return
        metrics = {f"data/skipped_{r}": float(n) for r, n in dm.skipped.items()}
        if metrics and trainer.logger is not None and trainer.is_global_zero:
            trainer.logger.log_metrics(metrics, step=trainer.global_step)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dm = self._dm(trainer)
        if dm is not None:
            dm.epoch += 1

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dm = self._dm(trainer)
        if dm is None:
            return
        totals = dict(dm.skipped)
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[dict] = [{} for _ in range(trainer.world_size)]
            torch.distributed.all_gather_object(gathered, totals)
            totals = dict(sum((Counter(g) for g in gathered), Counter()))
        if trainer.is_global_zero:
            if totals:
                summary = ", ".join(f"{r}={n}" for r, n in sorted(totals.items()))
                print(f"[data] skipped samples over all ranks: {summary}")
            else:
                print("[data] no samples skipped")
