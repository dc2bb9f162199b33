"""A user's work is never lost: the final step is always in last.ckpt, old periodic checkpoints are pruned only
when the run wrote them, a disk that fails mid-save leaves the previous checkpoint intact and stops the run with a
message, resume takes the newest checkpoint, and a new run never writes into a used run dir."""

from __future__ import annotations

import errno
import os

import lightning as L
import pytest
import torch
from torch import nn

from dalle2.lit import fault_tolerance
from dalle2.lit.checkpoints import RunDirInUseError, resolve_ckpt_path, run_checkpoints
from dalle2.lit.fault_tolerance import AtomicCheckpointIO, CheckpointSaveError, RunCheckpoint


class Regression(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x = torch.randn(8, 4)
        return (self.net(x) - x.sum(1, keepdim=True)).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(1000, 1), batch_size=1)


def fit(tmp_path, max_steps, *, every=2, keep_last=-1, ckpt_path=None):
    cb = RunCheckpoint(
        dirpath=tmp_path / "checkpoints",
        filename="step_{step:07d}",
        auto_insert_metric_name=False,
        save_last=True,
        keep_last=keep_last,
        every_n_train_steps=every,
        save_on_train_epoch_end=False,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[cb],
        plugins=[AtomicCheckpointIO()],
    )
    trainer.fit(Regression(), ckpt_path=ckpt_path)
    return trainer


def step_of(path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


def test_final_step_is_in_last_ckpt(tmp_path):
    # Lightning alone leaves last.ckpt at step 4 when max_steps=5 and every_n_train_steps=2
    fit(tmp_path, 5)
    assert step_of(tmp_path / "checkpoints" / "last.ckpt") == 5


def test_keep_last_prunes_only_old_periodic_checkpoints(tmp_path):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    (ckpts / "mine.ckpt").write_bytes(b"not written by the run")  # a user's file in the same folder
    fit(tmp_path, 12, keep_last=2)
    names = sorted(p.name for p in ckpts.iterdir())
    assert names == ["last.ckpt", "mine.ckpt", "step_0000010.ckpt", "step_0000012.ckpt"]
    # a resumed run keeps pruning the files the first part wrote
    fit(tmp_path, 16, keep_last=2, ckpt_path=str(ckpts / "last.ckpt"))
    assert sorted(p.name for p in ckpts.iterdir()) == [
        "last.ckpt",
        "mine.ckpt",
        "step_0000014.ckpt",
        "step_0000016.ckpt",
    ]


def test_disk_full_mid_save_keeps_previous_checkpoint_and_stops(tmp_path, monkeypatch):
    real_save = torch.save
    calls = {"n": 0}

    def failing_save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= 3:  # step 2 saves step_0000002 and last; the save at step 4 fails half-way through
            f.write(b"\0" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(fault_tolerance.torch, "save", failing_save)
    with pytest.raises(
        CheckpointSaveError, match=r"No space left on device.*no existing checkpoint was changed"
    ) as info:
        fit(tmp_path, 10)
    assert "ckpt_path=last" in str(info.value)
    monkeypatch.setattr(fault_tolerance.torch, "save", real_save)
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", "step_0000002.ckpt"]  # no temp file left
    assert step_of(ckpts / "last.ckpt") == 2  # intact and loadable


def test_resume_takes_the_newest_checkpoint_by_step(tmp_path):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    for name, step in [("last.ckpt", 4), ("step_0000006.ckpt", 6), ("step_0000002.ckpt", 2)]:
        torch.save({"global_step": step}, ckpts / name)
    torch.save({"global_step": 8}, tmp_path / "hpc_ckpt_1.ckpt")  # Lightning's SLURM requeue save
    (ckpts / "broken.ckpt").write_bytes(b"truncated")
    assert [s for s, _ in run_checkpoints(tmp_path)] == [8, 6, 4, 2]
    assert resolve_ckpt_path("last", tmp_path) == str(tmp_path / "hpc_ckpt_1.ckpt")
    assert resolve_ckpt_path(str(tmp_path), tmp_path / "elsewhere") == str(tmp_path / "hpc_ckpt_1.ckpt")
    assert resolve_ckpt_path(str(ckpts), tmp_path / "elsewhere") == str(tmp_path / "hpc_ckpt_1.ckpt")
    os.remove(tmp_path / "hpc_ckpt_1.ckpt")
    assert resolve_ckpt_path("last", tmp_path) == str(ckpts / "step_0000006.ckpt")


def test_new_run_in_a_used_run_dir_is_refused(tmp_path):
    assert resolve_ckpt_path(None, tmp_path) is None  # fresh dir: from scratch
    fit(tmp_path, 2)
    with pytest.raises(RunDirInUseError, match=r"already holds checkpoints.*step 2.*ckpt_path=last"):
        resolve_ckpt_path(None, tmp_path)
    assert resolve_ckpt_path("last", tmp_path).endswith("last.ckpt")


def test_atomic_checkpoint_writes_stay_when_the_user_gives_trainer_plugins():
    from omegaconf import OmegaConf

    from helpers.scripts import load_script

    build_plugins = load_script("train", "train").build_plugins
    mine = {"_target_": "lightning.pytorch.plugins.precision.DoublePrecision"}
    plugins = build_plugins(OmegaConf.create({"trainer": {"plugins": [mine]}}))
    assert [type(p).__name__ for p in plugins] == ["DoublePrecision", "AtomicCheckpointIO"]
    own_io = {"_target_": "lightning.pytorch.plugins.io.TorchCheckpointIO"}
    assert [type(p).__name__ for p in build_plugins(OmegaConf.create({"trainer": {"plugins": [own_io]}}))] == [
        "TorchCheckpointIO"
    ]  # a checkpoint IO of the user's own is respected
    assert [type(p).__name__ for p in build_plugins(OmegaConf.create({"trainer": {}}))] == ["AtomicCheckpointIO"]


def test_a_run_dir_moved_or_copied_resumes_into_its_own_last_ckpt(tmp_path):
    # A run copied to another disk (or renamed) and resumed there: Lightning restored the old dir's checkpoint
    # bookkeeping and wrote last-v1.ckpt beside the copied last.ckpt, so every reader of checkpoints/last.ckpt
    # (train_all's later stages, export, the pipeline) went on reading the stale step.
    import shutil

    fit(tmp_path / "a", 4)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "a")
    fit(tmp_path / "b", 8, ckpt_path=resolve_ckpt_path("last", tmp_path / "b"))
    ckpts = tmp_path / "b" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == [
        "last.ckpt",
        "step_0000002.ckpt",
        "step_0000004.ckpt",
        "step_0000006.ckpt",
        "step_0000008.ckpt",
    ]
    assert step_of(ckpts / "last.ckpt") == 8


def test_a_save_killed_mid_write_leaves_no_temp_file_after_the_next_start(tmp_path):
    """SIGKILL during a save left a full-size ``.last.ckpt.tmp-<pid>`` beside last.ckpt forever. The next start
    removes temp files of that pattern whose writer is dead and that were last written before it started — and
    nothing else."""
    import signal
    import subprocess
    import sys
    import time

    from dalle2.io import temp_path
    from dalle2.lit.checkpoints import remove_stale_temp_files

    fit(tmp_path, 2)
    ckpts = tmp_path / "checkpoints"
    # a save killed half-way: a real atomic write, SIGKILLed while its temp file is open
    writer = (
        "import sys, time\n"
        "from dalle2.io import atomic_write\n"
        "cm = atomic_write(sys.argv[1]); f = cm.__enter__()\n"
        "f.write(b'\\0' * 100000); f.flush()\n"
        "print('writing', flush=True); time.sleep(60)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", writer, str(ckpts / "last.ckpt")],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    left = ckpts / f".last.ckpt.tmp-{proc.pid}"
    assert (
        left.is_file()
        and left.stat().st_size == 100000
        and os.path.basename(temp_path(left.parent / "x")) == (f".x.tmp-{os.getpid()}")
    )  # the name dalle2.io gives its temp files
    an_hour_ago = time.time() - 3600
    os.utime(left, (an_hour_ago, an_hour_ago))  # the kill happened before this run started
    # what must stay: a temp file of a live process, one written just now (a writer elsewhere on a shared disk),
    # and files that merely look alike
    live = ckpts / f".step_0000002.ckpt.tmp-{os.getpid()}"
    recent = tmp_path / f".metrics.csv.tmp-{proc.pid}"
    lookalikes = [ckpts / ".last.ckpt.tmp-mine", ckpts / "last.ckpt.tmp-99999999", tmp_path / "notes.tmp-1"]
    for p in [live, recent, *lookalikes]:
        p.write_bytes(b"keep")
    for p in [live, *lookalikes]:
        os.utime(p, (an_hour_ago, an_hour_ago))

    assert remove_stale_temp_files(tmp_path) == [left]
    assert not left.exists() and all(p.exists() for p in [live, recent, *lookalikes])
    assert step_of(ckpts / "last.ckpt") == 2  # the previous checkpoint is intact
    # resolving where to resume is the start of a run: it tidies the same way
    left.write_bytes(b"\0" * 10)
    os.utime(left, (an_hour_ago, an_hour_ago))
    assert resolve_ckpt_path("last", tmp_path).endswith("last.ckpt") and not left.exists()
