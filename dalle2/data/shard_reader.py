"""Reading img2dataset-style WebDataset shards: tar members → samples → decoded dicts → batches.

The per-worker stages that :func:`dalle2.data.webdataset.make_dataset` chains (:class:`_Stages`): a shard is read
member by member (a truncated or unreadable tar, or a ``pipe:`` command that exits non-zero, warns and counts one
``bad_shard``, keeping the complete samples read); a sample is decoded (image → float32 (3, S, S) in [-1, 1] by
:func:`load_rgb`, caption tokenized, json and ``.npy`` embeddings loaded) or skipped and counted by reason
(:data:`SKIP_REASONS`); samples are batched, each batch carrying the skip counts since the previous one. How shards
are chosen (the resampled training stream, the deterministic validation split) lives in
:mod:`dalle2.data.train_stream` and :mod:`dalle2.data.webdataset`.
"""

from __future__ import annotations

import io
import json
import os
import random
import sys
import tarfile
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from dalle2.data.guard import StreamGuard
from dalle2.data.urls import close_shard, open_shard, resolve_url_commands
from dalle2.seeding import mix_seed

__all__ = ["EMBED_KEYS", "IMAGE_EXTS", "SKIP_REASONS", "iter_raw_samples", "load_rgb"]

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
