"""Sharded training (``trainer=fsdp``: FSDP2 on Lightning's ModelParallelStrategy) against DDP, 2 CPU processes (gloo)
through train/train.py: the same losses, gradients and weights on the same global batches; about half the bytes per
process; sharded save -> resume -> the same next losses as an uninterrupted run; the consolidated export samples the
images of the unsharded model with the same weights; sharded checkpoint directories are found, read safely and
refused when their index would run code."""

from __future__ import annotations

import csv
import pickle
from pathlib import Path

import pytest
import torch

from helpers.tiny_runs import run, stage_cmd, tiny_clip_ckpt

FSDP = ("trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2")
DDP = ("trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2")
STEPS = 3
# the decoder runs accumulate 2 micro-batches a step: accumulation under FSDP is checked against DDP's too
STAGE_EXTRA = {"prior": (), "decoder": ("+trainer.accumulate_grad_batches=2",)}


@pytest.fixture(scope="module")
def clip_ckpt(tmp_path_factory):
    return tiny_clip_ckpt(tmp_path_factory.mktemp("clip") / "clip.ckpt")


def train(stage: str, strategy: tuple, run_dir: Path, shards: dict, clip: str, *extra: str) -> dict:
    """A tiny 2-process run with :class:`helpers.fsdp.FullStateProbe`; -> {"dir", "losses": {step: loss}, "probe"}."""
    probe = run_dir.with_name(run_dir.name + ".probe.pt")
    cmd = stage_cmd(stage, run_dir, train_urls=shards["train"], clip_ckpt=clip,
                    extra=(*strategy, f"trainer.max_steps={STEPS}", "callbacks.model_checkpoint.every_n_train_steps=2",
                           "+callbacks.probe._target_=helpers.fsdp.FullStateProbe", f"+callbacks.probe.path={probe}",
                           *extra))  # fmt: skip
    proc = run(cmd, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"dir": run_dir, "losses": losses(run_dir / "csv" / "metrics.csv"), "probe": torch.load(probe)}


def losses(metrics_csv: Path) -> dict[int, float]:
    with open(metrics_csv) as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


@pytest.fixture(scope="module", params=["prior", "decoder"])
def runs(request, builtin_shards, clip_ckpt, tmp_path_factory):
    stage, root = request.param, tmp_path_factory.mktemp(request.param)
    extra = STAGE_EXTRA[stage]
    return stage, {name: train(stage, strategy, root / name, builtin_shards, clip_ckpt, *extra)
                   for name, strategy in (("ddp", DDP), ("fsdp", FSDP))}  # fmt: skip


def assert_tensors_close(got: dict, want: dict, what: str, **tol) -> None:
    assert got.keys() == want.keys(), f"{what}: {sorted(got.keys() ^ want.keys())[:5]}"
    for k in want:
        torch.testing.assert_close(got[k], want[k], msg=lambda m, k=k: f"{what} {k}: {m}", **tol)


@pytest.mark.slow
def test_fsdp_losses_gradients_and_weights_equal_ddps(runs):
    stage, r = runs
    ddp, fsdp = r["ddp"], r["fsdp"]
    assert sorted(fsdp["losses"]) == sorted(ddp["losses"]) == list(range(STEPS))
    for step, loss in ddp["losses"].items():
        assert fsdp["losses"][step] == pytest.approx(loss, rel=1e-5, abs=1e-7), f"{stage} step {step}"
    grads_ddp, grads_fsdp = ddp["probe"]["grads"], fsdp["probe"]["grads"]
    assert len(grads_ddp) == len(grads_fsdp) == STEPS
    for step, (g_fsdp, g_ddp) in enumerate(zip(grads_fsdp, grads_ddp)):
        assert_tensors_close(g_fsdp, g_ddp, f"{stage} grad at step {step}", rtol=1e-4, atol=1e-6)
    # the weights and the EMA after the optimizer steps (EMA updated from the sharded parameters, shard by shard)
    state = fsdp["probe"]["state"]
    assert any(k.startswith("ema.module.") for k in state)
    assert_tensors_close(state, ddp["probe"]["state"], f"{stage} final state", rtol=1e-4, atol=1e-6)
    assert (fsdp["dir"] / "checkpoints" / "last.ckpt" / "meta.pt").is_file()  # a sharded checkpoint


@pytest.mark.slow
def test_fsdp_holds_about_half_the_bytes_per_process(runs):
    stage, r = runs
    ddp, fsdp = r["ddp"]["probe"]["bytes"], r["fsdp"]["probe"]["bytes"]
    for kind in ("params", "optimizer", "ema"):
        full = ddp[0][kind]
        assert all(b[kind] == full for b in ddp), f"DDP replicates {kind}"
        per_rank = [b[kind] for b in fsdp]
        # FSDP2 pads each tensor's dim 0 to a multiple of the world size: a little over half
        assert max(per_rank) <= 0.55 * full and sum(per_rank) >= full, f"{stage} {kind}: {per_rank} vs DDP {full}"
    total = lambda b: b["params"] + b["optimizer"] + b["ema"]  # noqa: E731
    print(f"\n[{stage}] bytes per process (params + AdamW + EMA): DDP {total(ddp[0])}, "
          f"FSDP {[total(b) for b in fsdp]} ({max(total(b) for b in fsdp) / total(ddp[0]):.3f} of DDP)")
