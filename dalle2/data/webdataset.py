"""Reading img2dataset-style WebDataset shards into training batches.

A sample is ``{key}.jpg|jpeg|png|webp`` + ``{key}.txt`` (caption) [+ ``{key}.json``] [+ ``{key}.img_emb.npy``,
``{key}.txt_emb.npy``, ``{key}.txt_tokens.npy`` for embedding shards]. :func:`make_dataset` yields batches:

    "image":      float32 (B, 3, S, S) in [-1, 1]            (when load_image)
    "tokens":     int64 (B, context_length)
    "caption":    list[str];  "key": list[str];  "meta": list[dict]  (the json, {} if absent)
    "img_emb":    float32 (B, D);  "txt_emb": (B, D);  "txt_tokens": (B, L, Dt)   (when load_embeddings)
    "skipped":    dict[str, int]  samples/shards skipped in this worker since its previous batch
    "_stream":    (epoch, worker, batches, samples)  training only: the stream position after this batch
                  (:class:`TrainStream`; the datamodule pops it and checkpoints it for an exact resume)

Training streams are resampled (shards drawn with replacement, seeded by (seed, epoch, rank, worker)): any
number of shards works with any number of ranks and workers, every rank yields the same number of batches
per epoch, and a stream resumes exactly from a checkpointed position (:class:`TrainStream`). Validation is one deterministic pass, every sample read exactly once over all ranks:

* shards >= ranks: rank ``r`` reads shards ``r, r+W, ...`` (split further over its workers); ranks may
  get different numbers of batches (uneven shards), never zero unless a whole shard is empty or corrupt.
* shards < ranks: every rank opens every shard and keeps sample ``j`` of shard ``i`` when
  ``(i + j) % W == r``, so each rank still gets ~N/W samples (a rank gets none only if N < W).

Bad samples are skipped and counted by reason (``corrupt_image``, ``missing_image``, ``missing_caption``,
``empty_caption``, ``corrupt_json``, ``missing_embedding``, ``corrupt_embedding``, ``bad_shard``); a
truncated or unreadable tar, or a ``pipe:`` command that exits non-zero, warns, counts ``bad_shard`` and the
stream moves on. The endless training stream never spins silently: after ``max_consecutive_skips`` skipped
samples in a row, more than ``max_skipped_fraction`` of its last ``skip_window`` samples skipped, or
``max_consecutive_bad_shards`` shards in a row that yielded no sample, it raises
:class:`~dalle2.data.guard.DataStreamError` naming the reasons, counts and shards (:mod:`dalle2.data.guard`).
Shard urls (local, ``pipe:``, http(s), ``s3://`` / ``gs://`` through commands) are in :mod:`dalle2.data.urls`; the
read/decode/batch stages in :mod:`dalle2.data.shard_reader`; the resumable training stream in
:mod:`dalle2.data.train_stream`. This module chooses the shards (training or validation) and chains the stages.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import webdataset as wds

from dalle2.data.guard import DataStreamError, StreamGuard
from dalle2.data.shard_reader import (
    EMBED_KEYS,
    IMAGE_EXTS,
    SKIP_REASONS,
    Tokenizer,
    _rank_world,
    _Stages,
    _worker,
    iter_raw_samples,
    load_rgb,
)
from dalle2.data.train_stream import TrainStream, stream_position, stream_seed
from dalle2.data.urls import count_samples, expand_urls

__all__ = [
    "DataStreamError",
    "EMBED_KEYS",
    "IMAGE_EXTS",
    "SKIP_REASONS",
    "TrainStream",
    "count_samples",
    "expand_urls",
    "iter_raw_samples",
    "load_rgb",
    "make_dataset",
    "stream_position",
    "stream_seed",
]


# --------------------------------------------------------------------------------------------- validation split


class _ValShards(torch.utils.data.IterableDataset):
    """Deterministic shard list for one rank, split over its workers (see the module docstring)."""

    def __init__(self, urls: list[str], *, rank: int, world_size: int) -> None:
        super().__init__()
        self.urls, self.rank, self.world_size = urls, rank, world_size
        self.by_sample = len(urls) < world_size

    def __iter__(self) -> Iterator[dict]:
        worker, num_workers = _worker()
        indexed = list(enumerate(self.urls))
        if not self.by_sample:
            indexed = indexed[self.rank :: self.world_size]
        for idx, url in indexed[worker::num_workers]:
            yield {"url": url, "shard_index": idx}


def _keep_rank_samples(src: Iterable[dict], *, urls: list[str], rank: int, world_size: int) -> Iterator[dict]:
    """When shards < ranks: keep sample j of shard i iff (i + j) % world_size == rank."""
    index = {u: i for i, u in enumerate(urls)}
    current, j = None, 0
    for sample in src:
        url = sample.get("__url__")
        if url != current:
            current, j = url, 0
        i = index.get(url, 0)
        if (i + j) % world_size == rank:
            yield sample
        j += 1


# --------------------------------------------------------------------------------------------- dataset


def make_dataset(
    urls: str | Sequence[str],
    *,
    image_size: int,
    tokenizer: Tokenizer,
    train: bool,
    batch_size: int,
    context_length: int = 77,
    random_crop: bool = False,
    shuffle_buffer: int = 1000,
    epoch_size: int | None = None,
    num_workers: int = 0,
    seed: int = 0,
    load_image: bool = True,
    load_embeddings: bool = False,
    skip_counter: Counter | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    max_consecutive_skips: int | None = 1000,
    max_consecutive_bad_shards: int | None = 50,
    max_skipped_fraction: float | None = 0.5,
    skip_window: int = 1000,
    url_commands: Mapping[str, str] | None = None,
) -> wds.DataPipeline:
    """An iterable of batches (see the module docstring for the batch dict) over ``urls``.

    Args:
        urls: shard urls, expanded and checked by :func:`expand_urls`.
        tokenizer: ``tokenizer(list_of_str, context_length=L) -> LongTensor (B, L)``; must be picklable.
        train: resampled, shuffled, endless stream cut into epochs (else one deterministic pass).
        batch_size: samples per batch (training drops the last partial batch, validation keeps it).
        epoch_size: training samples per rank per epoch; ``None`` counts the samples of local shards and
            divides by the world size. The pipeline is cut per worker, so a rank yields
            ``max(1, num_workers) * ceil(epoch_size / batch_size / max(1, num_workers))`` batches.
        num_workers: DataLoader workers that will iterate this dataset (only used to size the epoch).
        skip_counter: a ``Counter`` the decode stage adds skip counts to (per worker process copy); counts
            also travel with each batch as ``batch["skipped"]``.
        rank, world_size: default to torch.distributed (or RANK/WORLD_SIZE), read at construction.
        max_consecutive_skips, max_consecutive_bad_shards: training only: a worker's stream raises
            :class:`DataStreamError` (naming the skip reasons and counts, the shards and a likely cause) after this
            many skipped samples in a row, or shards in a row that yielded no sample (empty, unreadable, a failing
            command); ``None``: unbounded. Validation is one finite pass: never raised, warns when it yields nothing.
        max_skipped_fraction, skip_window: training only: a worker's stream raises :class:`DataStreamError` when more
            than this share of its last ``skip_window`` samples was skipped (``None``: unbounded), naming the counts.
        url_commands: ``{scheme: "command {url}"}`` for object-store urls (see :mod:`dalle2.data.urls`).
    """
    if image_size < 1 or batch_size < 1:
        raise ValueError(f"image_size and batch_size must be >= 1, got {image_size} and {batch_size}")
    if not load_image and not load_embeddings and tokenizer is None:
        raise ValueError("nothing to load: load_image=False, load_embeddings=False and no tokenizer")
    guard = StreamGuard(
        max_consecutive_skips=max_consecutive_skips,
        max_consecutive_bad_shards=max_consecutive_bad_shards,
        max_skipped_fraction=max_skipped_fraction,
        skip_window=skip_window,
    )  # checks the bounds for validation too
    shard_urls = expand_urls(urls, url_commands=url_commands)
    if rank is None or world_size is None:
        rank, world_size = _rank_world()
    guard.where = f"rank {rank}"
    stages = _Stages(
        image_size=image_size,
        tokenizer=tokenizer,
        context_length=context_length,
        batch_size=batch_size,
        partial=not train,
        random_crop=random_crop and train,
        load_image=load_image,
        load_embeddings=load_embeddings,
        seed=seed,
        rank=rank,
        skip_counter=skip_counter,
        url_commands=url_commands,
        guard=guard if train else None,
    )
    if train:
        if epoch_size is None:
            epoch_size = max(1, count_samples(shard_urls) // world_size)
        workers = max(1, num_workers)
        per_worker = max(1, -(-epoch_size // (batch_size * workers)))
        pipeline = TrainStream(
            shard_urls,
            stages=stages,
            seed=seed,
            rank=rank,
            shuffle_buffer=shuffle_buffer,
            batches_per_worker=per_worker,
        )
        pipeline.batches_per_epoch = per_worker * workers
    else:
        shards = _ValShards(shard_urls, rank=rank, world_size=world_size)
        stages_list: list[Any] = [shards, stages.tar_samples]
        if shards.by_sample:
            stages_list.append(functools.partial(_keep_rank_samples, urls=shard_urls, rank=rank, world_size=world_size))
        pipeline = wds.DataPipeline(*stages_list, stages.decode, stages.batch, stages.warn_if_empty)
        pipeline.batches_per_epoch = None
    pipeline.stages_obj = stages
    return pipeline
