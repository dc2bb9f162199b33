"""Tiny folders in clip-retrieval's embedding layout (``img_emb/img_emb_{i}.npy``, ``text_emb/text_emb_{i}.npy``,
``metadata/metadata_{i}.parquet``) and a tiny prior run on one through ``train/train.py``."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from helpers.tiny_runs import _TINY, CLIP_DIM, REPO_ROOT


def write_embedding_folder(
    root: str | Path,
    rows: tuple[int, ...] = (37, 50, 29),
    *,
    dim: int = CLIP_DIM,
    seed: int = 0,
    empty_captions: tuple[int, ...] = (),
    nan_rows: tuple[int, ...] = (),
) -> dict:
    """Write ``len(rows)`` file triples (float16 unit-norm embeddings, as clip-retrieval writes them, and a parquet
    with ``caption`` and ``url`` columns). ``empty_captions`` / ``nan_rows`` are global row indices given an empty
    caption / a NaN image embedding. -> ``{"img", "txt"}`` float32 (N, D) as read back, ``"caption"``, ``"key"``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = Path(root)
    for sub in ("img_emb", "text_emb", "metadata"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out: dict = {"img": [], "txt": [], "caption": [], "key": []}
    start = 0
    for i, n in enumerate(rows):
        img, txt = (rng.standard_normal((n, dim)).astype(np.float32) for _ in range(2))
        img, txt = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (img, txt))
        img, txt = img.astype(np.float16), txt.astype(np.float16)
        captions = [f"a picture number {start + j} of file {i}" for j in range(n)]
        for g in empty_captions:
            if start <= g < start + n:
                captions[g - start] = "  "
        for g in nan_rows:
            if start <= g < start + n:
                img[g - start, 0] = np.nan
        np.save(root / "img_emb" / f"img_emb_{i}.npy", img)
        np.save(root / "text_emb" / f"text_emb_{i}.npy", txt)
        table = pa.table({"caption": captions, "url": [f"http://example.invalid/{start + j}" for j in range(n)]})
        pq.write_table(table, root / "metadata" / f"metadata_{i}.parquet", row_group_size=16)
        out["img"].append(img.astype(np.float32)), out["txt"].append(txt.astype(np.float32))
        out["caption"] += captions
        out["key"] += [f"{i:05d}_{j}" for j in range(n)]
        start += n
    out["img"], out["txt"] = np.concatenate(out["img"]), np.concatenate(out["txt"])
    return out


def prior_npy_cmd(
    run_dir: str | Path, train_dir: str | Path, val_dir: str | Path | None = None, *, extra: tuple[str, ...] = ()
) -> list[str]:
    """``python train/train.py`` for a tiny prior (``experiment=prior_tiny``, tiny model) on ``data=embedding_npy``:
    text embedding only (no CLIP needed), batch 4, 1 worker, csv logs, no progress bar."""
    tiny = [a for a in _TINY["prior"] if not a.startswith("data=")]
    return [
        sys.executable,
        str(REPO_ROOT / "train" / "train.py"),
        *tiny,
        "data=embedding_npy",
        f"data.train_dir={train_dir}",
        f"data.val_dir={val_dir}" if val_dir else "data.val_dir=null",
        "data.batch_size=4",
        "data.num_workers=1",
        "module.use_text_tokens=false",
        f"model.embed_dim={CLIP_DIM}",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "logger=csv",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]
