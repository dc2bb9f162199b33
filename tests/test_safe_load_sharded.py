"""No code runs from a sharded checkpoint either.  A ``trainer=fsdp`` checkpoint is a directory: ``meta.pt``, DCP's
``.metadata`` index and ``.distcp`` shards.  The index passes an allowlist; these tests go further and hide the
payload in a *shard*: a byte entry (DCP stores every non-tensor value as a ``torch.save`` pickle, which torch's own
planner reads back with ``weights_only=False``) that would ``touch`` a marker file.  Every entry point that takes a
sharded directory refuses it, with one line naming the shard file and ``trust_checkpoint=true``, and the marker never
appears; shard paths that lead out of the directory (``..``, absolute, a symlink) are refused too.  Trusting the
checkpoint keeps torch's behaviour (and runs the payload: the gate is real)."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch

from dalle2.checkpoint import checkpoint_stage, load_checkpoint
from dalle2.lit.checkpoints import load_stage_module
from dalle2.pipeline import UnCLIPPipeline
from dalle2.safe_load import UntrustedCheckpointError, read_dcp_state
from dalle2.stages import load_clip_model, load_stage
from helpers.cascade import build_tiny_checkpoints
from helpers.evil import (
    assert_refused,
    malicious_sharded_checkpoint,
    set_storage_paths,
    sharded_checkpoint,
)
from helpers.scripts import compose_conf, load_script, run_script

SHARD = "__0_0.distcp"
UNSAFE_TORCH_DEFAULT = {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}


@pytest.fixture
def marker(tmp_path):
    return tmp_path / "PAYLOAD_RAN"


@pytest.fixture(scope="module")
def cascade(tmp_path_factory):
    return build_tiny_checkpoints(tmp_path_factory.mktemp("sharded_cascade"))


def _evil(tmp_path, marker, cascade, stage, **kw) -> str:
    return malicious_sharded_checkpoint(tmp_path / f"{stage}.ckpt", marker, cascade[stage], **kw)


def _refused_shard(exc_info, ckpt, marker) -> None:
    """Refused on one line naming the shard file (and trust_checkpoint=true); nothing ran."""
    assert_refused(str(exc_info.value), f"{ckpt}/{SHARD}", marker)


# ------------------------------------------------------------------------------------------------------ library


def test_reading_the_shards_refuses_a_pickled_byte_entry(tmp_path, marker):
    evil = malicious_sharded_checkpoint(tmp_path / "last.ckpt", marker)
    with pytest.raises(UntrustedCheckpointError) as e:
        read_dcp_state(evil)
    _refused_shard(e, evil, marker)
    assert "state_dict.payload" in str(e.value) and "system" in str(e.value)  # which entry, what it would call


def test_load_stage_refuses_an_evil_shard(cascade, tmp_path, marker):
    evil = _evil(tmp_path, marker, cascade, "prior")
    with pytest.raises(UntrustedCheckpointError) as e:
        load_stage(evil, "prior")
    _refused_shard(e, evil, marker)


@pytest.mark.parametrize("stage", ["clip", "prior", "decoder", "upsampler"])
def test_pipeline_from_checkpoints_refuses_an_evil_shard_in_any_stage(cascade, tmp_path, marker, stage):
    evil = _evil(tmp_path, marker, cascade, stage)
    paths = {**cascade, stage: evil}
    with pytest.raises(UntrustedCheckpointError) as e:
        UnCLIPPipeline.from_checkpoints(
            clip=paths["clip"], prior=paths["prior"], decoder=paths["decoder"], upsamplers=[paths["upsampler"]]
        )
    _refused_shard(e, evil, marker)


def test_clip_ckpt_loaders_refuse_an_evil_shard(cascade, tmp_path, marker):
    """``clip_ckpt=<dir>`` (train, evaluate, precompute: load_clip) and the pipeline's load_clip_model."""
    from dalle2.lit.clip_module import load_clip

    evil = _evil(tmp_path, marker, cascade, "clip")
    for load in (load_clip, load_clip_model, lambda p: load_stage_module(p, "clip")):
        with pytest.raises(UntrustedCheckpointError) as e:
            load(evil)
        _refused_shard(e, evil, marker)


def test_resume_check_refuses_an_evil_optimizer_entry_before_lightning_reads_it(tmp_path, marker):
    """``train.py ckpt_path=<dir>``: Lightning's resume reads the shards with torch's planner (byte entries such as
    the optimizer's param_groups unpickled with weights_only=False), so train.py's safe check of the checkpoint must
    read every byte entry first.  Also ``clip_ckpt=<dir>`` through the same function."""
    train = load_script("train", "train")
    evil = malicious_sharded_checkpoint(tmp_path / "last.ckpt", marker, stage="clip", entry="optimizer")
    module = types.SimpleNamespace(stage="clip", hparams={})
    with pytest.raises(UntrustedCheckpointError) as e:
        train.load_checkpoints(None, module, evil, trust=False)
    _refused_shard(e, evil, marker)
    assert "optimizer_0.param_groups.0.lr" in str(e.value)
    with pytest.raises(UntrustedCheckpointError):
        checkpoint_stage(evil)
    # a prior's clip_ckpt=<dir> (its weights: a payload among them)
    evil = malicious_sharded_checkpoint(tmp_path / "clip.ckpt", marker, stage="clip")
    prior = types.SimpleNamespace(stage="prior", hparams={"clip_ckpt": evil}, set_clip=lambda clip: None)
    with pytest.raises(UntrustedCheckpointError) as e:
        train.load_checkpoints(None, prior, None, trust=False)
    _refused_shard(e, evil, marker)


def test_trust_checkpoint_keeps_torchs_behaviour_and_warns(tmp_path, marker):
    evil = malicious_sharded_checkpoint(tmp_path / "last.ckpt", marker)
    with pytest.warns(UserWarning, match="trust_checkpoint"):
        found = load_checkpoint(evil, trust_checkpoint=True)
    assert marker.exists()  # the gate is real: a trusted checkpoint runs what it holds
    assert found["state_dict"]["payload"] == 0  # os.system's exit status


def test_plain_byte_entries_and_optimizer_state_still_load(tmp_path):
    """What a real checkpoint keeps as byte entries (numbers, strings, tuples: the optimizer's param_groups) is read
    with the weights-only unpickler, unchanged."""
    groups = [{"lr": 1e-3, "betas": (0.9, 0.99), "name": "decay", "params": ["net.w"]}]
    extra = {
        "state_dict": {"note": "hello", "count": 3},
        "optimizer_0": {"state": {"net.w": {"step": torch.tensor(2.0)}}, "param_groups": groups},
    }
    ckpt = sharded_checkpoint(tmp_path / "last.ckpt", stage="clip", extra=extra)
    assert checkpoint_stage(ckpt) == "clip"
    loaded = load_checkpoint(ckpt, optimizer=True)
    assert loaded["state_dict"]["note"] == "hello" and loaded["state_dict"]["count"] == 3
    assert torch.equal(loaded["state_dict"]["w"], torch.zeros(2))
    assert loaded["optimizer_states"][0]["param_groups"] == groups
    assert float(loaded["optimizer_states"][0]["state"]["net.w"]["step"]) == 2.0


# ------------------------------------------------------------------------- shard paths out of the directory


def _outside(tmp_path, marker):
    """An evil shard outside the checkpoint directory, and a clean-looking checkpoint directory to point at it."""
    elsewhere = malicious_sharded_checkpoint(tmp_path / "elsewhere", marker)
    ckpt = sharded_checkpoint(tmp_path / "last.ckpt", stage="clip", extra={"state_dict": {"payload": "benign"}})
    return ckpt, tmp_path / "elsewhere" / SHARD, elsewhere


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_a_shard_path_out_of_the_directory_is_refused(tmp_path, marker, how):
    ckpt, outside, _ = _outside(tmp_path, marker)
    (ckpt / ".metadata").write_bytes((outside.parent / ".metadata").read_bytes())  # the evil shard's layout
    if how == "dotdot":
        set_storage_paths(ckpt, f"../elsewhere/{SHARD}")
    elif how == "absolute":
        set_storage_paths(ckpt, outside)
    else:
        (ckpt / SHARD).unlink()
        (ckpt / SHARD).symlink_to(outside)
    for read in (checkpoint_stage, load_checkpoint):
        with pytest.raises(UntrustedCheckpointError, match="outside the checkpoint directory") as e:
            read(ckpt)
        assert_refused(str(e.value), ckpt, marker)


def test_a_symlinked_shard_inside_the_directory_is_fine(tmp_path):
    ckpt = sharded_checkpoint(tmp_path / "last.ckpt", stage="clip")
    (ckpt / "moved.distcp").write_bytes((ckpt / SHARD).read_bytes())
    (ckpt / SHARD).unlink()
    (ckpt / SHARD).symlink_to("moved.distcp")
    assert torch.equal(load_checkpoint(ckpt)["state_dict"]["w"], torch.zeros(2))


def test_a_missing_shard_is_a_clear_error(tmp_path):
    ckpt = sharded_checkpoint(tmp_path / "last.ckpt", stage="clip")
    (ckpt / SHARD).unlink()
    with pytest.raises(FileNotFoundError, match=f"{ckpt}/{SHARD}"):
        load_checkpoint(ckpt)


# ------------------------------------------------------------------------------------------------- entry points


def _refused_cli(proc, evil, marker) -> None:
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert_refused(out, f"{evil}/{SHARD}", marker)
    assert "Traceback" not in out, out[-3000:]  # one line, not a stack


def test_export_cli_refuses_an_evil_shard(cascade, tmp_path, marker):
    evil = _evil(tmp_path, marker, cascade, "decoder")
    out = tmp_path / "exported"
    proc = run_script("-m dalle2.export", f"ckpt={evil}", f"out={out}", timeout=120, env=UNSAFE_TORCH_DEFAULT)
    _refused_cli(proc, evil, marker)
    assert not list(tmp_path.glob("exported*"))


def test_sample_and_serve_refuse_an_evil_shard(cascade, tmp_path, marker):
    """eval/sample.py's ``run(cfg)`` and eval/serve.py's ``build_app(cfg)`` (what their CLIs run after composing the
    config; the CLIs turn the error into one line, as for any refused checkpoint) — in this process: cheap."""
    evil = _evil(tmp_path, marker, cascade, "upsampler")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    ckpts = [f"ckpt.clip={cascade['clip']}", f"ckpt.prior={cascade['prior']}", f"ckpt.decoder={cascade['decoder']}"]
    cfg = compose_conf("sample", [*ckpts, f"ckpt.upsamplers=[{evil}]", f"prompts={prompts}", f"out_dir={tmp_path}/out"])
    with pytest.raises(UntrustedCheckpointError) as e:
        load_script("eval", "sample").run(cfg)
    _refused_shard(e, evil, marker)
    assert not (tmp_path / "out").exists()

    cfg = compose_conf("serve", [*ckpts, f"ckpt.upsamplers=[{evil}]", "device=cpu"])
    with pytest.raises(UntrustedCheckpointError) as e:
        load_script("eval", "serve").build_app(cfg)
    _refused_shard(e, evil, marker)


# ------------------------------------------------------------------------------- Lightning's resume under trainer=fsdp

RESUME_SCRIPT = """
import json, os, pickle, shutil, sys, warnings
from pathlib import Path

import lightning as L
import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from dalle2.lit.fsdp import FSDP2Strategy, shard_module
from dalle2.safe_load import read_dcp_state
from helpers.evil import Payload, malicious_checkpoint

work, marker = Path(sys.argv[1]), Path(sys.argv[2])
warnings.filterwarnings("ignore")


class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(4, 4)

    def configure_model(self):
        shard_module(self, [(self.net, True)])

    def training_step(self, batch, batch_idx):
        return self.net(batch).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randn(32, 4), batch_size=4)


def fit(root, ckpt_path=None, steps=2, trust=False):
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps,
                        strategy=FSDP2Strategy(**({"trust_checkpoint": True} if trust else {})),
                        default_root_dir=root, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    module = Tiny()
    trainer.fit(module, ckpt_path=ckpt_path, weights_only=not trust)  # as train.py calls it
    return trainer, module


def weights(module):
    return {k: v.full_tensor() for k, v in module.net.state_dict().items()}


out = {}
trainer, module = fit(work / "a")
good = work / "good.ckpt"
trainer.save_checkpoint(good)
trainer, resumed = fit(work / "b", good)  # at max_steps already: restores, trains nothing
out["good"] = {
    "weights": all(torch.equal(v, weights(module)[k]) for k, v in weights(resumed).items()),
    "step": trainer.global_step,
    "adam_step": float(trainer.optimizers[0].state_dict()["state"][0]["step"]),
}
evil_index = work / "evil_index.ckpt"  # a valid index with a payload in one of its fields
shutil.copytree(good, evil_index)
metadata = pickle.loads((evil_index / ".metadata").read_bytes())
metadata.planner_data = Payload(marker)
(evil_index / ".metadata").write_bytes(pickle.dumps(metadata))
evil_entry = work / "evil_entry.ckpt"  # the same weights; the optimizer's learning rate is a payload
state = read_dcp_state(good)
state["optimizer_0"]["param_groups"][0]["lr"] = Payload(marker)
dcp.save(state, checkpoint_id=evil_entry, no_dist=True)
shutil.copy(good / "meta.pt", evil_entry / "meta.pt")
hpc = work / "c" / "hpc_ckpt_1.ckpt"  # SLURM's requeue checkpoint, which Lightning finds by itself
shutil.copytree(evil_index, hpc)
evil_file = malicious_checkpoint(work / "evil.ckpt", marker)  # save_distributed_checkpoint=false: one file

cases = [("index", evil_index, False), ("entry", evil_entry, False), ("file", evil_file, False), ("hpc", None, False),
         ("trusted", evil_entry, True)]
for name, path, trust in cases:
    if name == "hpc":
        os.environ.update(SLURM_NTASKS="1", SLURM_NTASKS_PER_NODE="1", SLURM_JOB_NAME="train", SLURM_PROCID="0",
                          SLURM_LOCALID="0", SLURM_NODEID="0", SLURM_JOB_ID="1", SLURM_NNODES="1")
    try:
        fit(work / ("c" if name == "hpc" else name), path, steps=3, trust=trust)
        error = None
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
    out[name] = {"ran": marker.exists(), "error": error}
    marker.unlink(missing_ok=True)
(work / "result.json").write_text(json.dumps(out))
"""


def test_lightnings_resume_under_fsdp_reads_through_the_safe_reader(tmp_path, marker):
    """train.py checks ``ckpt_path=<dir>`` safely, but then Lightning resumes: under ``trainer=fsdp`` its
    ``ModelParallelStrategy`` read the shards again with torch's own DCP reader (index and byte entries unpickled with
    no restriction), read files with torch's default ``weights_only`` (off with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1:
    the ``weights_only`` given to ``fit`` does not reach it), and under SLURM picked ``hpc_ckpt_*.ckpt`` by itself,
    which train.py never checked. The strategy now reads all of it safely: a genuine checkpoint resumes (weights,
    optimizer state), an evil index, shard entry, file or SLURM checkpoint is refused naming it, and nothing runs
    unless ``trust_checkpoint``."""
    from helpers.tiny_runs import run, run_env

    script = tmp_path / "resume.py"
    script.write_text(RESUME_SCRIPT)
    work = tmp_path / "work"
    work.mkdir()
    env = run_env(**UNSAFE_TORCH_DEFAULT, PYTHONWARNINGS="ignore")
    proc = run([sys.executable, str(script), str(work), str(marker)], timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads((work / "result.json").read_text())
    assert out["good"] == {"weights": True, "step": 2, "adam_step": 2.0}
    for case, named in [
        ("index", f"{work}/evil_index.ckpt/.metadata"),
        ("entry", f"{work}/evil_entry.ckpt/{SHARD}"),
        ("hpc", f"{work}/c/hpc_ckpt_1.ckpt/.metadata"),
    ]:
        assert not out[case]["ran"], f"{case}: the payload ran"
        assert_refused(out[case]["error"], named, marker)
        assert out[case]["error"].startswith("UntrustedCheckpointError")
    assert not out["file"]["ran"] and "Weights only load failed" in out["file"]["error"]
    assert out["trusted"] == {"ran": True, "error": None}  # the gate is real: trust_checkpoint=true runs it
