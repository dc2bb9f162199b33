"""Non-finite steps skipped and counted, then a clear stop; per-step seeds; atomic checkpoint writes;
SIGTERM mid-run saves a checkpoint, exits with the documented code, and the run resumes from it."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from dalle2.lit.fault_tolerance import AtomicCheckpointIO, NonFiniteGuard, NonFiniteLossError, StepSeed


class NaNOnSteps(L.LightningModule):
    """A linear regression whose loss is NaN on the given global steps; records weights after every step."""

    def __init__(self, nan_steps=()):
        super().__init__()
        self.net = nn.Linear(4, 1)
        self.nan_steps = set(nan_steps)
        self.weights: dict[int, torch.Tensor] = {}
        self.draws: list[float] = []

    def training_step(self, batch, batch_idx):
        self.draws.append(torch.rand(()).item())
        x = torch.randn(8, 4)
        loss = (self.net(x) - x.sum(1, keepdim=True)).pow(2).mean()
        if self.global_step in self.nan_steps:
            loss = loss * float("nan")
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.weights[self.global_step] = self.net.weight.detach().clone()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.1, weight_decay=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(64, 1), batch_size=1)


def _fit(module, tmp_path, steps, **guard):
    guard_cb = NonFiniteGuard(**guard)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[guard_cb],
    )
    trainer.fit(module)
    return trainer, guard_cb


def test_nonfinite_steps_skipped_weights_unchanged(tmp_path):
    m = NaNOnSteps(nan_steps={2, 3, 6})
    trainer, guard = _fit(m, tmp_path, 10, max_consecutive=3)
    assert trainer.global_step == 10 and guard.skipped == 3 and guard.consecutive == 0
    # global_step after a step (skipped or not) is s+1: weights after NaN step s equal weights after step s-1
    for s in (2, 3, 6):
        assert torch.equal(m.weights[s + 1], m.weights[s]), f"step {s} changed the weights"
    for s in (1, 4, 7):
        assert not torch.equal(m.weights[s + 1], m.weights[s])
    assert torch.isfinite(m.net.weight).all()
    assert trainer.callback_metrics["train/nonfinite_skipped"] == 3


def test_nonfinite_consecutive_stops_with_message(tmp_path):
    m = NaNOnSteps(nan_steps=set(range(4, 100)))
    with pytest.raises(NonFiniteLossError, match=r"3 consecutive non-finite .* at step 6 .*last finite step: step 3"):
        _fit(m, tmp_path, 20, max_consecutive=3)


def test_step_seed_depends_only_on_batch_index(tmp_path):
    def draws(steps, seed):
        m = NaNOnSteps()
        torch.manual_seed(123 + steps)  # the global state before fit must not matter
        L.Trainer(
            accelerator="cpu",
            max_steps=steps,
            logger=False,
            enable_progress_bar=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            callbacks=[StepSeed(seed=seed)],
        ).fit(m)
        return m.draws

    a, b = draws(5, 0), draws(3, 0)
    assert a[:3] == b and len(set(a)) == 5
    assert draws(3, 1) != b


def test_atomic_checkpoint_io_replaces_and_leaves_no_temp(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "sub" / "last.ckpt"
    io.save_checkpoint({"a": torch.ones(2)}, path)
    io.save_checkpoint({"a": torch.zeros(2)}, path)
    assert torch.equal(torch.load(path)["a"], torch.zeros(2))
    assert os.listdir(path.parent) == ["last.ckpt"]

    class Boom:
        def __reduce__(self):
            raise RuntimeError("killed mid-save")

    with pytest.raises(RuntimeError, match="mid-save"):
        io.save_checkpoint({"a": torch.ones(2), "b": Boom()}, path)
    assert torch.equal(torch.load(path)["a"], torch.zeros(2)) and os.listdir(path.parent) == ["last.ckpt"]


# ------------------------------------------------------------------------------------------------ preemption (train.py)


class StepMarker(L.Callback):
    """Touches ``<dir>/step_<global_step>`` after every training batch (for tests driving train.py)."""

    def __init__(self, dir: str):
        self.dir = dir

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        os.makedirs(self.dir, exist_ok=True)
        open(os.path.join(self.dir, f"step_{trainer.global_step}"), "w").close()


def test_sigterm_saves_exits_and_resumes(builtin_shards, tmp_path):
    import json
    import signal
    import subprocess
    import time

    from helpers.tiny_runs import REPO_ROOT, decoder_cmd, run_env, tiny_clip_ckpt

    clip = tiny_clip_ckpt(tmp_path / "clip.ckpt")
    run_dir, marks = tmp_path / "run", tmp_path / "marks"
    extra = [
        "+callbacks.marker._target_=test_fault_tolerance.StepMarker",
        f"+callbacks.marker.dir={marks}",
        "callbacks.model_checkpoint.every_n_train_steps=1000",
    ]
    proc = subprocess.Popen(
        decoder_cmd(builtin_shards, clip, run_dir, "trainer.max_steps=1000", *extra),
        cwd=REPO_ROOT,
        env=run_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 240
    while not (marks / "step_3").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err[-3000:]
    assert time.time() - t0 < 60
    last = run_dir / "checkpoints" / "last.ckpt"
    assert last.is_file() and "preempted at step" in out
    saved = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
    done = max(int(p.name.split("_")[1]) for p in marks.iterdir())
    assert saved == done >= 3  # the step that was running when the signal came was finished and saved
    assert not (run_dir / "final_metrics.json").exists()

    res = subprocess.run(
        decoder_cmd(builtin_shards, clip, run_dir, f"trainer.max_steps={saved + 2}", "ckpt_path=last", *extra),
        cwd=REPO_ROOT,
        env=run_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert final["step"] == saved + 2 and "ckpt_path=last" in final["overrides"]


# ------------------------------------------------------------------------------------------------ skipped steps leave state alone


from dalle2.lit.diffusion_base import DiffusionStageModule  # noqa: E402


class BNStage(DiffusionStageModule):
    """A diffusion-stage module (its EMA is updated in optimizer_step) whose network has BatchNorm; the batch is
    NaN on ``nan_steps``. Records EMA weights and BN running stats after every step."""

    def __init__(self, nan_steps=(), huge=False):
        super().__init__(ema_decay=0.5, ema_warmup=0, default_lr=0.01)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 1))
        self._init_ema()
        self.nan_steps, self.huge = set(nan_steps), huge
        self.after: dict[int, dict] = {}

    def training_step(self, batch, batch_idx):
        x = torch.randn(16, 4)
        if self.global_step in self.nan_steps:
            x = x * float("nan")
        loss = (self.net(x) - x.sum(1, keepdim=True)).pow(2).mean()
        return loss * 1e30 if self.huge else loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        bn = self.net[1]
        self.after[self.global_step] = {
            "ema": [p.detach().clone() for p in self.ema.module.parameters()],
            "mean": bn.running_mean.clone(),
            "var": bn.running_var.clone(),
            "n": int(bn.num_batches_tracked),
        }

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(64, 1), batch_size=1)


def test_skipped_step_leaves_ema_and_batchnorm_stats_where_they_were(tmp_path):
    m = BNStage(nan_steps={3})
    trainer, guard = _fit(m, tmp_path, 6, max_consecutive=3)
    assert guard.skipped == 1
    before, after = m.after[3], m.after[4]  # the state after step 2 and after the skipped step 3
    for a, b in zip(before["ema"], after["ema"]):
        assert torch.equal(a, b), "the EMA moved on a skipped step"
    assert torch.equal(before["mean"], after["mean"]) and torch.equal(before["var"], after["var"])
    assert before["n"] == after["n"]
    assert torch.isfinite(m.net[1].running_mean).all() and torch.isfinite(m.net[1].running_var).all()
    assert not torch.equal(m.after[5]["ema"][0], m.after[4]["ema"][0])  # and moves again after it


@pytest.mark.parametrize("nan", [True, False])
def test_guard_under_16_mixed_with_a_grad_scaler(tmp_path, nan):
    """Under a GradScaler, NaN losses still stop the run after max_consecutive; overflow steps of a finite loss
    (the scaler calibrating) are skipped without counting towards the stop."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100)
    m = BNStage(nan_steps=set(range(2, 100)) if nan else (), huge=not nan)
    guard_cb = NonFiniteGuard(max_consecutive=3)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=12,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[guard_cb],
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
    )
    if nan:
        with pytest.raises(NonFiniteLossError, match="3 consecutive"):
            trainer.fit(m)
        assert torch.isfinite(m.net[1].running_mean).all()
    else:
        trainer.fit(m)
        assert trainer.global_step == 12 and guard_cb.skipped >= 3 and guard_cb.consecutive == 0
        assert scaler.get_scale() < 2.0**100  # the scaler did calibrate down


def _scaler_count_worker(rank: int, port: int, out: str) -> None:
    """Rank 1's loss is NaN, rank 0's finite; the step is skipped on both (a global decision). Under a GradScaler
    only a NaN loss counts towards max_consecutive=1: both ranks must count it, or rank 1 alone would stop."""
    import os
    from types import SimpleNamespace

    import torch.distributed as dist

    from dalle2.lit.fault_tolerance import NonFiniteGuard, NonFiniteLossError

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        guard = NonFiniteGuard(max_consecutive=1, log=False)
        trainer = SimpleNamespace(
            world_size=2, precision_plugin=SimpleNamespace(scaler=object()), checkpoint_callback=None
        )
        guard._decided = (7, True)
        loss = torch.tensor(float("nan") if rank == 1 else 1.0)
        try:
            guard.on_train_batch_end(trainer, SimpleNamespace(device=torch.device("cpu")), {"loss": loss}, None, 0)
            outcome = "continued"
        except NonFiniteLossError:
            outcome = "stopped"
        Path(f"{out}.{rank}").write_text(outcome)
    finally:
        dist.destroy_process_group()


def test_under_a_grad_scaler_every_rank_counts_a_nan_loss_of_any_rank(tmp_path):
    import os

    import torch.multiprocessing as mp

    out = str(tmp_path / "outcome")
    mp.spawn(_scaler_count_worker, args=(29900 + os.getpid() % 500, out), nprocs=2, join=True)
    assert Path(f"{out}.0").read_text() == Path(f"{out}.1").read_text() == "stopped"


# ------------------------------------------------------------------------------------------------ a rank that fails

FAULT_SCRIPT = """
import sys, time
import lightning as L, torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

conf, fault, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
with initialize_config_dir(config_dir=conf, version_base="1.3"):
    cfg = compose("config", overrides=["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", *overrides])

class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        if self.global_step == 2:
            with open(f"fault_at.{self.global_rank}", "w") as f:  # when the fault happens (the tests time from here)
                f.write(repr(time.time()))
            if fault == "rank0_raises" and self.global_rank == 0:
                raise RuntimeError("boom")
            if self.global_rank == 1:  # stuck (a hung read, a deadlock): never reaches the step's all-reduce
                time.sleep(300)
        return self.lin(batch).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randn(64, 4), batch_size=4)

trainer = L.Trainer(accelerator="cpu", devices=2, strategy=instantiate(cfg.trainer.strategy), max_steps=8,
                    logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
trainer.fit(Tiny())
"""


def _fault_run(tmp_path, fault: str, *overrides: str, timeout: float = 240):
    """The script above as Lightning launches it (rank 0 starts rank 1): -> (returncode, stderr, seconds from the fault
    to the end of the job)."""
    import subprocess
    import sys
    import time

    from helpers.tiny_runs import REPO_ROOT, run_env

    script = tmp_path / "fault.py"
    script.write_text(FAULT_SCRIPT)
    cmd = [sys.executable, str(script), str(REPO_ROOT / "conf"), fault, *overrides]
    proc = subprocess.Popen(
        cmd,
        cwd=tmp_path,
        env=run_env(),
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        _, err = proc.communicate()
        return None, err, float("inf")
    return proc.returncode, err, time.time() - float((tmp_path / "fault_at.0").read_text())


def test_a_failing_rank_names_itself_and_ends_the_job(tmp_path):
    """trainer=ddp, 2 CPU processes started by Lightning: rank 0 raises at step 2 while rank 1 is stuck in that step.
    Rank 0 prints one line naming itself, the step and the error, and stops the rank it launched: the job exits 1
    within seconds (it used to exit only when rank 1 came back, here after 300 s; under NCCL, at the timeout)."""
    rc, err, seconds = _fault_run(tmp_path, "rank0_raises")
    assert rc == 1, err[-3000:]
    assert "[dalle2] rank 0 of 2 failed at step 2: RuntimeError: boom" in err
    assert "[dalle2] rank 0: stopping the 1 other rank(s) it launched" in err
    assert seconds < 30, f"the job took {seconds:.0f} s to end after the failure"


def test_a_rank_left_waiting_stops_at_the_configured_timeout(tmp_path):
    """trainer=ddp with ``trainer.strategy.timeout.seconds=10``, the 2 ranks started apart (as srun or torchrun start
    them): rank 1 is stuck at step 2, so rank 0 waits in the step's all-reduce. It stops after 10 s with a line saying
    it was left waiting (not 30 min, Lightning's default, which the config used to keep)."""
    import subprocess
    import sys
    import time

    from helpers.tiny_runs import REPO_ROOT, run_env

    script = tmp_path / "fault.py"
    script.write_text(FAULT_SCRIPT)
    port = str(29000 + os.getpid() % 800)
    procs = []
    try:
        for rank in (0, 1):
            env = run_env(
                LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port
            )
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        str(script),
                        str(REPO_ROOT / "conf"),
                        "rank1_stuck",
                        "trainer.strategy.timeout.seconds=10",
                    ],
                    cwd=tmp_path,
                    env=env,
                    stderr=subprocess.PIPE,
                    stdout=subprocess.DEVNULL,
                    text=True,
                )
            )
        try:
            _, err = procs[0].communicate(timeout=240)
        except subprocess.TimeoutExpired:
            pytest.fail("rank 0 still waited after 240 s")
        ended = time.time()
    finally:
        for p in procs:
            p.kill()
            p.communicate()
    assert procs[0].returncode == 1, err[-3000:]
    assert "[dalle2] rank 0 of 2 stopped at step 2: a collective failed" in err, err[-3000:]
    assert "trainer.strategy.timeout=0:00:10" in err
    seconds = ended - float((tmp_path / "fault_at.0").read_text())
    assert 10 <= seconds < 40, f"rank 0 stopped {seconds:.0f} s after the step began"
