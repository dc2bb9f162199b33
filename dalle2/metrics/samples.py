"""What the sample evaluation reads: a directory of generated samples and reference images from shards.

Samples directory (``eval/sample.py`` writes it): ``DIR/manifest.jsonl``, one JSON object per image with at least
``{"file": "00000.png", "prompt": "..."}`` (plus ``index``, ``k``, ``seed``, settings), and the PNG files.

Both datasets are split over ranks and DataLoader workers by a global item number ``id`` (manifest row / reference
sample number in shard order): item ``id`` goes to rank ``id % W`` (then worker ``(id // W) % num_workers``), so
every item is read exactly once at any world size and the metrics, gathered and sorted by ``id``, do not depend on
it.  Use the loaders with ``Trainer(use_distributed_sampler=False)``.

Samples and reference images alike go through the one FID preprocessing (:func:`dalle2.metrics.resize.fid_inputs`:
full decode, clean-fid's float bicubic to the evaluation size with a centre crop, uint8; then to 299 px for the
Inception).  The CLIP and the checker read the same uint8 pixels.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from PIL import Image

from dalle2.data.webdataset import IMAGE_EXTS, expand_urls, iter_raw_samples
from dalle2.metrics.inception import FID_INPUT_SIZE
from dalle2.metrics.resize import decode_image, fid_inputs, load_image

__all__ = ["read_manifest", "samples_image_size", "reads_item", "empty_item", "SampleFiles", "ReferenceImages"]

MANIFEST = "manifest.jsonl"


def read_manifest(samples_dir: str | Path) -> list[dict]:
    """The rows of ``samples_dir/manifest.jsonl`` (each with ``file`` and ``prompt``); clear errors otherwise."""
    root = Path(samples_dir)
    path = root / MANIFEST
    if not root.is_dir():
        raise FileNotFoundError(f"samples directory not found: {root}")
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (a samples directory written by eval/sample.py has one)")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise ValueError(f"{path}:{n}: not a JSON object: {line[:80]!r}") from None
        if not isinstance(row, dict) or not isinstance(row.get("file"), str) or not isinstance(row.get("prompt"), str):
            raise ValueError(f"{path}:{n}: expected an object with string 'file' and 'prompt', got {line[:80]!r}")
        if not (root / row["file"]).is_file():
            raise FileNotFoundError(f"{path}:{n}: sample file {root / row['file']} not found")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path} lists no samples")
    return rows


def samples_image_size(samples_dir: str | Path, rows: list[dict]) -> int:
    """The side of the first sample image (the samples of one run share a size)."""
    with Image.open(Path(samples_dir) / rows[0]["file"]) as img:
        w, h = img.size
    return min(w, h)


def reads_item(item: int, rank: int, world_size: int) -> bool:
    """Whether this rank (and DataLoader worker) reads item number ``item``: rank ``item % W``, then worker
    ``(item // W) % num_workers``."""
    if item % world_size != rank:
        return False
    info = torch.utils.data.get_worker_info()
    return info is None or (item // world_size) % info.num_workers == info.id


def empty_item(image_size: int, item_id: int, text: str, *, inception: bool) -> dict:
    """The item of an unreadable image: zero tensors of the right shapes, ``valid=False`` (skipped and counted)."""
    out = {
        "image": torch.zeros(3, image_size, image_size),
        "id": item_id,
        "text": text,
        "valid": False,
    }
    if inception:
        out["inception"] = torch.zeros(3, FID_INPUT_SIZE, FID_INPUT_SIZE)
    return out


def _fill(out: dict, image, image_size: int, inception: bool) -> dict:
    got = fid_inputs(image, image_size, inception=inception)
    out["image"] = got["pixels"].float().div_(127.5).sub_(1.0)
    if inception:
        out["inception"] = got["inception"]
    out["valid"] = True
    return out


class SampleFiles(torch.utils.data.IterableDataset):
    """Yields ``{"image": (3, S, S) float in [-1, 1], "id": row number, "text": prompt, "valid"}`` (+ ``"inception"``:
    (3, 299, 299) in [0, 1] with ``inception``), preprocessed by :func:`~dalle2.metrics.resize.fid_inputs`; an
    unreadable or corrupt PNG yields ``valid=False`` (zero images) so that the evaluator skips and counts it."""

    def __init__(
        self,
        samples_dir: str | Path,
        rows: list[dict],
        *,
        image_size: int,
        rank: int = 0,
        world_size: int = 1,
        inception: bool = False,
    ):
        super().__init__()
        self.root, self.rows, self.image_size = Path(samples_dir), rows, int(image_size)
        self.rank, self.world_size, self.inception = rank, world_size, bool(inception)

    def __iter__(self) -> Iterator[dict]:
        for j, row in enumerate(self.rows):
            if not reads_item(j, self.rank, self.world_size):
                continue
            path = self.root / row["file"]
            out = empty_item(self.image_size, j, row["prompt"], inception=self.inception)
            try:
                _fill(out, load_image(path), self.image_size, self.inception)
            except Exception as exc:  # counted as samples_skipped; raising here would leave the other ranks waiting
                warnings.warn(
                    f"sample image {path} could not be read ({type(exc).__name__}: {exc}); skipped", stacklevel=2
                )
            yield out


class ReferenceImages(torch.utils.data.IterableDataset):
    """Reference images from WebDataset shards: the first ``max_samples`` samples in shard order, preprocessed at
    ``image_size`` exactly as the samples are (:func:`~dalle2.metrics.resize.fid_inputs`).

    Yields ``{"image", "id", "text": caption or "", "valid"}`` (+ ``"inception"``); a sample without a decodable
    image yields ``valid=False`` (zero images) so that the evaluator can count it as skipped.  Every rank reads the
    shard bytes up to ``max_samples`` but decodes only its own items.
    """

    def __init__(
        self,
        urls: str,
        *,
        image_size: int,
        max_samples: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        inception: bool = False,
    ):
        super().__init__()
        self.urls = expand_urls(urls)
        self.image_size, self.max_samples = int(image_size), max_samples
        self.rank, self.world_size, self.inception = rank, world_size, bool(inception)

    def __iter__(self) -> Iterator[dict]:
        j = 0
        for url in self.urls:
            for sample in iter_raw_samples(url):
                if self.max_samples is not None and j >= self.max_samples:
                    return
                if reads_item(j, self.rank, self.world_size):
                    yield self._decode(sample, j)
                j += 1

    def _decode(self, sample: dict, j: int) -> dict:
        txt = sample.get("txt")
        text = txt.decode("utf-8", errors="replace").strip() if isinstance(txt, bytes) else ""
        data = next((sample[e] for e in IMAGE_EXTS if sample.get(e) is not None), None)
        out = empty_item(self.image_size, j, text, inception=self.inception)
        if data is None:
            warnings.warn(
                f"reference sample {sample.get('__key__')!r} in {sample.get('__url__')} has no image; skipped",
                stacklevel=2,
            )
            return out
        try:
            _fill(out, decode_image(data), self.image_size, self.inception)
        except Exception:
            warnings.warn(
                f"reference sample {sample.get('__key__')!r} in {sample.get('__url__')}: corrupt image; skipped",
                stacklevel=2,
            )
        return out
