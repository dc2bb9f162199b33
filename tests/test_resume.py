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


# ------------------------------------------------------------------------------------------------ train.py end to end

import csv  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import lightning as L  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_clip_ckpt(tmp_path_factory):
    """An (untrained) tiny CLIP checkpoint with embed_dim 32 for the decoder's on-the-fly embeddings."""
    from dalle2.clip.model import clip_preset
    from dalle2.lit.checkpoints import STAGE_KEY
    from dalle2.lit.clip_module import CLIPModule

    net = clip_preset("tiny", vision_width=32, vision_layers=1, vision_heads=2, vision_patch_size=8, text_width=32,
                      text_layers=1, text_heads=2, embed_dim=32)  # fmt: skip
    clip = CLIPModule(network=net)
    path = tmp_path_factory.mktemp("clip") / "clip.ckpt"
    torch.save({"state_dict": clip.state_dict(), "hyper_parameters": dict(clip.hparams), STAGE_KEY: "clip",
                "pytorch-lightning_version": L.__version__}, path)  # fmt: skip
    return str(path)


def decoder_cmd(shards, clip_ckpt, run_dir, *extra):
    """A tiny decoder run on the built-in shards: 2 workers, 6 batches per epoch, per-step csv loss."""
    return [
        sys.executable, "train/train.py", "experiment=decoder_tiny", f"clip_ckpt={clip_ckpt}",
        f"data.train_urls='{shards['train']}'", "data.val_urls=null", "data.batch_size=8", "data.num_workers=2",
        "data.epoch_size=40", "data.shuffle_buffer=50", "data.random_crop=true",
        "model.clip_dim=32", "model.model_channels=16", "model.head_channels=16", "model.cond_dim=32",
        "module.ema_decay=0.9", "module.sample_every_n_steps=100000", "~callbacks.sample_grid",
        "trainer.limit_val_batches=0", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
        "optimizer.lr=3e-3", "scheduler.warmup_steps=2", "logger=csv", f"hydra.run.dir={run_dir}", *extra,
    ]  # fmt: skip


def run_env():
    return dict(os.environ, PYTHONPATH=f"{REPO_ROOT}{os.pathsep}{REPO_ROOT / 'tests'}", OMP_NUM_THREADS="1",
                WANDB_MODE="offline")  # fmt: skip


def losses(metrics_csv):
    out = {}
    with open(metrics_csv) as f:
        for row in csv.DictReader(f):
            if row.get("train/loss"):
                out[int(row["step"])] = float(row["train/loss"])
    return out


@pytest.mark.slow
def test_sigkill_and_resume_matches_uninterrupted(builtin_shards, tiny_clip_ckpt, tmp_path):
    n, k = 12, 4
    common = [f"trainer.max_steps={n}", f"callbacks.model_checkpoint.every_n_train_steps={k}"]
    a_dir, b_dir = tmp_path / "A", tmp_path / "B"
    a = subprocess.run(decoder_cmd(builtin_shards, tiny_clip_ckpt, a_dir, *common), cwd=REPO_ROOT, env=run_env(),
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert a.returncode == 0, a.stderr[-3000:]

    proc = subprocess.Popen(decoder_cmd(builtin_shards, tiny_clip_ckpt, b_dir, *common), cwd=REPO_ROOT, env=run_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    last = b_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert last.exists(), proc.stderr.read()[-3000:]
    killed_at = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
    assert killed_at < n and killed_at % k == 0

    b = subprocess.run(decoder_cmd(builtin_shards, tiny_clip_ckpt, b_dir, *common, "ckpt_path=last",
                                   "logger.csv.name=csv_resumed"),
                       cwd=REPO_ROOT, env=run_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert b.returncode == 0, b.stderr[-3000:]
    curve_a, curve_b = losses(a_dir / "csv" / "metrics.csv"), losses(b_dir / "csv_resumed" / "metrics.csv")
    assert min(curve_b) == killed_at and max(curve_b) == max(curve_a) == n - 1  # resumed from the checkpoint
    for step, loss in curve_b.items():
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
