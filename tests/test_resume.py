"""Exact resume: the training data stream continues where it stopped, and a training run killed with SIGKILL
and resumed with ``ckpt_path=last`` follows the uninterrupted run's loss curve, its metrics.csv holding the whole
history."""

from __future__ import annotations

import pytest

from dalle2.data.datamodule import WebDataModule
from helpers.shards import StandInTokenizer


def _dm(urls, workers, persistent=True):
    return WebDataModule(
        train_urls=urls,
        image_size=32,
        batch_size=8,
        num_workers=workers,
        epoch_size=40,
        shuffle_buffer=50,
        tokenizer=StandInTokenizer(),
        random_crop=True,
        persistent_workers=persistent,
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


# ------------------------------------------------------------------------------------------------ train.py end to end

import csv  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from helpers.tiny_runs import REPO_ROOT, decoder_cmd, run_env  # noqa: E402
from helpers.tiny_runs import tiny_clip_ckpt as write_tiny_clip


@pytest.fixture(scope="module")
def tiny_clip_ckpt(tmp_path_factory):
    """An (untrained) tiny CLIP checkpoint with embed_dim 32 for the decoder's on-the-fly embeddings."""
    return write_tiny_clip(tmp_path_factory.mktemp("clip") / "clip.ckpt")


def losses(metrics_csv):
    out = {}
    with open(metrics_csv) as f:
        for row in csv.DictReader(f):
            if row.get("train/loss"):
                out[int(row["step"])] = float(row["train/loss"])
    return out


def test_sigkill_and_resume_matches_uninterrupted(builtin_shards, tiny_clip_ckpt, tmp_path):
    n, k = 12, 4
    common = [f"trainer.max_steps={n}", f"callbacks.model_checkpoint.every_n_train_steps={k}"]
    a_dir, b_dir = tmp_path / "A", tmp_path / "B"
    a = subprocess.run(
        decoder_cmd(builtin_shards, tiny_clip_ckpt, a_dir, *common),
        cwd=REPO_ROOT,
        env=run_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert a.returncode == 0, a.stderr[-3000:]

    proc = subprocess.Popen(
        decoder_cmd(builtin_shards, tiny_clip_ckpt, b_dir, *common),
        cwd=REPO_ROOT,
        env=run_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    # kill -9 once a checkpoint is written and the metrics of every step before it are on disk (the logger writes
    # them out at each checkpoint): the steps after it are the ones the resume redoes
    last, metrics = b_dir / "checkpoints" / "last.ckpt", b_dir / "csv" / "metrics.csv"
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline:
        if last.exists() and metrics.exists():
            saved = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
            try:
                if max(losses(metrics), default=-1) >= saved - 1:
                    break
            except ValueError:  # a row being appended, read half-written
                pass
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert last.exists(), proc.stderr.read()[-3000:]
    killed_at = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
    assert killed_at < n and killed_at % k == 0
    dead_curve = losses(metrics)

    # resumed into the same run dir and csv logger: metrics.csv keeps the history (Lightning's CSVLogger deleted it
    # and the resumed run's file began at the checkpoint's step)
    b = subprocess.run(
        decoder_cmd(builtin_shards, tiny_clip_ckpt, b_dir, *common, "ckpt_path=last"),
        cwd=REPO_ROOT,
        env=run_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert b.returncode == 0, b.stderr[-3000:]
    curve_a, curve_b = losses(a_dir / "csv" / "metrics.csv"), losses(metrics)
    assert sorted(curve_b) == list(range(n)) == sorted(curve_a)  # every step, each once
    with open(metrics) as f:
        steps = [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert steps == sorted(steps) and len(steps) == n
    for step in range(killed_at):  # the killed run's rows before its checkpoint: kept as they were
        assert curve_b[step] == dead_curve[step]
    for step, loss in curve_b.items():  # and the resumed run follows the uninterrupted one
        assert loss == pytest.approx(curve_a[step], rel=1e-5, abs=1e-6), f"step {step}: {loss} vs {curve_a[step]}"
    # the final states agree too: weights, EMA, optimizer moments
    fa = torch.load(a_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    fb = torch.load(b_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert fa["global_step"] == fb["global_step"] == n
    assert any(key.startswith("ema.") for key in fa["state_dict"])
    for key, va in fa["state_dict"].items():
        torch.testing.assert_close(fb["state_dict"][key], va, rtol=1e-5, atol=1e-6, msg=key)
    sa, sb = fa["optimizer_states"][0]["state"], fb["optimizer_states"][0]["state"]
    for i in sa:
        torch.testing.assert_close(sb[i]["exp_avg_sq"], sa[i]["exp_avg_sq"], rtol=1e-5, atol=1e-9)
