"""Nothing hangs: every collective is reached by every rank, also when a rank has no data, and a signal sent to one
rank stops every rank at the same step. 2 CPU processes (Lightning DDP, gloo) through train/train.py."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from helpers.tiny_runs import empty_tar, run, stage_cmd, tiny_clip_ckpt

DDP = ("trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2")


@pytest.fixture(scope="module")
def clip_ckpt(tmp_path_factory):
    return tiny_clip_ckpt(tmp_path_factory.mktemp("clip") / "clip.ckpt")


def val_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return [r for r in csv.DictReader(f) if r.get("val/loss")]


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["clip", "prior", "decoder", "upsampler"])
def test_validation_with_an_empty_val_shard_on_one_rank(stage, builtin_shards, clip_ckpt, tmp_path):
    """img2dataset writes an empty tar when every download of a shard fails: with val = one good shard + one
    empty tar over 2 ranks, rank 1 gets no val batch. Validation must finish, with metrics over the samples
    that exist (rank 0's)."""
    val = f"{builtin_shards['val'].split('{')[0]}00000.tar::{empty_tar(tmp_path / 'empty' / '00001.tar')}"
    image_size = 64 if stage == "upsampler" else 32
    cmd = stage_cmd(stage, tmp_path / "run", train_urls=builtin_shards["train"], val_urls=val, clip_ckpt=clip_ckpt,
                    image_size=image_size, extra=(*DDP, "trainer.max_steps=2", "trainer.val_check_interval=2",
                                                  "trainer.limit_val_batches=2", "data.val_batch_size=8"))  # fmt: skip
    proc = run(cmd, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = val_rows(tmp_path / "run")
    assert rows and all(float(r["val/loss"]) == float(r["val/loss"]) for r in rows)  # logged, not NaN
