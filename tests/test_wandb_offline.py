"""The default logger (wandb, offline) exercised end to end: a tiny decoder run through train/train.py writes an
offline wandb run holding the metrics, the resolved config, the git sha, the experiment's tags and the sample-grid
images — read back from the run's ``run-*.wandb`` log (config, summary, history; tests/helpers/wandb_offline.py)
and its ``files/media/images/``."""

from __future__ import annotations

import subprocess

import pytest
from PIL import Image

from helpers.tiny_runs import REPO_ROOT, run, run_env, stage_cmd, tiny_clip_ckpt
from helpers.wandb_offline import offline_run

STEPS = 4


@pytest.fixture(scope="module")
def wandb_run(builtin_shards, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wandb_run")
    run_dir = tmp / "run"
    cmd = stage_cmd(
        "decoder",
        run_dir,
        train_urls=builtin_shards["train"],
        val_urls=builtin_shards["val"],
        clip_ckpt=tiny_clip_ckpt(tmp / "clip.ckpt"),
        extra=(
            "logger=wandb",
            f"trainer.max_steps={STEPS}",
            "trainer.val_check_interval=2",
            "trainer.limit_val_batches=1",
            "module.sample_every_n_steps=2",
            "callbacks.sample_grid.steps=2",
            "callbacks.sample_grid.num_samples=2",
        ),
    )
    cmd.remove("~callbacks.sample_grid")
    cmd.remove("logger=csv")
    proc = run(cmd, timeout=300, env=run_env(WANDB_DIR=str(tmp / "wandb_dir"), WANDB_SILENT="true"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(run_dir.glob("wandb/offline-run-*"))
    assert len(runs) == 1, f"expected one offline wandb run under {run_dir}/wandb, found {runs}"
    return runs[0]


def test_offline_run_holds_resolved_config_and_git_sha(wandb_run):
    config = offline_run(wandb_run)["config"]
    assert config["trainer"]["max_steps"] == STEPS
    assert config["stage_name"] == "decoder"
    assert config["module"]["image_size"] == 32  # ${data.image_size}: interpolations resolved
    assert "${" not in str(config)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
    assert head and config["git_sha"] == head
    assert config["tags"] == ["tiny", "builtin"]  # the experiment's tags (conf/experiment/decoder_tiny.yaml)


def test_offline_run_holds_metrics(wandb_run):
    logged = offline_run(wandb_run)
    steps = [h["trainer/global_step"] for h in logged["history"] if "train/loss" in h]
    assert steps == list(range(STEPS))  # log_every_n_steps=1: one train/loss per step
    assert isinstance(logged["summary"]["train/loss"], float) and logged["summary"]["train/loss"] > 0
    assert {"val/loss", "sanity/autocorr", "lr-AdamW/pg1"} <= set(logged["summary"])


def test_offline_run_holds_sample_grids(wandb_run):
    logged = offline_run(wandb_run)
    grids = [h for h in logged["history"] if h.get("samples/_type") == "images/separated"]
    assert [h["trainer/global_step"] for h in grids] == [2, 4]  # a grid every 2 steps
    for h in grids:
        [name] = h["samples/filenames"]
        with Image.open(wandb_run / "files" / name) as im:
            im.load()
            assert im.size == (h["samples/width"], h["samples/height"]) and min(im.size) > 32
        assert "a " in h["samples/captions"][0]  # the columns' captions travel with the grid


def test_offline_run_is_named_and_grouped(wandb_run):
    run = offline_run(wandb_run)["run"]
    assert run.project == "dalle2" and run.run_group == "decoder"  # a single run is grouped by its stage
    assert run.tags == ["tiny", "builtin"]
