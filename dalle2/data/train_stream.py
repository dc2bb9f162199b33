"""The resumable training stream: shards drawn with replacement, a shuffle buffer, decode, batch.

Every batch is a pure function of ``(seed, epoch, rank, worker)`` and its index, so that a run resumes exactly from a
checkpointed stream position (:class:`TrainStream`, :func:`stream_position`). The read/decode/batch stages are
:mod:`dalle2.data.shard_reader`'s; :func:`dalle2.data.webdataset.make_dataset` builds the stream.
"""

from __future__ import annotations

import itertools
import random
import warnings
from collections.abc import Iterator

import torch
import webdataset as wds

from dalle2.data.shard_reader import _Stages, _worker
from dalle2.seeding import mix_seed

__all__ = ["TrainStream", "stream_position", "stream_seed"]


def stream_seed(seed: int, epoch: int, rank: int, worker: int) -> int:
    """The seed of one worker's stream in one epoch (shard draws, shuffle buffer, random crops)."""
    return mix_seed(seed, epoch, rank, worker)


class TrainStream(torch.utils.data.IterableDataset):
    """The resampled training stream: shards drawn with replacement, a shuffle buffer, decode, batch.

    Every batch is a pure function of ``(seed, epoch, rank, worker)`` and its index, so a stream can be
    resumed exactly: each batch carries ``batch["_stream"] = (epoch, worker, batches, samples)`` (that
    worker's batches and raw samples consumed so far in the epoch); :meth:`resume_from` takes the position
    of the last batch the trainer consumed per worker and the next ``__iter__`` skips those raw samples
    (read and shuffled, never decoded) and starts with the worker whose turn it was (DataLoader workers are
    served round-robin, so physical worker ``p`` plays logical worker ``(p + rotation) % W`` in that epoch).

    ``epoch`` is the epoch the next ``__iter__`` plays; every ``__iter__`` advances the copy that runs it
    (the worker's copy under persistent workers; :class:`dalle2.data.datamodule.StreamLoader` advances the
    main copy when workers are not persistent).
    """

    def __init__(
        self,
        urls: list[str],
        *,
        stages: _Stages,
        seed: int,
        rank: int,
        shuffle_buffer: int,
        batches_per_worker: int,
    ) -> None:
        super().__init__()
        self.urls, self.stages, self.seed, self.rank = urls, stages, seed, rank
        self.shuffle_buffer, self.batches_per_worker = shuffle_buffer, batches_per_worker
        self.epoch = 0
        self.resume: dict | None = None

    def resume_from(self, position: dict | None, *, num_workers: int) -> None:
        """Continue after ``position`` (see :func:`stream_position`); ``None`` starts at epoch 0."""
        self.epoch, self.resume = 0, None
        if not position:
            return
        workers = max(1, num_workers)
        batches = list(position["batches"])
        if len(batches) != workers:
            warnings.warn(
                f"data stream saved with {len(batches)} workers, resumed with {workers}: "
                f"starting the next epoch ({position['epoch'] + 1}) instead of the exact position",
                stacklevel=2,
            )
            self.epoch = int(position["epoch"]) + 1
            return
        if all(b >= self.batches_per_worker for b in batches):
            self.epoch = int(position["epoch"]) + 1
            return
        self.epoch = int(position["epoch"])
        self.resume = {**position, "rotation": (int(position["last_worker"]) + 1) % workers}

    def _shards(self, rng: random.Random) -> Iterator[dict]:
        n = len(self.urls)
        while True:
            yield {"url": self.urls[rng.randrange(n)]}

    def __iter__(self) -> Iterator[dict]:
        worker, num_workers = _worker()
        epoch, resume = self.epoch, self.resume
        self.epoch, self.resume = epoch + 1, None
        logical, done_batches, done_samples = worker, 0, 0
        if resume is not None and int(resume["epoch"]) == epoch:
            logical = (worker + int(resume["rotation"])) % num_workers
            done_batches, done_samples = int(resume["batches"][logical]), int(resume["samples"][logical])
        wseed = stream_seed(self.seed, epoch, self.rank, logical)
        st = self.stages
        guard = st.guard
        if guard is not None:
            guard.reset()
        samples: Iterator[dict] = st.tar_samples(self._shards(random.Random(wseed)))
        if self.shuffle_buffer > 1:
            samples = wds.shuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, 100), seed=mix_seed(wseed, 1))(
                samples
            )
        samples = itertools.islice(samples, done_samples, None)  # resume: skip without decoding
        pos = [done_samples]

        def decode() -> Iterator[dict]:
            for sample in samples:
                pos[0] += 1
                if st.random_crop:
                    st._rng = random.Random(mix_seed(wseed, pos[0]))  # a crop per sample, not per history
                out = st._decode_one(sample)
                if isinstance(out, str):
                    st.counts[out] += 1
                    if guard is not None:
                        guard.sample_skipped(out, sample)  # raises at data.max_consecutive_skips
                    continue
                if guard is not None:
                    guard.sample_ok()
                yield out

        todo = max(0, self.batches_per_worker - done_batches)
        for i, batch in enumerate(itertools.islice(st.batch(decode()), todo)):
            batch["_stream"] = (epoch, logical, done_batches + i + 1, pos[0])
            yield batch


def stream_position(position: dict | None, marker: tuple[int, int, int, int], *, num_workers: int) -> dict:
    """Advance a stream position (``None`` at the start) by one consumed batch's ``batch["_stream"]`` marker."""
    epoch, worker, batches, samples = (int(v) for v in marker)
    workers = max(1, num_workers)
    if position is None or int(position["epoch"]) != epoch or len(position["batches"]) != workers:
        position = {"epoch": epoch, "batches": [0] * workers, "samples": [0] * workers, "last_worker": -1}
    position["batches"][worker] = batches
    position["samples"][worker] = samples
    position["last_worker"] = worker
    return position
