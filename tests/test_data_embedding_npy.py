"""data=embedding_npy: the prior trains from clip-retrieval embedding folders (img_emb/*.npy, text_emb/*.npy,
metadata/*.parquet) — rows split by rank and worker without overlap, equal batch counts on every rank, exact
resume, one validation pass reading every row once, clear errors, and a 2-step train.py run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("pyarrow")

from dalle2.clip.tokenizer import get_tokenizer  # noqa: E402
from dalle2.data.embedding_npy import EmbeddingNpyDataModule, EmbeddingPass, EmbeddingStream, scan_embeddings  # noqa: E402
from helpers.laion_npy import prior_npy_cmd, write_embedding_folder  # noqa: E402
from helpers.tiny_runs import run  # noqa: E402

ROWS = (37, 50, 29)  # 116 rows in 3 files of unequal size
TOK = get_tokenizer(None)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("laion")
    return str(root), write_embedding_folder(root, ROWS)  # dim CLIP_DIM: the tiny prior's embed_dim


@pytest.fixture(scope="module")
def bad_rows(tmp_path_factory):
    """Row 5 has an empty caption, row 60 a NaN image embedding."""
    root = tmp_path_factory.mktemp("laion_bad")
    return str(root), write_embedding_folder(root, ROWS, dim=8, empty_captions=(5,), nan_rows=(60,))


def _dm(root, workers, **kw):
    kw = {"batch_size": 4, "chunk_size": 8, "tokenizer": TOK, **kw}
    return EmbeddingNpyDataModule(train_dir=root, num_workers=workers, **kw)


def _epoch(root, rank, world, workers, epoch=0):
    """One epoch of one rank's stream as a DataLoader iterates it (workers served round-robin)."""
    ds = EmbeddingStream(
        scan_embeddings(root),
        tokenizer=TOK,
        batch_size=4,
        rank=rank,
        world_size=world,
        num_workers=workers,
        chunk_size=8,
    )
    ds.epoch = epoch
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)
    return ds, list(loader)


@pytest.mark.parametrize("workers", [0, 2])
def test_ranks_and_workers_split_the_rows_and_batches_match_the_files(folder, workers):
    root, data = folder
    index = {k: i for i, k in enumerate(data["key"])}
    seen: list[str] = []
    counts = []
    for rank in (0, 1):
        ds, batches = _epoch(root, rank, 2, workers)
        counts.append(len(batches))
        assert len(batches) == ds.batches_per_epoch
        for b in batches:
            rows = [index[k] for k in b["key"]]
            assert torch.equal(b["img_emb"], torch.from_numpy(data["img"][rows]))
            assert torch.equal(b["txt_emb"], torch.from_numpy(data["txt"][rows]))
            assert b["caption"] == [data["caption"][r] for r in rows]
            assert torch.equal(b["tokens"], TOK(b["caption"], context_length=77))
            assert b["img_emb"].dtype == torch.float32 and b["tokens"].dtype == torch.int64
            seen += b["key"]
    assert counts[0] == counts[1] > 0  # DDP: every rank the same number of batches
    assert len(seen) == len(set(seen))  # no row twice in an epoch, over ranks and workers
    streams = 2 * max(1, workers)  # each reads floor(116 / 8) // streams whole chunks of 8 rows
    assert len(seen) == (sum(ROWS) // 8 // streams) * streams * 8


def test_epoch_size_shortens_an_epoch_and_composes_with_the_laion_experiment(folder):
    root, _ = folder
    full = EmbeddingStream(scan_embeddings(root), tokenizer=TOK, batch_size=4, rank=0, world_size=2, chunk_size=8)
    short = EmbeddingStream(
        scan_embeddings(root), tokenizer=TOK, batch_size=4, rank=0, world_size=2, chunk_size=8, epoch_size=10
    )
    long = EmbeddingStream(
        scan_embeddings(root), tokenizer=TOK, batch_size=4, rank=0, world_size=2, chunk_size=8, epoch_size=10**6
    )
    assert short.batches_per_epoch == 3 < full.batches_per_epoch == long.batches_per_epoch
    assert len(list(short)) == 3
    # the paper-size prior experiment's data settings (epoch_size, workers, batch) are accepted as they are
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate

    from helpers.tiny_runs import REPO_ROOT

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                "experiment=prior_vit_l14_laion",
                "data=embedding_npy",
                f"data.train_dir={root}",
                "data.batch_size=4",
                "data.num_workers=0",
                "seed=0",
            ],
        )
    GlobalHydra.instance().clear()
    dm = instantiate(cfg.data, tokenizer=TOK)
    assert isinstance(dm, EmbeddingNpyDataModule) and dm.epoch_size == cfg.data.epoch_size


def test_epochs_differ_and_cover_every_row(folder):
    root, data = folder
    epochs = [[k for b in _epoch(root, 0, 1, 0, epoch=e)[1] for k in b["key"]] for e in range(4)]
    assert epochs[0] != epochs[1]
    assert set().union(*epochs) == set(data["key"])  # the unread tail (< 1 chunk) moves each epoch


def test_bad_rows_are_skipped_counted_and_ranks_stay_equal(bad_rows):
    root, data = bad_rows
    totals: dict[str, int] = {}
    for e in range(3):
        counts = []
        for rank in (0, 1):
            ds, batches = _epoch(root, rank, 2, 0, epoch=e)
            counts.append(len(batches))
            for b in batches:
                assert data["key"][5] not in b["key"] and data["key"][60] not in b["key"]
                assert all(len(c.strip()) for c in b["caption"]) and torch.isfinite(b["img_emb"]).all()
                for reason, n in b["skipped"].items():
                    totals[reason] = totals.get(reason, 0) + n
        assert counts[0] == counts[1] == ds.batches_per_epoch  # a stream short of rows tops up, never ends early
    assert set(totals) == {"empty_caption", "corrupt_embedding"}  # each read (and counted) in some epoch of 3


def _take(dm, n):
    dm.setup("fit")
    loader, out = dm.train_dataloader(), []
    while len(out) < n:
        for b in loader:
            b = dm.on_before_batch_transfer(b, 0)
            out.append((tuple(b["key"]), float(b["img_emb"].sum())))
            if len(out) == n:
                break
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_exactly(folder, workers):
    root, _ = folder
    per_epoch = EmbeddingStream(
        scan_embeddings(root), tokenizer=TOK, batch_size=4, rank=0, world_size=1, num_workers=workers, chunk_size=8
    ).batches_per_epoch
    total = 2 * per_epoch + 3
    full = _take(_dm(root, workers), total)
    for k in (3, per_epoch, per_epoch + 1):  # mid-epoch (odd: worker rotation), at the epoch's end, just after
        dm = _dm(root, workers)
        head = _take(dm, k)
        dm2 = _dm(root, workers)
        dm2.load_state_dict(dm.state_dict())
        assert head + _take(dm2, total - k) == full, f"resumed after {k} batches"


@pytest.mark.parametrize("workers", [0, 2])
def test_validation_reads_every_row_once_over_ranks(folder, workers):
    root, data = folder
    files = scan_embeddings(root)
    keys = []
    for rank in (0, 1):
        ds = EmbeddingPass(files, tokenizer=TOK, batch_size=4, rank=rank, world_size=2, read_rows=16)
        keys += [k for b in torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers) for k in b["key"]]
    assert sorted(keys) == sorted(data["key"])


def test_clear_errors(tmp_path, folder):
    root, _ = folder
    with pytest.raises(FileNotFoundError, match="img_emb"):
        scan_embeddings(tmp_path)
    bad = tmp_path / "bad"
    write_embedding_folder(bad, (10, 12), dim=8)
    os.remove(bad / "text_emb" / "text_emb_1.npy")
    with pytest.raises(FileNotFoundError, match="text_emb_1.npy"):
        scan_embeddings(bad)
    np.save(bad / "text_emb" / "text_emb_1.npy", np.zeros((11, 8), np.float16))
    with pytest.raises(ValueError, match="text_emb_1.npy"):
        scan_embeddings(bad)
    with pytest.raises(ValueError, match="no column 'text'"):
        scan_embeddings(root, caption_column="text")
    with pytest.raises(ValueError, match="too few for one batch"):
        EmbeddingStream(scan_embeddings(root), tokenizer=TOK, batch_size=64, rank=0, world_size=2)
    with pytest.raises(ValueError, match="load_image"):
        EmbeddingNpyDataModule(train_dir=root, load_image=True)


def test_train_py_prior_two_steps_from_embedding_folder(folder, tmp_path):
    root, _ = folder
    run_dir = tmp_path / "run"
    proc = run(
        prior_npy_cmd(
            run_dir,
            root,
            root,
            extra=("trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=2"),
        ),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((run_dir / "final_metrics.json").read_text())
    assert result["step"] == 2 and Path(result["last_ckpt"]).is_file()
    assert np.isfinite(result["metrics"]["val/loss"])
    state = torch.load(result["last_ckpt"], map_location="cpu", weights_only=True)
    assert state["EmbeddingNpyDataModule"]["stream"][0]["batches"] == [2]  # the stream position is checkpointed
