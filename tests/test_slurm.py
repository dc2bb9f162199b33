"""Multi-node launch: under SLURM's environment of rank 1 of a 2-node x 1-process job, Lightning's rank and world
size and our data split (webdataset shards and embedding folders) are rank 1's of 2; the SLURM launcher's plugin
(hydra-submitit-launcher) runs a real 2-step job through submitit's local executor; torchrun's environment works
for a 2-process CPU run."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

from helpers.laion_npy import prior_npy_cmd, write_embedding_folder
from helpers.tiny_runs import REPO_ROOT, run

# what srun sets for task 1 of `sbatch --nodes=2 --ntasks-per-node=1` (the rank-relevant part)
SLURM_RANK1_OF_2_NODES = {
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NAME": "train",
    "SLURM_NNODES": "2",
    "SLURM_JOB_NUM_NODES": "2",
    "SLURM_JOB_NODELIST": "gpu[007-008]",
    "SLURM_NODELIST": "gpu[007-008]",
    "SLURM_NTASKS": "2",
    "SLURM_NTASKS_PER_NODE": "1",
    "SLURM_TASKS_PER_NODE": "1(x2)",
    "SLURM_PROCID": "1",
    "SLURM_NODEID": "1",
    "SLURM_LOCALID": "0",
    "SLURM_CPUS_PER_TASK": "1",
    "SLURMD_NODENAME": "gpu008",
}


@pytest.fixture
def slurm_rank1(monkeypatch):
    for name in list(os.environ):
        if name.startswith(("SLURM_", "SLURMD_")) or name in (
            "RANK",
            "WORLD_SIZE",
            "LOCAL_RANK",
            "NODE_RANK",
            "GROUP_RANK",
            "MASTER_ADDR",
            "MASTER_PORT",
        ):
            monkeypatch.delenv(name)
    for name, value in SLURM_RANK1_OF_2_NODES.items():
        monkeypatch.setenv(name, value)


def _trainer_from_conf(tmp_path):
    """The trainer of ``trainer=ddp trainer.accelerator=cpu trainer.devices=1 trainer.num_nodes=2`` (as on 2 nodes
    with 1 GPU each), built without initialising the process group."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                "experiment=prior_tiny",
                "trainer=ddp",
                "trainer.accelerator=cpu",
                "trainer.devices=1",
                "trainer.num_nodes=2",
                f"trainer.default_root_dir={tmp_path}",
            ],
        )
    GlobalHydra.instance().clear()
    return instantiate(cfg.trainer, logger=False, callbacks=[], enable_checkpointing=False)


def _keys(loader) -> list[str]:
    return [k for batch in loader for k in batch["key"]]


def test_slurm_rank1_of_two_nodes_gets_rank1_and_its_data(slurm_rank1, builtin_shards, tmp_path):
    from lightning.fabric.plugins.environments import SLURMEnvironment

    from dalle2.clip.tokenizer import get_tokenizer
    from dalle2.data.datamodule import WebDataModule
    from dalle2.data.embedding_npy import EmbeddingNpyDataModule
    from dalle2.data.webdataset import make_dataset

    trainer = _trainer_from_conf(tmp_path)
    env = trainer._accelerator_connector.cluster_environment
    assert isinstance(env, SLURMEnvironment) and env.main_address == "gpu007"
    assert (trainer.global_rank, trainer.world_size, trainer.node_rank, trainer.local_rank) == (1, 2, 1, 0)
    assert not trainer.is_global_zero
    assert not torch.distributed.is_initialized()  # nothing below may lean on a process group

    # webdataset shards: the datamodule of this trainer reads rank 1's half, as make_dataset(rank=1, world_size=2)
    tok = get_tokenizer(None)
    urls = builtin_shards["train"]  # 4 shards of 64
    dm = WebDataModule(
        train_urls=urls,
        val_urls=urls,
        image_size=32,
        batch_size=8,
        num_workers=0,
        tokenizer=tok,
        epoch_size=None,
        shuffle_buffer=10,
    )
    dm.trainer = trainer
    dm.setup("fit")
    val = _keys(dm.val_dataloader())
    by_rank = [
        _keys(make_dataset(urls, image_size=32, tokenizer=tok, train=False, batch_size=8, rank=r, world_size=2))
        for r in (0, 1)
    ]
    assert val == by_rank[1] and not set(val) & set(by_rank[0])
    assert len(val) + len(by_rank[0]) == 256
    train = dm.train_dataloader()
    rank1 = make_dataset(
        urls, image_size=32, tokenizer=tok, train=True, batch_size=8, rank=1, world_size=2, shuffle_buffer=10
    )
    assert train.dataset.batches_per_epoch == rank1.batches_per_epoch == 256 // 2 // 8  # per-rank epoch: N / world
    assert next(iter(train))["key"] == next(iter(rank1))["key"]

    # embedding folders: rank 1 validates on the second half of the rows and trains on its own chunks
    data = write_embedding_folder(tmp_path / "emb", rows=(37, 50, 29), dim=8)
    n = len(data["key"])
    edm = EmbeddingNpyDataModule(
        train_dir=str(tmp_path / "emb"),
        val_dir=str(tmp_path / "emb"),
        batch_size=4,
        num_workers=0,
        chunk_size=8,
        tokenizer=tok,
    )
    edm.trainer = trainer
    edm.setup("fit")
    assert _keys(edm.val_dataloader()) == data["key"][n // 2 :]
    stream = edm.train_dataloader().dataset
    assert (stream.rank, stream.world_size) == (1, 2)


# ------------------------------------------------------------------------------------------------ launched for real

TWO_STEPS = ("trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=2")


@pytest.fixture(scope="module")
def emb_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("laion")
    write_embedding_folder(root, rows=(37, 50, 29))
    return str(root)


@pytest.mark.slow
def test_submitit_launcher_runs_a_two_step_job(emb_folder, tmp_path):
    """hydra-submitit-launcher (the SLURM launcher's plugin) through submitit's local executor: the job is pickled,
    run as a submitit job in its own process, and finishes with a checkpoint, final_metrics.json and submitit logs."""
    sweep = tmp_path / "sweep"
    cmd = prior_npy_cmd(
        tmp_path / "unused",
        emb_folder,
        emb_folder,
        extra=(*TWO_STEPS, "hydra/launcher=local_submitit", f"hydra.sweep.dir={sweep}"),
    )
    cmd.insert(2, "-m")  # a multirun: the launcher only runs then (Hydra's flags go before the overrides)
    proc = run(cmd, timeout=420)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Submitit 'local' sweep output dir" in proc.stdout + proc.stderr
    job = sweep / "0"
    result = json.loads((job / "final_metrics.json").read_text())
    assert result["step"] == 2 and Path(result["last_ckpt"]) == job / "checkpoints" / "last.ckpt"
    assert (job / "checkpoints" / "last.ckpt").is_file()
    logs = sorted((sweep / ".submitit").glob("*/*_0_log.out"))
    assert len(logs) == 1, sorted(p.name for p in (sweep / ".submitit").rglob("*"))
    assert "Job completed successfully" in logs[0].read_text()
    assert list(logs[0].parent.glob("*_submitted.pkl")) and list(logs[0].parent.glob("*_0_result.pkl"))


@pytest.mark.slow
def test_torchrun_two_cpu_processes(emb_folder, tmp_path):
    """`torchrun --nproc-per-node 2 train/train.py trainer=ddp trainer.accelerator=cpu trainer.devices=2`: Lightning
    takes torchrun's environment (no second launch of its own), both ranks train, and the checkpoint holds the
    data stream position of each of the 2 ranks."""
    run_dir = tmp_path / "run"
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    cmd = prior_npy_cmd(
        run_dir,
        emb_folder,
        emb_folder,
        extra=(*TWO_STEPS, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"),
    )
    port = str(29500 + os.getpid() % 1000)
    proc = run([torchrun, "--nproc-per-node", "2", "--master-port", port, *cmd[1:]], timeout=420)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in out and "GLOBAL_RANK: 1, MEMBER: 2/2" in out
    result = json.loads((run_dir / "final_metrics.json").read_text())
    assert result["step"] == 2
    state = torch.load(result["last_ckpt"], map_location="cpu", weights_only=True)["EmbeddingNpyDataModule"]
    assert sorted(state["stream"]) == [0, 1] and all(p["batches"] == [2] for p in state["stream"].values())


# ------------------------------------------------------------------------------------------------ the sbatch recipe

SBATCH = REPO_ROOT / "scripts" / "slurm" / "train.sbatch"


def _sbatch(tmp_path, srun_rc: int, **env: str) -> tuple[int, list[str], str | None]:
    """Run scripts/slurm/train.sbatch with stand-ins for srun (records its arguments, exits ``srun_rc``) and scontrol
    (records its arguments): -> (exit code, srun's arguments, scontrol's arguments or None)."""
    import subprocess

    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    (fake / "srun").write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > "{tmp_path}/srun_args"\nexit {srun_rc}\n')
    (fake / "scontrol").write_text(f'#!/bin/bash\necho "$@" > "{tmp_path}/scontrol_args"\n')
    for f in ("srun", "scontrol"):
        (fake / f).chmod(0o755)
    (tmp_path / "scontrol_args").unlink(missing_ok=True)
    run_env = dict(
        os.environ,
        PATH=f"{fake}:{os.environ['PATH']}",
        SLURM_JOB_ID="77",
        SLURM_JOB_NAME="dalle2",
        SLURM_NNODES="2",
        SLURM_NTASKS_PER_NODE="8",
        SLURM_SUBMIT_DIR=str(REPO_ROOT),
        **env,
    )
    proc = subprocess.run(
        ["bash", str(SBATCH), "experiment=prior_tiny", "trainer.max_steps=7"],
        env=run_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    srun_args = (tmp_path / "srun_args").read_text().splitlines()
    sc = tmp_path / "scontrol_args"
    return proc.returncode, srun_args, sc.read_text().strip() if sc.exists() else None


def test_sbatch_script_requeues_only_after_a_checkpointed_stop(tmp_path):
    rc, _, requeue = _sbatch(tmp_path, 143)
    assert rc == 143 and requeue == "requeue 77"  # stopped by the signal with a checkpoint: back to the queue
    for srun_rc in (0, 1):  # finished, or failed: never requeued
        rc, _, requeue = _sbatch(tmp_path, srun_rc)
        assert rc == srun_rc and requeue is None
    rc, _, requeue = _sbatch(tmp_path, 143, SLURM_RESTART_COUNT="3", MAX_REQUEUES="3")
    assert rc == 143 and requeue is None  # requeue budget spent


def test_sbatch_script_overrides_compose_into_a_multi_node_run(tmp_path):
    from dalle2.lit.fault_tolerance import Preemption

    _, args, _ = _sbatch(tmp_path, 0)
    script = args.index("train/train.py")
    assert args[:2] == ["--kill-on-bad-exit=1", "python"] and script == 2
    overrides = args[script + 1 :]
    run_dir = next(a.split("=", 1)[1] for a in overrides if a.startswith("hydra.run.dir="))
    assert run_dir == "runs/slurm/dalle2_77"  # one dir per job id: every task and every requeue resume there
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[a for a in overrides if not a.startswith("hydra.")])
    GlobalHydra.instance().clear()
    assert (cfg.trainer.num_nodes, cfg.trainer.devices, cfg.trainer.accelerator) == (2, 8, "gpu")
    assert cfg.trainer.strategy.broadcast_buffers is False and cfg.ckpt_path == "last"
    assert cfg.trainer.max_steps == 7  # the user's overrides win
    pre = instantiate(cfg.callbacks.preemption)
    assert isinstance(pre, Preemption) and "SIGUSR2" in pre.signals and "SIGTERM" in pre.signals


def test_slurm_launcher_composes_into_a_job_that_ends_when_a_rank_fails():
    """``hydra/launcher=slurm`` composes (the submitit plugin's SLURM launcher with our fields), and its sbatch setup
    makes srun end every task when one exits non-zero (a failed rank ends the job; none waits for the timeout)."""
    from datetime import timedelta

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "trainer=ddp", "trainer.devices=8"],
            return_hydra_config=True,
        )
    GlobalHydra.instance().clear()
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.partition, launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == ("gpu", 1, 8, 8)
    assert launcher.tasks_per_node == cfg.trainer.devices  # one task per GPU, as Lightning expects under SLURM
    assert "export SLURM_KILL_BAD_EXIT=1" in launcher.setup
    strategy = instantiate(cfg.trainer.strategy)
    assert strategy._timeout == timedelta(minutes=10) and type(strategy).__name__ == "DDPStrategy"
