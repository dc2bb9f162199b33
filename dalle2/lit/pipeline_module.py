"""The pipeline under Lightning ``Trainer.predict``: sample many prompts on N devices with the same images as on 1.

- :func:`make_items` expands prompts into one item per image: prompt line ``i``, sample ``k`` (the pipeline index
  ``(i, k)``), seed and file name (``{i:05d}.png``, ``{i:05d}_{k}.png`` for k > 0).
- :class:`PromptBatches` (a LightningDataModule) cuts the items into FIXED batches (batch ``j`` = items
  ``[j bs, (j + 1) bs)``) and gives rank ``r`` of ``W`` the batches ``r, r + W, ...``: every batch holds the same
  images at any world size, so the images (whose noise comes from ``(seed, i, k)`` only) are the same too.  With
  fewer batches than ranks the ranks without one idle and write nothing.
  Use it with ``Trainer(use_distributed_sampler=False)``.
- :class:`PipelineModule`: ``predict_step(items)`` runs :class:`~dalle2.pipeline.UnCLIPPipeline` and returns
  8-bit images.
- :class:`SampleWriter` (a prediction-writer callback): every rank writes its own PNGs (atomically; with ``keep``,
  a file ``keep(path)`` accepts is not rewritten); after a barrier rank 0 writes ``manifest.jsonl`` (prompt order)
  and ``grid.png``.
- :func:`valid_image`: a file that decodes completely to the expected size (what a resumed run keeps).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image, ImageDraw, ImageFont

from dalle2.imaging import to_uint8
from dalle2.pipeline import SamplingSettings, UnCLIPPipeline

__all__ = [
    "make_items",
    "PromptBatches",
    "PipelineModule",
    "SampleWriter",
    "caption_lines",
    "image_grid",
    "valid_image",
]


def make_items(prompts: Sequence[str | None], *, n_per_prompt: int = 1, seed: int | Sequence[int] = 0) -> list[dict]:
    """One dict per image, in prompt order: ``{"file", "prompt", "index": i, "k", "seed"}``.  ``prompts[i]`` is
    prompt line ``i``; None (a blank line) is skipped but keeps its number.  ``seed`` a list (``[0, 1, 2]``):
    every image once per seed, seed by seed, files ``{i:05d}[_{k}]_s{seed}.png`` (one seed: ``{i:05d}[_{k}].png``)."""
    if n_per_prompt < 1:
        raise ValueError(f"n_per_prompt must be >= 1, got {n_per_prompt}")
    seeds = [int(seed)] if isinstance(seed, (int, str)) else [int(s) for s in seed]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seed must be an int or a list of distinct ints, got {seed!r}")
    items = []
    for s in seeds:
        tag = f"_s{s}" if len(seeds) > 1 else ""
        for i, p in enumerate(prompts):
            if p is None:
                continue
            for k in range(n_per_prompt):
                name = f"{i:05d}{tag}.png" if k == 0 else f"{i:05d}_{k}{tag}.png"
                items.append({"file": name, "prompt": p, "index": i, "k": k, "seed": s})
    return items


def _identity(x):
    return x


IDLE = -1  # the batch index of the one empty batch a rank without work gets


class _Batches(torch.utils.data.Dataset):
    def __init__(self, items: list[dict], batch_size: int):
        self.items, self.batch_size = items, batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.items) / self.batch_size)

    def __getitem__(self, j: int) -> list[dict]:
        if j == IDLE:
            return []
        return self.items[j * self.batch_size : (j + 1) * self.batch_size]


class PromptBatches(L.LightningDataModule):
    """Fixed batches of items, batch ``j`` to rank ``j % world_size`` (see the module docstring)."""

    def __init__(self, items: list[dict], *, batch_size: int = 8, skip: Callable[[list[dict]], bool] | None = None):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.items, self.batch_size, self.skip = list(items), int(batch_size), skip
        self.skipped_batches = 0

    def batches_for_rank(self, rank: int, world_size: int) -> list[int]:
        return list(range(rank, len(_Batches(self.items, self.batch_size)), world_size))

    def todo_for_rank(self, rank: int, world_size: int) -> list[int]:
        """This rank's batches less those ``skip`` says are done (checked here, by the rank that owns them)."""
        mine = self.batches_for_rank(rank, world_size)
        if self.skip is None:
            return mine
        batches = _Batches(self.items, self.batch_size)
        todo = [j for j in mine if not self.skip(batches[j])]
        self.skipped_batches = len(mine) - len(todo)
        return todo

    def predict_dataloader(self) -> torch.utils.data.DataLoader:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        # A rank without a batch (fewer batches than ranks) gets one EMPTY batch: it runs the loop, every hook and
        # the writer's barriers, and writes nothing.  Given no batch at all, Lightning stops it ("DataLoader within
        # local rank has zero length"), or, when allowed, skips its on_predict_end and the others hang at the barrier.
        mine = self.todo_for_rank(rank, world) or [IDLE]
        return torch.utils.data.DataLoader(
            _Batches(self.items, self.batch_size), batch_size=None, sampler=mine, collate_fn=_identity, num_workers=0
        )


def valid_image(path: str | os.PathLike, size: int | None = None) -> bool:
    """True when ``path`` is an image file that decodes completely (to ``size`` x ``size`` when given)."""
    try:
        with Image.open(path) as img:
            img.load()
            return size is None or img.size == (size, size)
    except Exception:  # missing, truncated, not an image
        return False


class PipelineModule(L.LightningModule):
    """Wraps an :class:`UnCLIPPipeline`; ``predict_step(items)`` -> ``{"images": (B, H, W, 3) uint8, "items"}``.

    ``items`` are :func:`make_items` dicts (prompt, index i, sample k, seed); the pipeline index of an item is
    ``(i, k)``.  ``settings`` / ``size`` as in :meth:`UnCLIPPipeline.__call__`.
    """

    def __init__(self, pipeline: UnCLIPPipeline, *, settings: SamplingSettings | None = None, size: int | None = None):
        super().__init__()
        self.pipeline = pipeline
        self.settings = settings or SamplingSettings()
        self.pipeline._num_upsamplers(size)  # a size the cascade cannot produce fails here, before any work
        self.size = size

    @torch.no_grad()
    def predict_step(self, items: list[dict], batch_idx: int = 0) -> dict[str, Any]:
        if not items:  # an idle rank's empty batch (see PromptBatches)
            return {"images": torch.zeros(0, 1, 1, 3, dtype=torch.uint8), "items": []}
        images = self.pipeline(
            [it["prompt"] for it in items],
            seed=[it["seed"] for it in items],
            indices=[(it["index"], it["k"]) for it in items],
            size=self.size,
            settings=self.settings,
        )
        return {"images": to_uint8(images), "items": items}


# Words a caption can lose when it does not fit under its picture: the rest still says what was asked.
FILLER_WORDS = frozenset("a an the of on in at with that is are placed over and image picture photo".split())
ABBREVIATIONS = {"background": "bg"}


def _fits(text: str, width: int, font) -> bool:
    return font.getlength(text) <= width


def _wrap(words: list[str], width: int, font) -> list[str]:
    lines: list[str] = []
    for word in words:
        while len(word) > 1 and not _fits(word, width, font):  # a word wider than the cell: cut it where it overflows
            k = 1
            while k < len(word) and _fits(word[: k + 1], width, font):
                k += 1
            lines.append(word[:k])
            word = word[k:]
        if lines and _fits(f"{lines[-1]} {word}", width, font):
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


def caption_lines(text: str, width: int, *, font=None, max_lines: int = 4) -> list[str]:
    """``text`` laid out in lines at most ``width`` px wide (in ``font``, default PIL's default font): word-wrapped;
    if that takes more than ``max_lines`` lines, filler words (:data:`FILLER_WORDS`: "an image of a ... on the
    left" -> "... left") are dropped, then long words abbreviated (:data:`ABBREVIATIONS`), and only then is the
    last line cut, ending in "…"."""
    font = font or ImageFont.load_default()
    words = str(text).split()
    lines = _wrap(words, width, font)
    if len(lines) > max_lines:
        words = [w for w in words if w.lower().strip(",.;:") not in FILLER_WORDS] or words
        lines = _wrap(words, width, font)
    if len(lines) > max_lines:
        words = [
            ABBREVIATIONS.get(w.lower().strip(",.;:"), w.lower().strip(",.;:")) + w[len(w.rstrip(",.;:")) :]
            for w in words
        ]
        lines = _wrap(words, width, font)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and not _fits(last + "\u2026", width, font):
            last = last[:-1]
        lines = lines[: max_lines - 1] + [last.rstrip(" ,") + "\u2026"]
    return lines


def image_grid(
    images: Sequence[np.ndarray],
    captions: Sequence[str] | None = None,
    *,
    ncol: int | None = None,
    max_caption_lines: int = 4,
    min_cell_width: int = 64,
) -> Image.Image:
    """Equal-size ``(H, W, 3)`` uint8 images -> one PIL grid.  With ``captions`` each cell (at least
    ``min_cell_width`` px wide, the image centred) carries its caption underneath, laid out by
    :func:`caption_lines` in up to ``max_caption_lines`` lines (PIL's default font)."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    n = len(images)
    ncol = ncol or math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    h, w = images[0].shape[:2]
    font = ImageFont.load_default()
    cw = max(w, min_cell_width) if captions is not None else w
    layouts = [caption_lines(c, cw, font=font, max_lines=max_caption_lines) for c in captions] if captions else []
    line_h = font.getbbox("Ag")[3] + 2
    ch = line_h * max((len(x) for x in layouts), default=0) + 2 if captions is not None else 0
    pad = 2
    grid = Image.new("RGB", (ncol * (cw + pad) + pad, nrow * (h + ch + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for j, img in enumerate(images):
        r, c = divmod(j, ncol)
        x, y = pad + c * (cw + pad), pad + r * (h + ch + pad)
        grid.paste(Image.fromarray(np.asarray(img)), (x + (cw - w) // 2, y))
        for k, line in enumerate(layouts[j] if layouts else []):
            draw.text((x, y + h + 1 + k * line_h), line, fill=(0, 0, 0), font=font)
    return grid


class SampleWriter(BasePredictionWriter):
    """Writes each predicted image to ``out_dir/<item file>`` on the rank that made it; at the end of predict (after
    a barrier) rank 0 writes ``manifest.jsonl`` (one JSON per image in prompt order: the item plus ``extra``) and
    ``grid.png`` (the first ``grid_max`` images, captioned)."""

    def __init__(
        self,
        out_dir: str | os.PathLike,
        items: list[dict],
        *,
        extra: dict | None = None,
        grid_max: int = 64,
        grid_ncol: int | None = None,
        grid_captions: bool = True,
        keep: Callable[[Path], bool] | None = None,
    ):
        super().__init__(write_interval="batch")
        self.out_dir, self.items, self.extra = Path(out_dir), items, dict(extra or {})
        self.grid_max, self.grid_ncol, self.grid_captions = grid_max, grid_ncol, grid_captions
        self.keep = keep
        self.written = 0

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for img, it in zip(prediction["images"].numpy(), prediction["items"]):
            path = self.out_dir / it["file"]
            if self.keep is not None and self.keep(path):  # resuming: a file already there and valid stays as it is
                continue
            tmp = path.with_name(f".{path.name}.tmp")
            Image.fromarray(img).save(tmp, format="PNG")
            os.replace(tmp, path)
            self.written += 1

    def on_predict_end(self, trainer, pl_module) -> None:
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            self.write_manifest()
            self.write_grid()
        trainer.strategy.barrier()

    def write_manifest(self) -> Path:
        path = self.out_dir / "manifest.jsonl"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            for it in self.items:
                f.write(json.dumps({**it, **self.extra}, sort_keys=False) + "\n")
        return path

    def write_grid(self) -> Path | None:
        shown = [it for it in self.items if (self.out_dir / it["file"]).exists()][: self.grid_max]
        if not shown:
            return None
        images = [np.asarray(Image.open(self.out_dir / it["file"]).convert("RGB")) for it in shown]
        captions = [it["prompt"] for it in shown] if self.grid_captions else None
        path = self.out_dir / "grid.png"
        image_grid(images, captions, ncol=self.grid_ncol).save(path)
        return path
