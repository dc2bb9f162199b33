"""No code runs from a sharded checkpoint either.  A ``trainer=fsdp`` checkpoint is a directory: ``meta.pt``, DCP's
``.metadata`` index and ``.distcp`` shards.  The index passes an allowlist; these tests go further and hide the
payload in a *shard*: a byte entry (DCP stores every non-tensor value as a ``torch.save`` pickle, which torch's own
planner reads back with ``weights_only=False``) that would ``touch`` a marker file.  Every entry point that takes a
sharded directory refuses it, with one line naming the shard file and ``trust_checkpoint=true``, and the marker never
appears; shard paths that lead out of the directory (``..``, absolute, a symlink) are refused too.  Trusting the
checkpoint keeps torch's behaviour (and runs the payload: the gate is real)."""

from __future__ import annotations

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
