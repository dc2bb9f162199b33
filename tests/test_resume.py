"""Exact resume: the training data stream continues where it stopped, and a training run killed with SIGKILL
and resumed with ``ckpt_path=last`` follows the uninterrupted run's loss curve."""

from __future__ import annotations

import pytest

from dalle2.data.datamodule import WebDataModule
from test_data_webdataset import StandInTokenizer


def _dm(urls, workers, persistent=True):
    return WebDataModule(
        train_urls=urls, image_size=32, batch_size=8, num_workers=workers, epoch_size=40, shuffle_buffer=50,
        tokenizer=StandInTokenizer(), random_crop=True, persistent_workers=persistent,
    )


def _take(dm, n):
    """n training batches as (keys, image sum), crossing epochs like Lightning (one iter() per epoch)."""
    dm.setup("fit")
    loader, out = dm.train_dataloader(), []
    while len(out) < n:
        for b in loader:
            b = dm.on_before_batch_transfer(b, 0)
            out.append((tuple(b["key"]), round(float(b["image"].sum()), 3)))
            if len(out) == n:
                break
    return out


@pytest.mark.parametrize("workers,persistent", [(0, True), (2, True), (2, False)])
def test_stream_resumes_exactly(builtin_shards, workers, persistent):
    # 40 samples/epoch, batch 8: 5 batches per epoch (workers=0) or 3 per worker (workers=2)
    full = _take(_dm(builtin_shards["train"], workers, persistent), 14)
    assert len(set(full)) == len(full)
    for k in (3, 6, 7):  # mid-epoch (odd: rotation of workers), at an epoch end, just after one
        dm = _dm(builtin_shards["train"], workers, persistent)
        head = _take(dm, k)
        state = dm.state_dict()
        dm2 = _dm(builtin_shards["train"], workers, persistent)
        dm2.load_state_dict(state)
        assert head + _take(dm2, 14 - k) == full, f"resumed after {k} batches"


def test_stream_state_without_position_starts_fresh(builtin_shards):
    a = _take(_dm(builtin_shards["train"], 0), 3)
    dm = _dm(builtin_shards["train"], 0)
    dm.load_state_dict({"epoch": 0, "seed": 0, "skipped": {}})
    assert _take(dm, 3) == a
