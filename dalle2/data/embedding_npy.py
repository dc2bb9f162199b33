"""Train the prior straight from LAION-style precomputed CLIP embeddings, without touching an image.

The layout is clip-retrieval's (``clip-retrieval inference`` output, e.g. the published LAION embeddings)::

    root/img_emb/img_emb_{i}.npy          (N_i, D) image embeddings (float16 or float32)
    root/text_emb/text_emb_{i}.npy        (N_i, D) text embeddings of the captions
    root/metadata/metadata_{i}.parquet    N_i rows with a caption column (``caption_column``; needs pyarrow)

Row ``j`` of the three files of index ``i`` is one sample. Batches follow the embedding-shard contract of
:class:`~dalle2.data.datamodule.WebDataModule` for the prior:

    "img_emb": float32 (B, D);  "txt_emb": float32 (B, D);  "tokens": int64 (B, context_length)
    "caption": list[str];  "key": list[str] (``"{i:05d}_{j}"``);  "skipped": dict[str, int]
    "_stream": (epoch, worker, batches, rows)   training only: the stream position (for an exact resume)

There are no CLIP token states (``txt_tokens``): train with ``module.use_text_tokens=false``, or give a
``clip_ckpt`` (the CLIP that made the embeddings) to compute them from ``tokens`` on the fly.

Streaming: the ``.npy`` files are memory-mapped (``np.load(mmap_mode="r")``) and read one contiguous chunk of
``chunk_size`` rows at a time; captions are read per parquet row group. Nothing is loaded whole.

Training split: the rows are cut into equal chunks (boundaries shifted by a seeded offset each epoch, so the
tail that does not fill a chunk differs from epoch to epoch); each epoch a seeded permutation of the chunks
deals them round-robin to the ``world_size * workers`` streams (chunk ``k`` to stream ``k % S``; stream
``rank * workers + worker``), rows shuffled within each chunk. Every stream gets the same number of
chunks, so every rank yields the same number of batches (``batches_per_epoch``): DDP never waits on a rank that
ran out. A stream is a pure function of ``(seed, epoch, rank, worker)``, and its position is (batches, rows
consumed), so a resume jumps straight to the next row (nothing is re-read). Rows with an empty caption or a
non-finite embedding are skipped and counted (``empty_caption``, ``corrupt_embedding``); a stream short of
rows after skips tops up from the epoch's other chunks.

Validation: one deterministic pass, rank ``r`` reads the contiguous rows ``[r N / W, (r+1) N / W)`` split
further over its workers: every row exactly once over all ranks.
"""

from __future__ import annotations

import os
import re
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from dalle2.data.datamodule import WebDataModule
from dalle2.data.train_stream import TrainStream

__all__ = ["EmbeddingFiles", "EmbeddingNpyDataModule", "EmbeddingPass", "EmbeddingStream", "scan_embeddings"]

Tokenizer = Callable[..., torch.Tensor]
_INDEX = re.compile(r"^img_emb_(\d+)\.npy$")


# --------------------------------------------------------------------------------------------- the layout


@dataclass(frozen=True)
class EmbeddingFiles:
    """The files of one clip-retrieval embedding folder, in index order, and their row counts."""

    root: str
    img: tuple[str, ...]
    txt: tuple[str, ...]
    meta: tuple[str, ...]
    rows: tuple[int, ...]
    dim: int
    caption_column: str

    @property
    def total(self) -> int:
        return int(sum(self.rows))

    @property
    def offsets(self) -> np.ndarray:
        """Global index of each file's first row, plus the total: ``(F + 1,)``."""
        return np.concatenate([[0], np.cumsum(self.rows)]).astype(np.int64)


def _npy_shape(path: str) -> tuple[int, ...]:
    try:
        return tuple(np.load(path, mmap_mode="r").shape)
    except Exception as exn:  # noqa: BLE001 - numpy raises ValueError/OSError/... for a bad header
        raise ValueError(f"unreadable embedding file {path!r}: {exn}") from None


def _pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(
            "data=embedding_npy reads captions from metadata/*.parquet and needs pyarrow: pip install 'dalle2[laion]'"
        ) from None
    return pq


def scan_embeddings(root: str | os.PathLike, *, caption_column: str = "caption") -> EmbeddingFiles:
    """Find ``img_emb/img_emb_{i}.npy`` and their ``text_emb`` / ``metadata`` partners under ``root`` and check
    that they agree (rows, dimension, caption column): ``FileNotFoundError`` / ``ValueError`` naming the file."""
    root = os.fspath(root)
    img_dir = os.path.join(root, "img_emb")
    if not os.path.isdir(img_dir):
        raise FileNotFoundError(f"embedding folder {root!r} has no img_emb/ (expected clip-retrieval's layout)")
    indices = sorted(int(m.group(1)) for f in os.listdir(img_dir) if (m := _INDEX.match(f)))
    if not indices:
        raise FileNotFoundError(f"no img_emb/img_emb_<i>.npy in {root!r}")
    pq = _pyarrow_parquet()
    img, txt, meta, rows, dim = [], [], [], [], None
    for i in indices:
        paths = (
            os.path.join(img_dir, f"img_emb_{i}.npy"),
            os.path.join(root, "text_emb", f"text_emb_{i}.npy"),
            os.path.join(root, "metadata", f"metadata_{i}.parquet"),
        )
        for p in paths:
            if not os.path.isfile(p):
                raise FileNotFoundError(f"missing {p!r} (partner of {paths[0]!r})")
        si, st = _npy_shape(paths[0]), _npy_shape(paths[1])
        if len(si) != 2 or si != st:
            raise ValueError(f"{paths[0]!r} has shape {si} but {paths[1]!r} has {st}: expected equal (N, D)")
        if dim is None:
            dim = si[1]
        elif si[1] != dim:
            raise ValueError(f"{paths[0]!r} has dimension {si[1]}, the files before it {dim}")
        try:
            pf = pq.ParquetFile(paths[2])
        except Exception as exn:  # noqa: BLE001
            raise ValueError(f"unreadable metadata file {paths[2]!r}: {exn}") from None
        if pf.metadata.num_rows != si[0]:
            raise ValueError(f"{paths[2]!r} has {pf.metadata.num_rows} rows but {paths[0]!r} has {si[0]}")
        if caption_column not in pf.schema_arrow.names:
            raise ValueError(f"{paths[2]!r} has no column {caption_column!r} (columns: {pf.schema_arrow.names})")
        img.append(paths[0]), txt.append(paths[1]), meta.append(paths[2]), rows.append(si[0])
    return EmbeddingFiles(root, tuple(img), tuple(txt), tuple(meta), tuple(rows), int(dim), caption_column)


class _Reader:
    """Reads global row ranges: memory-mapped ``.npy`` slices and the caption column of the parquet row groups
    that cover them (a few recently used row groups are kept). Opened lazily in each worker process."""

    def __init__(self, files: EmbeddingFiles, *, cache: int = 4) -> None:
        self.files, self.offsets, self.cache = files, files.offsets, cache
        self._mm: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._pq: dict[int, Any] = {}
        self._groups: OrderedDict[tuple[int, int], list] = OrderedDict()

    def __getstate__(self) -> dict:  # memory maps and parquet handles stay in the process that opened them
        return {"files": self.files, "offsets": self.offsets, "cache": self.cache}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["files"], cache=state["cache"])

    def _arrays(self, f: int) -> tuple[np.ndarray, np.ndarray]:
        if f not in self._mm:
            self._mm[f] = (np.load(self.files.img[f], mmap_mode="r"), np.load(self.files.txt[f], mmap_mode="r"))
        return self._mm[f]

    def _captions(self, f: int, lo: int, hi: int) -> list:
        if f not in self._pq:
            pf = _pyarrow_parquet().ParquetFile(self.files.meta[f])
            sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)]
            self._pq[f] = (pf, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))
        pf, starts = self._pq[f]
        out: list = []
        g = int(np.searchsorted(starts, lo, side="right")) - 1
        while lo < hi:
            if (f, g) not in self._groups:
                col = pf.read_row_group(g, columns=[self.files.caption_column]).column(0).to_pylist()
                self._groups[(f, g)] = col
                while len(self._groups) > self.cache:
                    self._groups.popitem(last=False)
            self._groups.move_to_end((f, g))
            end = min(hi, int(starts[g + 1]))
            out.extend(self._groups[(f, g)][lo - int(starts[g]) : end - int(starts[g])])
            lo, g = end, g + 1
        return out

    def read(self, start: int, stop: int) -> dict[str, Any]:
        """Rows ``[start, stop)`` of the concatenated files: ``img``, ``txt`` float32 (n, D), ``caption``, ``key``."""
        img, txt, cap, key = [], [], [], []
        f = int(np.searchsorted(self.offsets, start, side="right")) - 1
        while start < stop:
            lo, hi = start - int(self.offsets[f]), min(stop, int(self.offsets[f + 1])) - int(self.offsets[f])
            a, b = self._arrays(f)
            img.append(np.asarray(a[lo:hi], dtype=np.float32))
            txt.append(np.asarray(b[lo:hi], dtype=np.float32))
            cap.extend(self._captions(f, lo, hi))
            key.extend(f"{f:05d}_{j}" for j in range(lo, hi))
            start, f = start + (hi - lo), f + 1
        return {"img": np.concatenate(img), "txt": np.concatenate(txt), "caption": cap, "key": key}


def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class _Batcher:
    """Rows → checked samples → batch dicts (tokenized captions, skip counts since the previous batch)."""

    def __init__(self, tokenizer: Tokenizer, context_length: int, batch_size: int) -> None:
        self.tokenizer, self.context_length, self.batch_size = tokenizer, context_length, batch_size
        self.counts: Counter = Counter()

    def check(self, rows: dict[str, Any], start: int = 0) -> Iterator[tuple[int, tuple]]:
        """``(j, sample)`` for the usable rows ``j >= start``; the others are counted by reason."""
        ok_emb = np.isfinite(rows["img"]).all(axis=1) & np.isfinite(rows["txt"]).all(axis=1)
        for j in range(start, len(rows["key"])):
            caption = rows["caption"][j]
            caption = caption.strip() if isinstance(caption, str) else ""
            if not caption:
                self.counts["empty_caption"] += 1
            elif not ok_emb[j]:
                self.counts["corrupt_embedding"] += 1
            else:
                yield j, (rows["img"][j], rows["txt"][j], caption, rows["key"][j])

    def collate(self, samples: list[tuple]) -> dict[str, Any]:
        img, txt, captions, keys = zip(*samples)
        tokens = torch.as_tensor(self.tokenizer(list(captions), context_length=self.context_length), dtype=torch.long)
        batch = {
            "img_emb": torch.from_numpy(np.stack(img)),
            "txt_emb": torch.from_numpy(np.stack(txt)),
            "tokens": tokens,
            "caption": list(captions),
            "key": list(keys),
            "skipped": dict(self.counts),
        }
        self.counts.clear()
        return batch


# --------------------------------------------------------------------------------------------- training stream


class EmbeddingStream(IterableDataset):
    """The training stream of one rank (see the module docstring); ``batches_per_epoch`` batches per epoch over
    all its workers. Position and resume as :class:`dalle2.data.train_stream.TrainStream` (same ``_stream`` marker,
    same :meth:`resume_from`), with rows in place of raw samples."""

    resume_from = TrainStream.resume_from  # the same position bookkeeping (epoch, per-worker batches, rotation)

    def __init__(
        self,
        files: EmbeddingFiles,
        *,
        tokenizer: Tokenizer,
        batch_size: int,
        rank: int,
        world_size: int,
        num_workers: int = 0,
        chunk_size: int = 8192,
        seed: int = 0,
        context_length: int = 77,
        epoch_size: int | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1 or chunk_size < 1:
            raise ValueError(f"batch_size and chunk_size must be >= 1, got {batch_size} and {chunk_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world size {world_size}")
        self.files, self.reader = files, _Reader(files)
        self.batcher = _Batcher(tokenizer, context_length, batch_size)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.workers = max(1, num_workers)
        streams = world_size * self.workers
        total = files.total
        self.chunk = min(chunk_size, total // streams)
        self.num_chunks = total // self.chunk if self.chunk else 0
        self.chunks_per_stream = self.num_chunks // streams
        self.batches_per_worker = self.chunks_per_stream * self.chunk // batch_size
        if self.batches_per_worker < 1:
            raise ValueError(
                f"{files.root!r} has {total} rows: too few for one batch of {batch_size} on each of {world_size} "
                f"rank(s) x {self.workers} worker(s); use a smaller batch_size or fewer workers"
            )
        if epoch_size is not None:  # a shorter epoch (samples per rank); at most one pass over the rows
            cap = max(1, -(-epoch_size // (batch_size * self.workers)))
            self.batches_per_worker = min(self.batches_per_worker, cap)
        self.batches_per_epoch = self.batches_per_worker * self.workers
        self.epoch = 0
        self.resume: dict | None = None

    def _order(self, epoch: int) -> tuple[int, np.ndarray]:
        """This epoch's chunk boundary shift and chunk permutation (the same on every rank and worker)."""
        rng = np.random.default_rng([self.seed, epoch, 0x5EED])
        return int(rng.integers(self.files.total)), rng.permutation(self.num_chunks)

    def _chunks(self, epoch: int, stream: int) -> Iterator[int]:
        """The chunks of one stream: its own share, then (only needed after skipped rows) the whole epoch order."""
        _, perm = self._order(epoch)
        streams = self.world_size * self.workers
        yield from (int(c) for c in perm[stream : self.chunks_per_stream * streams : streams])
        while True:
            yield from (int(c) for c in np.roll(perm, -stream))

    def _chunk_rows(self, epoch: int, chunk: int, shift: int) -> dict[str, Any]:
        total, k = self.files.total, self.chunk
        start = (chunk * k + shift) % total
        parts = [self.reader.read(start, min(total, start + k))]
        if start + k > total:  # the chunk wraps past the last row
            parts.append(self.reader.read(0, start + k - total))
        rows = (
            parts[0]
            if len(parts) == 1
            else {
                n: (np.concatenate([p[n] for p in parts]) if n in ("img", "txt") else parts[0][n] + parts[1][n])
                for n in parts[0]
            }
        )
        perm = np.random.default_rng([self.seed, epoch, chunk, 0xC4]).permutation(k)
        return {n: (v[perm] if isinstance(v, np.ndarray) else [v[i] for i in perm]) for n, v in rows.items()}

    def __iter__(self) -> Iterator[dict]:
        worker, num_workers = _worker()
        if num_workers != self.workers:
            raise RuntimeError(f"EmbeddingStream built for {self.workers} worker(s), iterated by {num_workers}")
        epoch, resume = self.epoch, self.resume
        self.epoch, self.resume = epoch + 1, None
        logical, done_batches, done_rows = worker, 0, 0
        if resume is not None and int(resume["epoch"]) == epoch:
            logical = (worker + int(resume["rotation"])) % num_workers
            done_batches, done_rows = int(resume["batches"][logical]), int(resume["samples"][logical])
        shift, _ = self._order(epoch)
        chunks = self._chunks(epoch, self.rank * self.workers + logical)
        n = done_rows // self.chunk  # the stream's chunk ordinal: raw row n * chunk + j is row j of chunk n
        for _ in range(n):  # resume: jump over whole chunks without reading them
            next(chunks)
        start, batches, buf, fruitless = done_rows % self.chunk, done_batches, [], 0
        while batches < self.batches_per_worker:
            rows = self._chunk_rows(epoch, next(chunks), shift)
            fruitless += 1
            for j, sample in self.batcher.check(rows, start):
                fruitless = 0
                buf.append(sample)
                if len(buf) == self.batcher.batch_size:
                    batches += 1
                    batch = self.batcher.collate(buf)
                    batch["_stream"] = (epoch, logical, batches, n * self.chunk + j + 1)
                    buf = []
                    yield batch
                    if batches == self.batches_per_worker:
                        return
            n, start = n + 1, 0
            if fruitless > self.num_chunks:
                raise ValueError(f"no usable row in {self.files.root!r} (empty captions or non-finite embeddings)")


# --------------------------------------------------------------------------------------------- validation pass


class EmbeddingPass(IterableDataset):
    """One deterministic pass for validation: rank ``r`` of ``W`` reads rows ``[r N / W, (r+1) N / W)``, split
    into contiguous parts over its workers; the last batch may be short, and a rank may get none (N < W)."""

    def __init__(
        self,
        files: EmbeddingFiles,
        *,
        tokenizer: Tokenizer,
        batch_size: int,
        rank: int,
        world_size: int,
        context_length: int = 77,
        read_rows: int = 8192,
    ) -> None:
        super().__init__()
        self.files, self.reader = files, _Reader(files)
        self.batcher = _Batcher(tokenizer, context_length, batch_size)
        self.rank, self.world_size, self.read_rows = rank, world_size, read_rows

    def __iter__(self) -> Iterator[dict]:
        worker, num_workers = _worker()
        n = self.files.total
        lo, hi = self.rank * n // self.world_size, (self.rank + 1) * n // self.world_size
        lo, hi = lo + worker * (hi - lo) // num_workers, lo + (worker + 1) * (hi - lo) // num_workers
        buf: list = []
        for start in range(lo, hi, self.read_rows):
            for _, sample in self.batcher.check(self.reader.read(start, min(hi, start + self.read_rows))):
                buf.append(sample)
                if len(buf) == self.batcher.batch_size:
                    yield self.batcher.collate(buf)
                    buf = []
        if buf:
            yield self.batcher.collate(buf)


# --------------------------------------------------------------------------------------------- datamodule


class EmbeddingNpyDataModule(WebDataModule):
    """:class:`~dalle2.data.datamodule.WebDataModule`'s contract (skip counts, per-rank stream positions in
    checkpoints, exact resume) over clip-retrieval embedding folders instead of shards.

    Args:
        train_dir, val_dir: folders with ``img_emb/``, ``text_emb/`` and ``metadata/`` (``val_dir=None``: no
            validation).
        batch_size, val_batch_size: per-rank batch sizes.
        num_workers: DataLoader workers per rank (the stream is split over them too).
        chunk_size: rows read (and shuffled) together; lowered automatically so that every rank and worker gets
            at least one chunk.
        caption_column: the caption column of ``metadata_*.parquet``.
        epoch_size: training samples per rank per epoch (``None``: one pass over the rows; larger: capped to a pass).
        tokenizer_path, context_length: as for :class:`WebDataModule` (the captions become ``tokens``).
        load_image, load_embeddings: accepted so that experiments written for embedding shards compose; there are
            no images (``load_image=True`` is an error).
    """

    def __init__(
        self,
        *,
        train_dir: str,
        val_dir: str | None = None,
        batch_size: int = 128,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        chunk_size: int = 8192,
        caption_column: str = "caption",
        epoch_size: int | None = None,
        tokenizer_path: str | None = None,
        context_length: int = 77,
        seed: int = 0,
        load_image: bool = False,
        load_embeddings: bool = True,
        persistent_workers: bool = True,
        pin_memory: bool = False,
        prefetch_factor: int = 2,
        tokenizer: Tokenizer | None = None,
    ) -> None:
        if load_image or not load_embeddings:
            raise ValueError("data=embedding_npy holds CLIP embeddings only: load_image=false, load_embeddings=true")
        super().__init__(
            train_urls=train_dir,
            val_urls=val_dir,
            batch_size=batch_size,
            val_batch_size=val_batch_size,
            num_workers=num_workers,
            epoch_size=epoch_size,
            tokenizer_path=tokenizer_path,
            context_length=context_length,
            load_image=False,
            load_embeddings=True,
            seed=seed,
            persistent_workers=persistent_workers,
            pin_memory=pin_memory,
            prefetch_factor=prefetch_factor,
            tokenizer=tokenizer,
        )
        self.train_dir, self.val_dir = train_dir, val_dir
        self.chunk_size, self.caption_column = chunk_size, caption_column
        self._train_files: EmbeddingFiles | None = None
        self._val_files: EmbeddingFiles | None = None

    def setup(self, stage: str | None = None) -> None:
        """Scan and check the folders (a missing or mismatched file fails here, naming it); load the tokenizer."""
        if stage in (None, "fit") and self._train_files is None:
            self._train_files = scan_embeddings(self.train_dir, caption_column=self.caption_column)
        if self.val_dir is not None and self._val_files is None:
            self._val_files = scan_embeddings(self.val_dir, caption_column=self.caption_column)
        if self.tokenizer is None:
            from dalle2.clip.tokenizer import get_tokenizer

            self.tokenizer = get_tokenizer(self.tokenizer_path)

    def train_dataloader(self) -> DataLoader:
        if self._train_files is None:
            self.setup("fit")
        rank, world = self._rank_world()
        ds = EmbeddingStream(
            self._train_files,
            tokenizer=self.tokenizer,
            batch_size=self.batch_size,
            rank=rank,
            world_size=world,
            num_workers=self.num_workers,
            chunk_size=self.chunk_size,
            seed=self.seed,
            context_length=self.context_length,
            epoch_size=self.epoch_size,
        )
        ds.resume_from(self._resume_position, num_workers=self.num_workers)
        return self._loader(ds)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_dir is None:
            return []
        if self._val_files is None:
            self.setup("validate")
        rank, world = self._rank_world()
        ds = EmbeddingPass(
            self._val_files,
            tokenizer=self.tokenizer,
            batch_size=self.val_batch_size,
            rank=rank,
            world_size=world,
            context_length=self.context_length,
        )
        kw: dict[str, Any] = {"prefetch_factor": self.prefetch_factor} if self.num_workers > 0 else {}
        return DataLoader(ds, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory, **kw)
