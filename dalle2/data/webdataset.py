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
samples in a row, or ``max_consecutive_bad_shards`` shards in a row that yielded no sample, it raises
:class:`~dalle2.data.guard.DataStreamError` naming the reasons, counts and shards (:mod:`dalle2.data.guard`).
Shard urls (local, ``pipe:``, http(s), ``s3://`` / ``gs://`` through commands) are in :mod:`dalle2.data.urls`.
"""

from __future__ import annotations

import functools
import io
import itertools
import json
import os
import random
import sys
import tarfile
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from dalle2.data.guard import DataStreamError, StreamGuard
from dalle2.data.urls import close_shard, count_samples, expand_urls, open_shard, resolve_url_commands
from dalle2.seeding import mix_seed

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

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
EMBED_KEYS = {"img_emb": "img_emb.npy", "txt_emb": "txt_emb.npy", "txt_tokens": "txt_tokens.npy"}
SKIP_REASONS = (
    "corrupt_image",
    "missing_image",
    "missing_caption",
    "empty_caption",
    "corrupt_json",
    "missing_embedding",
    "corrupt_embedding",
    "bad_shard",
)

Tokenizer = Callable[..., torch.Tensor]


# --------------------------------------------------------------------------------------------- ranks and workers


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return 0, 1


def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def _worker_seed(seed: int, rank: int) -> int:
    worker, _ = _worker()
    return mix_seed(seed, rank, worker)


# --------------------------------------------------------------------------------------------- decoding


def load_rgb(
    data: bytes, *, image_size: int, random_crop: bool = False, rng: random.Random | None = None
) -> torch.Tensor:
    """Decode image bytes → float32 (3, S, S) in [-1, 1]: RGB, shorter side resized to S (bicubic,
    antialiased), then centre crop (or a random crop when ``random_crop``)."""
    with Image.open(io.BytesIO(data)) as img:
        img.draft("RGB", (image_size, image_size))  # JPEG: decode at reduced scale when much larger
        if img.mode in ("RGBA", "LA", "P") and (img.mode != "P" or "transparency" in img.info):
            img = img.convert("RGBA")
            canvas = Image.new("RGBA", img.size, (255, 255, 255, 255))
            img = Image.alpha_composite(canvas, img)
        img = img.convert("RGB")
        w, h = img.size
        scale = image_size / min(w, h)
        nw, nh = max(image_size, round(w * scale)), max(image_size, round(h * scale))
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=None)
        if random_crop:
            rng = rng or random
            left, top = rng.randint(0, nw - image_size), rng.randint(0, nh - image_size)
        else:
            left, top = (nw - image_size) // 2, (nh - image_size) // 2
        img = img.crop((left, top, left + image_size, top + image_size))
        arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


class _Stages:
    """The per-worker read, decode and batch stages; holds the skip counter and the training stream's
    :class:`~dalle2.data.guard.StreamGuard` (one copy per worker process)."""

    def __init__(
        self,
        *,
        image_size: int,
        tokenizer: Tokenizer,
        context_length: int,
        batch_size: int,
        partial: bool,
        random_crop: bool,
        load_image: bool,
        load_embeddings: bool,
        seed: int,
        rank: int,
        skip_counter: Counter | None,
        url_commands: Mapping[str, str] | None = None,
        guard: StreamGuard | None = None,
    ) -> None:
        self.image_size = image_size
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.batch_size = batch_size
        self.partial = partial
        self.random_crop = random_crop
        self.load_image = load_image
        self.load_embeddings = load_embeddings
        self.seed = seed
        self.rank = rank
        self.counts: Counter = skip_counter if skip_counter is not None else Counter()
        self.url_commands = resolve_url_commands(url_commands)
        self.guard = guard
        self.opened: list[str] | None = None  # validation: the shards opened in this pass (see warn_if_empty)
        self._rng: random.Random | None = None

    # handler for tar-level errors: truncated/unreadable shard → warn, count, continue
    def handle(self, exn: Exception) -> bool:
        self.counts["bad_shard"] += 1
        warnings.warn(f"skipping unreadable shard data: {exn}", stacklevel=2)
        return True

    def tar_samples(self, src: Iterable[dict]) -> Iterator[dict]:
        """``{"url": ...}`` → samples ``{"__key__", "__url__", ext: bytes}``; a truncated tar (cut inside a
        member or a header), an unreadable one, or a ``pipe:`` command that exits non-zero warns and counts one
        ``bad_shard``, keeping the complete samples read. Every shard read is reported to the guard."""
        for source in src:
            url = source["url"]
            if self.opened is not None:
                self.opened.append(url)
            status: dict[str, str | None] = {"error": None}
            samples = 0
            for sample in wds.tariterators.group_by_keys(self._tar_members(url, status), handler=self.handle):
                samples += 1
                yield sample
            if self.guard is not None:
                self.guard.shard_done(url, samples, status["error"])

    def _tar_members(self, url: str, status: dict) -> Iterator[dict]:
        """The members of one shard; ``status["error"]`` is set (and one ``bad_shard`` counted) when the shard does
        not open, does not read to its end, or its command exits non-zero."""

        def bad(why: str) -> None:
            status["error"] = why
            self.handle(tarfile.ReadError(f"shard {url!r}: {why}"))

        try:
            stream = open_shard(url, self.url_commands)
        except Exception as exn:  # noqa: BLE001 - an unopenable shard is a bad shard, never fatal
            bad(f"cannot open: {exn}")
            return
        read_error, stopped = None, False
        try:
            tar = tarfile.open(fileobj=stream, mode="r|*")
            for info in tar:
                if info.isreg() and "." in os.path.basename(info.name) and not info.name.startswith("__"):
                    data = tar.extractfile(info).read()
                    if len(data) != info.size:
                        raise tarfile.ReadError(f"member {info.name!r} truncated")
                    yield {"fname": info.name, "data": data, "__url__": url}
                tar.members = []
            # tarfile ends silently on a header cut short; a complete tar ends with a full zero block
            if tar.fileobj.pos - tar.offset < tarfile.BLOCKSIZE:
                raise tarfile.ReadError("truncated tar (ends inside a header)")
            while stream.read(1 << 16):  # the record padding: a command then exits by itself, not by SIGPIPE
                pass
        except Exception as exn:  # noqa: BLE001
            read_error = str(exn) or type(exn).__name__
        except BaseException:  # GeneratorExit: the reader stopped early (end of an epoch); the status says nothing
            stopped = True
            raise
        finally:
            exit_error = close_shard(stream, abandon=stopped)
            why = "; ".join(e for e in (exit_error, read_error) if e)
            if why and not stopped:
                bad(why)

    def _decode_one(self, sample: dict[str, Any]) -> dict[str, Any] | str:
        key = str(sample.get("__key__", ""))
        txt = sample.get("txt")
        if txt is None:
            return "missing_caption"
        caption = txt.decode("utf-8", errors="replace").strip() if isinstance(txt, bytes) else str(txt).strip()
        if not caption:
            return "empty_caption"
        meta: dict = {}
        if sample.get("json") is not None:
            try:
                meta = json.loads(sample["json"])
            except (ValueError, UnicodeDecodeError):
                return "corrupt_json"
            if not isinstance(meta, dict):
                return "corrupt_json"
        out: dict[str, Any] = {"key": os.path.basename(key), "caption": caption, "meta": meta}
        if self.load_image:
            data = next((sample[e] for e in IMAGE_EXTS if sample.get(e) is not None), None)
            if data is None:
                return "missing_image"
            if self._rng is None:
                self._rng = random.Random(_worker_seed(self.seed, self.rank))
            try:
                out["image"] = load_rgb(data, image_size=self.image_size, random_crop=self.random_crop, rng=self._rng)
            except Exception:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
                return "corrupt_image"
        if self.load_embeddings:
            for name, ext in EMBED_KEYS.items():
                if sample.get(ext) is None:
                    return "missing_embedding"
                try:
                    out[name] = torch.from_numpy(
                        np.load(io.BytesIO(sample[ext]), allow_pickle=False).astype(np.float32)
                    )
                except Exception:
                    return "corrupt_embedding"
        return out

    def decode(self, src: Iterable[dict]) -> Iterator[dict]:
        for sample in src:
            out = self._decode_one(sample)
            if isinstance(out, str):
                self.counts[out] += 1
                continue
            yield out

    def collate(self, samples: list[dict]) -> dict[str, Any]:
        captions = [s["caption"] for s in samples]
        tokens = self.tokenizer(captions, context_length=self.context_length)
        tokens = torch.as_tensor(tokens, dtype=torch.long)
        if tokens.shape != (len(samples), self.context_length):
            raise ValueError(
                f"tokenizer returned shape {tuple(tokens.shape)}, expected ({len(samples)}, {self.context_length})"
            )
        batch: dict[str, Any] = {
            "tokens": tokens,
            "caption": captions,
            "key": [s["key"] for s in samples],
            "meta": [s["meta"] for s in samples],
        }
        if self.load_image:
            batch["image"] = torch.stack([s["image"] for s in samples])
        if self.load_embeddings:
            for name in EMBED_KEYS:
                try:
                    batch[name] = torch.stack([s[name] for s in samples])
                except RuntimeError as exn:
                    raise ValueError(f"embedding {name!r} has different shapes within a batch: {exn}") from None
        batch["skipped"] = dict(self.counts)
        self.counts.clear()
        return batch

    def batch(self, src: Iterable[dict]) -> Iterator[dict]:
        """Batches of ``batch_size``; the finite (``partial``) pass keeps the last partial batch and holds each
        batch back until the next sample arrives, so that skips counted after the last sample (a bad shard at
        the end) still travel in the last batch. (Training yields at once: its stream position must be exact.)"""
        buf: list[dict] = []
        held: dict | None = None
        for sample in src:
            if held is not None:
                yield held
                held = None
            buf.append(sample)
            if len(buf) == self.batch_size:
                batch = self.collate(buf)
                buf = []
                if not self.partial:
                    yield batch
                else:
                    held = batch
        if not self.partial:
            return
        if buf:
            if held is not None:
                yield held
            yield self.collate(buf)
        elif held is not None:
            for reason, n in self.counts.items():
                held["skipped"][reason] = held["skipped"].get(reason, 0) + n
            self.counts.clear()
            yield held

    def warn_if_empty(self, src: Iterable[dict]) -> Iterator[dict]:
        """Validation's last stage: a pass (of this rank's worker) that read shards and yielded no batch warns,
        naming the shards and the skip counts (which no batch carried to the datamodule); from a DataLoader
        worker the warning is printed to stderr."""
        self.opened = []
        batches = 0
        for batch in src:
            batches += 1
            yield batch
        if batches == 0 and self.opened:
            worker, num_workers = _worker()
            skipped = ", ".join(f"{r}={n}" for r, n in self.counts.most_common()) or "none: the shards hold no sample"
            msg = (
                f"validation (rank {self.rank}, worker {worker} of {max(1, num_workers)}) read {len(self.opened)} "
                f"shard(s) and got no usable sample: skipped {skipped}; shards: {self.opened[:5]}"
            )
            if torch.utils.data.get_worker_info() is not None:
                # a worker's warning filters are a copy of the main process's (which may record, not show)
                print(f"[dalle2.data] warning: {msg}", file=sys.stderr, flush=True)
            else:
                warnings.warn(msg, stacklevel=2)


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
        url_commands: ``{scheme: "command {url}"}`` for object-store urls (see :mod:`dalle2.data.urls`).
    """
    if image_size < 1 or batch_size < 1:
        raise ValueError(f"image_size and batch_size must be >= 1, got {image_size} and {batch_size}")
    if not load_image and not load_embeddings and tokenizer is None:
        raise ValueError("nothing to load: load_image=False, load_embeddings=False and no tokenizer")
    guard = StreamGuard(
        max_consecutive_skips=max_consecutive_skips,
        max_consecutive_bad_shards=max_consecutive_bad_shards,
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


# --------------------------------------------------------------------------------------------- resumable training stream


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


def _identity(src: Iterable) -> Iterable:
    return src


def iter_raw_samples(url: str) -> Iterator[dict]:
    """The undecoded samples ``{"__key__", "__url__", ext: bytes, ...}`` of one shard, in file order (a truncated
    tar warns and yields the complete samples before the cut, as in training)."""
    stages = _Stages(
        image_size=0,
        tokenizer=None,
        context_length=0,
        batch_size=1,
        partial=True,
        random_crop=False,
        load_image=False,
        load_embeddings=False,
        seed=0,
        rank=0,
        skip_counter=None,
    )
    yield from stages.tar_samples([{"url": url}])
