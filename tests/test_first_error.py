"""The first error a newcomer meets names the fix, and a run that never started leaves no logger run behind.

``python train/train.py stage=decoder`` before ``make data`` used to end in a Lightning traceback ("missing shard
'./data_builtin/train/00000.tar'") after building the model, and left a wandb offline run for a run that never
trained."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helpers.scripts import compose_conf, load_script
from helpers.tiny_runs import REPO_ROOT


def _train_py(cwd, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PROJECT_ROOT"}
    env.update(PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", WANDB_MODE="offline", PYTHONWARNINGS="ignore")
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "train" / "train.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _found(root, name: str) -> list[str]:
    return [os.path.join(d, n) for d, dirs, files in os.walk(root) for n in dirs + files if n == name]


def test_missing_builtin_data_is_one_line_naming_make_data(tmp_path):
    proc = _train_py(tmp_path, "stage=decoder")
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    assert "missing shard" in last and "data_builtin/train/00000.tar" in last, proc.stderr[-3000:]
    assert "make data" in last and "data.train_urls" in last, last
    assert _found(tmp_path, "wandb") == [], "a wandb run was started for a run that never trained"


def test_missing_own_shard_names_the_key_not_make_data(tmp_path, capsys):
    """Checked before the model is built; for the user's own shards the fix is the key, not ``make data``."""
    train = load_script("train", "train")
    cfg = compose_conf("config", ["stage=clip", "data=webdataset", f"data.train_urls='{tmp_path}/mine/{{0..3}}.tar'"])
    with pytest.raises(SystemExit) as exc:
        train.check_shards(cfg)
    message = str(exc.value.code)
    assert message.count("\n") == 0 and "data.train_urls" in message and f"{tmp_path}/mine/0.tar" in message, message
    assert "make data" not in message, message
    cfg = compose_conf("config", ["stage=clip", "data=webdataset", "data.train_urls='foo://bucket/{0..3}.tar'"])
    with pytest.raises(SystemExit, match="data.train_urls.*foo://"):
        train.check_shards(cfg)


def test_loggers_start_only_when_training_starts(tmp_path, builtin_shards, monkeypatch):
    """A failure after the data check but before training (here: the datamodule's setup) leaves no wandb or csv run."""
    from dalle2.data.datamodule import WebDataModule

    train = load_script("train", "train")
    out = tmp_path / "run"
    cfg = compose_conf(
        "config",
        [
            "stage=clip",
            "logger=wandb",
            f"paths.output_dir={out}",
            f"data.train_urls='{builtin_shards['train']}'",
            f"data.val_urls='{builtin_shards['val']}'",
            "trainer.accelerator=cpu",
            "trainer.devices=1",
            "trainer.max_steps=1",
        ],
    )
    assert set(cfg.logger) >= {"wandb", "csv"}

    def broken_setup(self, stage=None):
        raise RuntimeError("setup failed before training")

    monkeypatch.setattr(WebDataModule, "setup", broken_setup)
    out.mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RuntimeError, match="setup failed before training"):
        train.train(cfg)
    assert _found(out, "wandb") == [] and _found(out, "csv") == [], sorted(os.listdir(out))
