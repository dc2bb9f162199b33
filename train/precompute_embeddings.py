"""Embed image/caption shards with a trained CLIP and write embedding shards for the prior and the decoder.

    python train/precompute_embeddings.py clip_ckpt=runs/clip/<run>/checkpoints/last.ckpt \
        "data.urls='data_builtin/train/{00000..00015}.tar'" out_dir=emb/train [trainer.devices=8 dtype=float16]

Each output shard has the same name as its input and holds every readable sample's original members (image,
txt, json) plus ``img_emb.npy`` (D,), ``txt_emb.npy`` (D,) and ``txt_tokens.npy`` (L, text_width: the per-token
text encoder states). Shards are spread over ranks by Lightning ``predict`` (one shard per step), written atomically
(:func:`dalle2.io.atomic_write`), then recorded complete by a sidecar ``<shard>.json`` (source samples, embedded,
skipped by reason). A shard counts as done only when it holds its source's samples minus the counted skips, so a
killed job resumes by rerunning; the job exits non-zero when any shard is missing or incomplete at the end.
"""

from __future__ import annotations

import io
import json
import os
import sys
from collections import Counter
from pathlib import Path

import hydra
import lightning as L
import numpy as np
import torch
import webdataset as wds
from hydra.utils import instantiate
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dalle2.data.webdataset import count_samples, expand_urls, iter_raw_samples, make_dataset  # noqa: E402
from dalle2.io import atomic_write, write_json_atomic  # noqa: E402
from dalle2.lit.checkpoints import CHECKPOINT_ERRORS  # noqa: E402
from dalle2.lit.clip_module import load_clip  # noqa: E402
from dalle2.lit.distributed import releases_process_group  # noqa: E402


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


class ShardError(RuntimeError):
    """A source shard that cannot give a complete embedding shard (layout problem, not a corrupt sample)."""


def marker_path(out_path: Path) -> Path:
    """The sidecar ``<shard>.json`` that records a complete embedding shard (written after the shard)."""
    return out_path.with_name(out_path.name + ".json")


def consistent(n: int, source: int, skipped: dict[str, int]) -> bool:
    """An embedding shard of ``n`` samples is whole when ``n`` = its source's samples minus the skipped ones; when
    the source itself is damaged (``bad_shard``: cut short, or its ``pipe:`` command failed) the samples after the
    damage cannot be counted, so any ``n`` up to that is what the source gives."""
    expected = source - sum(int(v) for k, v in skipped.items() if k != "bad_shard")
    return n <= expected if skipped.get("bad_shard") else n == expected


def shard_complete(out_path: Path) -> bool:
    """True when ``out_path`` and its sidecar exist and the shard holds what the sidecar says it must: as many
    samples as its source minus the counted skips (a crash never leaves a short shard that looks done)."""
    try:
        info = json.loads(marker_path(out_path).read_text())
        n = int(info["samples"])
        return (
            out_path.is_file()
            and n == count_samples([str(out_path)])
            and consistent(n, int(info["source_samples"]), info["skipped"])
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


class ShardEmbedder(L.LightningModule):
    """``predict_step(shard_url)`` embeds one shard and writes its embedding shard; returns a small summary."""

    def __init__(self, clip, *, out_dir: str, image_size: int, batch_size: int, tokenizer, dtype: str, overwrite: bool):
        super().__init__()
        self.clip = clip
        self.out_dir, self.image_size, self.batch_size = Path(out_dir), image_size, batch_size
        self.tokenizer, self.np_dtype, self.overwrite = tokenizer, np.dtype(dtype), overwrite

    @torch.no_grad()
    def predict_step(self, url: str, batch_idx: int) -> dict:
        out_path = self.out_dir / Path(url).name
        if not self.overwrite and shard_complete(out_path):
            return {"shard": url, "samples": 0, "skipped_shard": True}
        pending: Counter = Counter()  # skips not yet handed out with a batch (each batch carries its own)
        skipped: Counter = Counter()
        batches = make_dataset(
            url,
            image_size=self.image_size,
            tokenizer=self.tokenizer,
            train=False,
            batch_size=self.batch_size,
            context_length=self.clip.model.context_length,
            rank=0,
            world_size=1,
            skip_counter=pending,
        )
        raw = iter_raw_samples(url)
        n = 0
        with atomic_write(out_path) as f, wds.TarWriter(f, encoder=False) as sink:
            for batch in batches:
                skipped.update(batch.pop("skipped", {}))
                images = batch["image"].to(self.device)
                tokens = batch["tokens"].to(self.device)
                img_emb = self.clip.encode_image(images).float().cpu().numpy()
                text = self.clip.encode_text_features(tokens)
                states, txt_emb = text.tokens.float().cpu().numpy(), text.embed.float().cpu().numpy()
                for i, key in enumerate(batch["key"]):
                    # the raw samples come in the same file order; bad ones (skipped by the decoder) are passed over
                    sample = next((s for s in raw if os.path.basename(s["__key__"]) == key), None)
                    if sample is None:
                        raise ShardError(f"shard {url}: decoded sample {key!r} not found among its raw samples")
                    members = {k: v for k, v in sample.items() if not k.startswith("__") and isinstance(v, bytes)}
                    members.update(
                        {
                            "img_emb.npy": npy_bytes(img_emb[i].astype(self.np_dtype)),
                            "txt_emb.npy": npy_bytes(txt_emb[i].astype(self.np_dtype)),
                            "txt_tokens.npy": npy_bytes(states[i].astype(self.np_dtype)),
                        }
                    )
                    sink.write({"__key__": key, **members})
                    n += 1
            skipped.update(pending)  # skipped after the last batch
            source = count_samples([url])
            layout = {r: skipped[r] for r in ("missing_image", "missing_caption") if skipped[r]}
            if source and n == 0 and sum(layout.values()) == source:
                raise ShardError(
                    f"shard {url}: none of its {source} samples has both an image and a caption ({layout}); "
                    "img2dataset's layout is {key}.jpg|png|webp + {key}.txt with the same {key}"
                )
            if not consistent(n, source, skipped):
                raise ShardError(
                    f"shard {url}: {n} samples embedded, expected {source} minus {sum(skipped.values())} "
                    f"skipped ({dict(skipped)}); not marking it complete"
                )
        write_json_atomic(
            marker_path(out_path), {"source": url, "source_samples": source, "samples": n, "skipped": dict(skipped)}
        )
        return {"shard": url, "samples": n, "skipped_shard": False}


@hydra.main(config_path="../conf", config_name="precompute", version_base="1.3")
@releases_process_group
def main(cfg: DictConfig) -> None:
    urls = expand_urls(cfg.data.urls)
    try:  # the CLIP (safe load) and its own vocabulary (a named tokenizer must match it)
        clip = load_clip(cfg.clip_ckpt, trust_checkpoint=bool(cfg.get("trust_checkpoint", False)))
        tokenizer = clip.tokenizer(cfg.data.tokenizer_path)
    except CHECKPOINT_ERRORS as e:
        raise SystemExit(f"error: {e}") from None
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    embedder = ShardEmbedder(
        clip,
        out_dir=cfg.out_dir,
        image_size=cfg.data.image_size or clip.model.image_size,
        batch_size=cfg.data.batch_size,
        tokenizer=tokenizer,
        dtype=cfg.dtype,
        overwrite=cfg.overwrite,
    )
    trainer = instantiate(cfg.trainer, use_distributed_sampler=True)  # the shard list is split over ranks
    loader = torch.utils.data.DataLoader(urls, batch_size=None, shuffle=False)
    results = trainer.predict(embedder, dataloaders=loader) or []
    done = sum(r["samples"] for r in results)
    skipped = sum(r["skipped_shard"] for r in results)
    if trainer.is_global_zero:
        # whatever happened on the way (another rank, an iterator that ended early), never exit 0 with a shard missing
        missing = [u for u in urls if not shard_complete(Path(cfg.out_dir) / Path(u).name)]
        if missing:
            sys.exit(
                f"[dalle2] {len(missing)} of {len(urls)} embedding shards are missing or incomplete in "
                f"{cfg.out_dir}: {missing[:5]}{' ...' if len(missing) > 5 else ''}"
            )
        print(
            f"[dalle2] {len(urls)} shards -> {cfg.out_dir}: {done} samples embedded (this process), "
            f"{skipped} shards already complete"
        )


if __name__ == "__main__":
    main()
