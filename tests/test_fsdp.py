"""Sharded training (``trainer=fsdp``: FSDP2 on Lightning's ModelParallelStrategy) against DDP, 2 CPU processes (gloo)
through train/train.py: the same losses, gradients and weights on the same global batches; about half the bytes per
process; sharded save -> resume -> the same next losses as an uninterrupted run; the consolidated export samples the
images of the unsharded model with the same weights; sharded checkpoint directories are found, read safely and
refused when their index would run code."""

from __future__ import annotations

import csv
import json
import pickle
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from helpers.tiny_runs import empty_tar, run, stage_cmd, tiny_clip_ckpt

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
    cmd = stage_cmd(
        stage,
        run_dir,
        train_urls=shards["train"],
        clip_ckpt=clip,
        extra=(
            *strategy,
            f"trainer.max_steps={STEPS}",
            "callbacks.model_checkpoint.every_n_train_steps=2",
            "+callbacks.probe._target_=helpers.fsdp.FullStateProbe",
            f"+callbacks.probe.path={probe}",
            *extra,
        ),
    )
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
    return stage, {
        name: train(stage, strategy, root / name, builtin_shards, clip_ckpt, *extra)
        for name, strategy in (("ddp", DDP), ("fsdp", FSDP))
    }


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
    print(
        f"\n[{stage}] bytes per process (params + AdamW + EMA): DDP {total(ddp[0])}, "
        f"FSDP {[total(b) for b in fsdp]} ({max(total(b) for b in fsdp) / total(ddp[0]):.3f} of DDP)"
    )


def _sample(stage, stage_name: str, seed: int = 0) -> torch.Tensor:
    """A few DDIM steps of a plain (unsharded) prior / decoder stage from fixed conditioning and noise."""
    g = torch.Generator().manual_seed(seed)
    if stage_name == "prior":
        d = stage.net.embed_dim
        text = torch.randn(3, d, generator=g)
        tokens = torch.randn(3, 5, stage.net.text_token_dim, generator=g)
        return stage.sample(
            text_embed=text,
            text_tokens=tokens,
            text_mask=torch.ones(3, 5, dtype=torch.bool),
            steps=4,
            generator=torch.Generator().manual_seed(seed),
        )
    return stage.sample(
        torch.randn(2, stage.net.clip_dim, generator=g), steps=4, generator=torch.Generator().manual_seed(seed)
    )


@pytest.mark.slow
def test_consolidated_export_samples_like_the_unsharded_model(runs, tmp_path):
    from dalle2.checkpoint import load_checkpoint
    from dalle2.decoder.stage import DecoderStage
    from dalle2.prior.stage import PriorStage
    from dalle2.stages import load_stage

    stage_name, r = runs
    sharded = r["fsdp"]["dir"] / "checkpoints" / "last.ckpt"
    proc = run([sys.executable, "-m", "dalle2.export", f"ckpt={sharded}", f"out={tmp_path / 'exported'}"], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    exported = tmp_path / "exported.safetensors"
    # the unsharded model: the same hyperparameters, with the EMA weights gathered (all_gather) by the FSDP run itself
    hparams = load_checkpoint(sharded, tensors=False)["hyper_parameters"]
    ema = {
        k.removeprefix("ema.module."): v for k, v in r["fsdp"]["probe"]["state"].items() if k.startswith("ema.module.")
    }
    build = {"prior": PriorStage, "decoder": DecoderStage}[stage_name]
    reference = build.from_hparams(hparams).eval().requires_grad_(False)
    reference.net.load_state_dict(ema, strict=True)
    from_export = load_stage(exported, stage_name)
    for k, v in from_export.net.state_dict().items():
        torch.testing.assert_close(v.float(), reference.net.state_dict()[k].float(), rtol=0, atol=0, msg=k)
    torch.testing.assert_close(_sample(from_export, stage_name), _sample(reference, stage_name), rtol=0, atol=0)


@pytest.mark.slow
def test_sharded_save_resume_matches_uninterrupted(builtin_shards, clip_ckpt, tmp_path):
    """bf16 compute (fp32 master weights) and activation checkpointing: save at step 2 as shards, resume with
    ckpt_path=last (found by the newest-checkpoint search among directories) -> steps 2 and 3 equal the
    uninterrupted run's, and so do the final weights and EMA."""
    opts = (
        "trainer.strategy.param_dtype=bfloat16",
        "trainer.strategy.reduce_dtype=float32",
        "trainer.strategy.activation_checkpointing=true",
        "trainer.max_steps=4",
    )
    whole = train("decoder", FSDP, tmp_path / "whole", builtin_shards, clip_ckpt, *opts)
    first = train("decoder", FSDP, tmp_path / "resumed", builtin_shards, clip_ckpt, *opts[:-1], "trainer.max_steps=2")
    assert sorted(first["losses"]) == [0, 1]
    last = tmp_path / "resumed" / "checkpoints" / "last.ckpt"
    assert (last / "meta.pt").is_file() and not list(last.parent.glob(".*partial*"))
    second = train(
        "decoder",
        FSDP,
        tmp_path / "resumed",
        builtin_shards,
        clip_ckpt,
        *opts,
        "ckpt_path=last",
        "logger.csv.name=csv_resumed",
    )
    resumed = losses(tmp_path / "resumed" / "csv_resumed" / "metrics.csv")
    assert sorted(resumed) == [2, 3] and sorted(whole["losses"]) == [0, 1, 2, 3]
    for step, loss in resumed.items():
        assert loss == pytest.approx(whole["losses"][step], rel=1e-5, abs=1e-7), f"step {step}"
    assert_tensors_close(second["probe"]["state"], whole["probe"]["state"], "final state", rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------ CLIP and the upsampler, uneven val data


def probe_run(stage: str, run_dir: Path, shards: dict, val_urls: str, *extra: str, image_size: int = 32):
    """A 2-step ``trainer=fsdp`` run validating at step 2, with :class:`helpers.fsdp.ForwardProbe`: -> (process, probe)."""
    probe = run_dir.with_name(run_dir.name + ".probe.json")
    cmd = stage_cmd(
        stage,
        run_dir,
        train_urls=shards["train"],
        val_urls=val_urls,
        image_size=image_size,
        extra=(
            *FSDP,
            "trainer.max_steps=2",
            "trainer.val_check_interval=2",
            "+callbacks.probe._target_=helpers.fsdp.ForwardProbe",
            f"+callbacks.probe.path={probe}",
            *extra,
        ),
    )
    proc = run(cmd, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc, json.loads(probe.read_text())


def test_fsdp_clip_with_an_empty_val_shard_on_one_rank_in_bf16_with_activation_checkpointing(builtin_shards, tmp_path):
    """One 2-process CLIP run, three checks. (1) val = a good shard + an empty tar (what img2dataset writes when every
    download of a shard failed): rank 1 has no val batch. This crashed ("Received data size doesn't match expected
    size": rank 1 gathered its val features while rank 0 all-gathered weights for a forward); every rank now runs the
    smallest rank's count (0 here) and rank 0 says why. (2) ``param_dtype=bfloat16``: a Linear inside a sharded block
    sees bf16 inputs and weights in the training forward. (3) ``activation_checkpointing=true``: each block runs twice
    per step (its forward, and the recompute in backward)."""
    val = f"{builtin_shards['val'].split('{')[0]}00000.tar::{empty_tar(tmp_path / 'empty' / '00001.tar')}"
    proc, probe = probe_run(
        "clip",
        tmp_path / "run",
        builtin_shards,
        val,
        "data.val_batch_size=8",
        "trainer.strategy.param_dtype=bfloat16",
        "trainer.strategy.reduce_dtype=float32",
        "trainer.strategy.activation_checkpointing=true",
    )
    assert probe["val_batches"] == [0, 0]
    assert (
        "validation ran no batch on any rank" in proc.stderr
        and "rank(s) [1] had no more validation data" in proc.stderr
    )
    assert probe["dtypes"] == ["torch.bfloat16", "torch.bfloat16"]
    assert probe["train_calls"] == [2, 2] and all(on for _, on in probe["checkpointing"])
    train_losses = losses(tmp_path / "run" / "csv" / "metrics.csv")
    assert sorted(train_losses) == [0, 1] and all(v == v for v in train_losses.values())


@pytest.mark.slow
def test_fsdp_upsampler_with_fewer_val_batches_on_one_rank(builtin_shards64, tmp_path):
    """The upsampler under ``trainer=fsdp``; val = 64 samples for rank 0 and 4 for rank 1 (batches of 2: 32 and 2), with
    ``limit_val_batches=4`` (trainer=fsdp's old default): rank 0 went on to its 3rd forward while rank 1 waited in the
    end-of-validation gather — a hang. Every rank now runs 2 batches, logs the val loss over them, and rank 0 warns."""
    from helpers.shards import write_tar

    good = f"{builtin_shards64['val'].split('{')[0]}00000.tar"
    with tarfile.open(good) as tar:
        first = [m for m in tar.getmembers() if m.isfile()]
        keys = sorted({m.name.split(".", 1)[0] for m in first})[:4]
        small = write_tar(
            tmp_path / "small.tar",
            [(m.name, tar.extractfile(m).read()) for m in first if m.name.split(".", 1)[0] in keys],
        )
    proc, probe = probe_run(
        "upsampler",
        tmp_path / "run",
        builtin_shards64,
        f"{good}::{small}",
        "data.val_batch_size=2",
        "trainer.limit_val_batches=4",
        image_size=64,
    )
    assert probe["val_batches"] == [2, 2]
    assert "validation ran 2 batch(es) per rank: rank(s) [1] had no more validation data" in proc.stderr
    with open(tmp_path / "run" / "csv" / "metrics.csv") as f:
        val = [float(r["val/loss"]) for r in csv.DictReader(f) if r.get("val/loss")]
    assert len(val) == 1 and val[0] == val[0]


# ------------------------------------------------------------------------------ sharded checkpoint directories (fast)


def fake_sharded(path: Path, step: int, stage: str = "decoder") -> Path:
    """A directory with what the resume search reads of a sharded checkpoint: ``meta.pt`` (+ an empty index)."""
    from dalle2.checkpoint import STAGE_KEY

    path.mkdir(parents=True)
    torch.save({"global_step": step, STAGE_KEY: stage}, path / "meta.pt")
    return path


def test_resume_finds_the_newest_checkpoint_among_files_and_sharded_directories(tmp_path):
    from dalle2.lit.checkpoints import RunDirInUseError, resolve_ckpt_path, run_checkpoints

    ckpts = tmp_path / "checkpoints"
    torch.save({"global_step": 2}, fake_sharded(ckpts / "step_0000004.ckpt", 4).parent / "step_0000002.ckpt")
    fake_sharded(ckpts / "last.ckpt", 6)
    (ckpts / ".last.ckpt.partial").mkdir()  # a save killed half-way: never a candidate
    (ckpts / "empty.ckpt").mkdir()  # a directory without meta.pt: not a checkpoint
    assert [(s, p.name) for s, p in run_checkpoints(tmp_path)] == [
        (6, "last.ckpt"),
        (4, "step_0000004.ckpt"),
        (2, "step_0000002.ckpt"),
    ]
    assert resolve_ckpt_path("last", tmp_path) == str(ckpts / "last.ckpt")
    assert resolve_ckpt_path(str(ckpts / "step_0000004.ckpt"), tmp_path) == str(ckpts / "step_0000004.ckpt")
    with pytest.raises(RunDirInUseError):
        resolve_ckpt_path(None, tmp_path)


def test_sharded_save_replaces_the_previous_directory_atomically(tmp_path):
    from dalle2.lit.fsdp import replace_dir

    old, new = fake_sharded(tmp_path / "last.ckpt", 2), fake_sharded(tmp_path / ".last.ckpt.partial", 4)
    replace_dir(new, old)
    assert torch.load(old / "meta.pt")["global_step"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_a_sharded_index_that_would_run_code_is_refused(tmp_path):
    from dalle2.checkpoint import checkpoint_stage, load_checkpoint
    from dalle2.safe_load import UntrustedCheckpointError

    ckpt = fake_sharded(tmp_path / "last.ckpt", 2)
    (ckpt / ".metadata").write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(UntrustedCheckpointError, match=r"\.metadata: refused.*builtins\.print"):
        checkpoint_stage(ckpt)
    with pytest.raises(UntrustedCheckpointError):
        load_checkpoint(ckpt)


def test_a_save_killed_while_removing_the_previous_checkpoint_leaves_one_visible(tmp_path, monkeypatch):
    """A save killed between its renames left only ``last-prev.ckpt``; the next save is killed while deleting: a
    complete checkpoint is still visible to resume at that moment (the old code deleted ``-prev`` first)."""
    import shutil

    from dalle2.lit import fsdp
    from dalle2.lit.checkpoints import run_checkpoints

    ckpts = tmp_path / "checkpoints"
    fake_sharded(ckpts / "last-prev.ckpt", 2)
    new = fake_sharded(ckpts / ".last.ckpt.partial", 4)
    seen = []

    def killed_rmtree(path, *a, **k):  # deletes part of the directory, then the process dies
        (Path(path) / "meta.pt").unlink()
        seen.append([(s, p.name) for s, p in run_checkpoints(tmp_path)])
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", killed_rmtree)
    with pytest.raises(KeyboardInterrupt):
        fsdp.replace_dir(new, ckpts / "last.ckpt")
    assert seen and seen[0][0] == (4, "last.ckpt")
    assert [(s, p.name) for s, p in run_checkpoints(tmp_path)][0] == (4, "last.ckpt")


def _same_count_worker(rank: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist

    from dalle2.lit.distributed import SameBatchCount

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        seen = []
        for counts in ((5, 2), (0, 3), (4, 4)):  # rank 1 shorter; rank 0 empty; even
            loader = SameBatchCount([torch.full((1,), i) for i in range(counts[rank])])
            got = [int(b) for b in loader]
            total = torch.tensor([float(len(got))])
            dist.all_reduce(total)  # a collective after the pass: reached by both ranks, in step
            seen.append((got, loader.last_count, int(total)))
        Path(f"{out}.{rank}").write_text(json.dumps(seen))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_evaluation_batches_are_the_smallest_ranks_count_on_every_rank(tmp_path):
    """``SameBatchCount`` (what ``trainer=fsdp`` wraps evaluation loaders in): 2 gloo processes with 5/2, 0/3 and 4/4
    batches each run 2, 0 and 4, and meet in the next collective (uneven counts hung, an empty rank crashed gloo)."""
    import os

    import torch.multiprocessing as mp

    out = str(tmp_path / "seen")
    mp.spawn(_same_count_worker, args=(29900 + os.getpid() % 90, out), nprocs=2, join=True)
    want = [[[0, 1], 2, 4], [[], 0, 0], [[0, 1, 2, 3], 4, 8]]
    assert json.loads(Path(f"{out}.0").read_text()) == json.loads(Path(f"{out}.1").read_text()) == want


def _ema_zero2_worker(rank: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from dalle2.lit.fsdp import FSDP2Strategy
    from dalle2.nn import EMA

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        strategy = FSDP2Strategy(reshard_after_forward=False)
        strategy._device_mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("data_parallel",))
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        ema = EMA(net, decay=0.9, warmup=0)
        strategy.shard(net, trainable=True)
        strategy.shard(ema.module, trainable=False)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        for _ in range(2):
            net(torch.randn(3, 4)).square().mean().backward()
            opt.step()
            opt.zero_grad()
            with torch.no_grad():
                ema.module(torch.randn(3, 4))  # a validation forward of the EMA copy
            ema.update(net)
        Path(f"{out}.{rank}").write_text("ok")
        del net, ema, opt, strategy  # free the sharded modules (and their process-group handles) first
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_the_ema_copy_reshards_after_its_forward_even_under_zero2(tmp_path):
    """``reshard_after_forward=false`` (ZeRO-2) for the trained network only: the EMA copy never runs a backward, so
    FSDP2 would leave its weights gathered after a validation forward, and the next EMA update fails (2 processes)."""
    import os

    import torch.multiprocessing as mp

    out = str(tmp_path / "done")
    mp.spawn(_ema_zero2_worker, args=(29400 + os.getpid() % 500, out), nprocs=2, join=True)
    assert Path(f"{out}.0").read_text() == Path(f"{out}.1").read_text() == "ok"
