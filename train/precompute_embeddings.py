"""Embed image/caption shards with a trained CLIP and write embedding shards for the prior and the decoder.

    python train/precompute_embeddings.py clip_ckpt=runs/clip/<run>/checkpoints/last.ckpt \
        "data.urls='data_builtin/train/{00000..00015}.tar'" out_dir=emb/train [trainer.devices=8 dtype=float16]

Each output shard has the same name as its input and holds every readable sample's original members (image,
txt, json) plus ``img_emb.npy`` (D,), ``txt_emb.npy`` (D,) and ``txt_tokens.npy`` (L, text_width: the per-token
text encoder states). Shards are spread over ranks by Lightning ``predict`` (one shard per step), written to a
temporary file and renamed when complete, and skipped when already present, so a killed job resumes by rerunning.
"""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import hydra
import lightning as L
import numpy as np
import torch
import webdataset as wds
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dalle2.data.webdataset import expand_urls, iter_raw_samples, make_dataset  # noqa: E402
from dalle2.lit.checkpoints import CHECKPOINT_ERRORS  # noqa: E402
from dalle2.lit.clip_module import load_clip  # noqa: E402


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


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
        if out_path.exists() and not self.overwrite:
            return {"shard": url, "samples": 0, "skipped_shard": True}
        batches = make_dataset(
            url, image_size=self.image_size, tokenizer=self.tokenizer, train=False, batch_size=self.batch_size,
            context_length=self.clip.model.context_length, rank=0, world_size=1,
        )  # fmt: skip
        raw = iter_raw_samples(url)
        tmp = out_path.with_name(f".{out_path.name}.tmp{self.global_rank}")
        n = 0
        with wds.TarWriter(str(tmp), encoder=False) as sink:
            for batch in batches:
                images = batch["image"].to(self.device)
                tokens = batch["tokens"].to(self.device)
                img_emb = self.clip.encode_image(images).float().cpu().numpy()
                states, txt_emb = self.clip.model.encode_text_tokens(tokens)
                states, txt_emb = states.float().cpu().numpy(), txt_emb.float().cpu().numpy()
                for i, key in enumerate(batch["key"]):
                    sample = next(s for s in raw if s["__key__"] == key)  # same file order; skips bad samples
                    members = {k: v for k, v in sample.items() if not k.startswith("__") and isinstance(v, bytes)}
                    members.update({
                        "img_emb.npy": npy_bytes(img_emb[i].astype(self.np_dtype)),
                        "txt_emb.npy": npy_bytes(txt_emb[i].astype(self.np_dtype)),
                        "txt_tokens.npy": npy_bytes(states[i].astype(self.np_dtype)),
                    })  # fmt: skip
                    sink.write({"__key__": key, **members})
                    n += 1
        os.replace(tmp, out_path)
        return {"shard": url, "samples": n, "skipped_shard": False}


@hydra.main(config_path="../conf", config_name="precompute", version_base="1.3")
def main(cfg: DictConfig) -> None:
    urls = expand_urls(cfg.data.urls)
    try:  # the CLIP (safe load) and its own vocabulary (a named tokenizer must match it)
        clip = load_clip(cfg.clip_ckpt, trust_checkpoint=bool(cfg.get("trust_checkpoint", False)))
        tokenizer = clip.tokenizer(cfg.data.tokenizer_path)
    except CHECKPOINT_ERRORS as e:
        raise SystemExit(f"error: {e}") from None
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    embedder = ShardEmbedder(
        clip, out_dir=cfg.out_dir, image_size=cfg.data.image_size or clip.model.image_size,
        batch_size=cfg.data.batch_size, tokenizer=tokenizer, dtype=cfg.dtype, overwrite=cfg.overwrite,
    )  # fmt: skip
    trainer = L.Trainer(
        accelerator=cfg.trainer.accelerator, devices=cfg.trainer.devices, precision=cfg.trainer.precision,
        logger=False, enable_checkpointing=False, enable_model_summary=False,
    )  # fmt: skip
    loader = torch.utils.data.DataLoader(urls, batch_size=None, shuffle=False)
    results = trainer.predict(embedder, dataloaders=loader) or []
    done = sum(r["samples"] for r in results)
    skipped = sum(r["skipped_shard"] for r in results)
    print(f"[dalle2] {len(urls)} shards -> {cfg.out_dir}: {done} samples embedded, {skipped} shards already complete")


if __name__ == "__main__":
    main()
