"""No code runs from a file.  Every loader of ours refuses a checkpoint whose unpickling would run code — checked with
a payload that writes a marker file — through the library and through every entry point that takes a path, with one
line naming the file and ``trust_checkpoint=true``; trusting is the explicit way past it.

Entry points run with ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` (what a user sets to load old pickles): it only changes
``torch.load`` calls that leave ``weights_only`` unset, so a loader that relies on torch's default shows here."""

from __future__ import annotations

import pytest
import torch

from dalle2.lit.checkpoints import (
    UntrustedCheckpointError,
    WrongStageError,
    checkpoint_stage,
    load_checkpoint,
    load_stage_module,
)
from dalle2.pipeline import UnCLIPPipeline
from helpers.cascade import build_tiny_checkpoints
from helpers.evil import assert_refused, malicious_checkpoint
from helpers.scripts import run_script

UNSAFE_TORCH_DEFAULT = {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
STAGES = ("clip", "prior", "decoder", "upsampler")


@pytest.fixture
def marker(tmp_path):
    return tmp_path / "PAYLOAD_RAN"


@pytest.fixture(scope="module")
def cascade(tmp_path_factory):
    return build_tiny_checkpoints(tmp_path_factory.mktemp("safe_load_cascade"))


# ------------------------------------------------------------------------------------------------------ library


def test_load_stage_module_refuses_the_payload_before_the_stage_check(tmp_path, marker):
    evil = malicious_checkpoint(tmp_path / "evil.ckpt", marker, stage="decoder")
    with pytest.raises(UntrustedCheckpointError) as e:
        load_stage_module(evil, "clip")
    assert_refused(str(e.value), evil, marker)
    assert "posix.system" in str(e.value) or "os.system" in str(e.value)  # says what it would have called


def test_checkpoint_stage_and_load_checkpoint_refuse_it(tmp_path, marker):
    evil = malicious_checkpoint(tmp_path / "evil.ckpt", marker, stage="prior")
    for fn in (checkpoint_stage, load_checkpoint):
        with pytest.raises(UntrustedCheckpointError) as e:
            fn(evil)
        assert_refused(str(e.value), evil, marker)


def test_trust_checkpoint_is_the_explicit_way_past_it_and_warns(tmp_path, marker):
    evil = malicious_checkpoint(tmp_path / "evil.ckpt", marker, stage="decoder")
    with pytest.warns(UserWarning, match="trust_checkpoint"), pytest.raises(WrongStageError):
        load_stage_module(evil, "clip", trust_checkpoint=True)
    assert marker.exists()  # the gate is real: a trusted file runs what it holds


@pytest.mark.parametrize("stage", STAGES)
def test_pipeline_from_checkpoints_refuses_a_payload_in_any_stage(cascade, tmp_path, marker, stage):
    evil = malicious_checkpoint(tmp_path / f"{stage}.ckpt", marker, stage=stage)
    paths = {**cascade, stage: evil}
    with pytest.raises(UntrustedCheckpointError) as e:
        UnCLIPPipeline.from_checkpoints(
            clip=paths["clip"], prior=paths["prior"], decoder=paths["decoder"], upsamplers=[paths["upsampler"]]
        )
    assert_refused(str(e.value), evil, marker)


def test_clip_weights_file_with_a_payload_is_refused(tmp_path, marker):
    from dalle2.lit.clip_module import load_clip

    evil = malicious_checkpoint(tmp_path / "ViT-evil.pt", marker, stage=None)
    with pytest.raises(UntrustedCheckpointError) as e:
        load_clip(evil)
    assert_refused(str(e.value), evil, marker)


def test_our_checkpoints_load_with_weights_only_true(cascade, monkeypatch):
    """Every torch.load our loaders make asks for weights_only=True (nothing is left to torch's default)."""
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    pipe = UnCLIPPipeline.from_checkpoints(
        clip=cascade["clip"], prior=cascade["prior"], decoder=cascade["decoder"], upsamplers=[cascade["upsampler"]]
    )
    assert pipe.sizes == (16, 32)
    assert calls and all(wo is True for wo in calls), calls


def test_a_lightning_written_checkpoint_needs_no_unsafe_global(builtin_shards, tmp_path):
    """What Lightning writes for our modules (hparams, loops, callbacks, optimizer and scheduler states, the
    datamodule's stream position) holds only what the weights-only unpickler allows."""
    import functools

    import lightning as L

    from dalle2.data.datamodule import WebDataModule
    from dalle2.lit.clip_module import CLIPModule
    from dalle2.lit.fault_tolerance import NonFiniteGuard
    from dalle2.lit.optim import warmup_cosine
    from helpers.cascade import TINY_CLIP

    dm = WebDataModule(
        train_urls=builtin_shards["train"], val_urls=builtin_shards["val"], image_size=16, batch_size=8, num_workers=0
    )
    module = CLIPModule(
        network=TINY_CLIP,
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3),
        scheduler=functools.partial(warmup_cosine, warmup_steps=1, total_steps=2),
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        limit_val_batches=1,
        val_check_interval=2,
        logger=False,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[NonFiniteGuard(), L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)],
    )
    trainer.fit(module, datamodule=dm)
    last = tmp_path / "last.ckpt"
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(last)) == []
    assert set(load_checkpoint(last)) >= {"state_dict", "optimizer_states", "lr_schedulers", "callbacks", "loops"}
    assert checkpoint_stage(last) == "clip"


# ------------------------------------------------------------------------------------------------- entry points


def _refused(proc, evil, marker) -> None:
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert_refused(out, evil, marker)


def test_train_refuses_a_clip_ckpt_payload(builtin_shards, tmp_path, marker):
    evil = malicious_checkpoint(tmp_path / "clip.ckpt", marker, stage="clip")
    proc = run_script(
        "train/train.py",
        "stage=prior",
        "data=builtin",
        "data.load_image=true",
        f"data.train_urls='{builtin_shards['train']}'",
        f"data.val_urls='{builtin_shards['val']}'",
        f"clip_ckpt={evil}",
        "trainer.max_steps=1",
        "logger=none",
        "trainer.enable_progress_bar=false",
        "data.num_workers=0",
        f"hydra.run.dir={tmp_path / 'run'}",
        env=UNSAFE_TORCH_DEFAULT,
    )
    _refused(proc, evil, marker)


def test_train_refuses_a_ckpt_path_payload(builtin_shards, tmp_path, marker):
    """trainer.fit(ckpt_path=...) loads through Lightning: our checkpoints are checked safely first, and Lightning
    is told weights_only=True (not torch's default, which the environment can flip)."""
    evil = malicious_checkpoint(tmp_path / "last.ckpt", marker, stage="clip")
    proc = run_script(
        "train/train.py",
        "stage=clip",
        f"data.train_urls='{builtin_shards['train']}'",
        f"data.val_urls='{builtin_shards['val']}'",
        f"ckpt_path={evil}",
        "trainer.max_steps=1",
        "logger=none",
        "trainer.enable_progress_bar=false",
        "data.num_workers=0",
        f"hydra.run.dir={tmp_path / 'run'}",
        env=UNSAFE_TORCH_DEFAULT,
    )
    _refused(proc, evil, marker)


@pytest.mark.parametrize("stage", ["prior", "upsampler"])
def test_sample_refuses_a_payload(cascade, tmp_path, marker, stage):
    evil = malicious_checkpoint(tmp_path / f"{stage}.ckpt", marker, stage=stage)
    paths = {**cascade, stage: evil}
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    proc = run_script(
        "eval/sample.py",
        f"ckpt.clip={paths['clip']}",
        f"ckpt.prior={paths['prior']}",
        f"ckpt.decoder={paths['decoder']}",
        f"ckpt.upsamplers=[{paths['upsampler']}]",
        f"prompts={prompts}",
        f"out_dir={tmp_path / 'out'}",
        "trainer.accelerator=cpu",
        env=UNSAFE_TORCH_DEFAULT,
    )
    _refused(proc, evil, marker)
    assert not (tmp_path / "out").exists()


def test_evaluate_refuses_a_payload(builtin_shards, tmp_path, marker):
    evil = malicious_checkpoint(tmp_path / "clip.ckpt", marker, stage="clip")
    proc = run_script(
        "eval/evaluate.py",
        "task=retrieval",
        f"clip_ckpt={evil}",
        f"data.urls='{builtin_shards['val']}'",
        "data.num_workers=0",
        "trainer.accelerator=cpu",
        env=UNSAFE_TORCH_DEFAULT,
    )
    _refused(proc, evil, marker)


def test_serve_refuses_a_payload_before_listening(cascade, tmp_path, marker):
    evil = malicious_checkpoint(tmp_path / "decoder.ckpt", marker, stage="decoder")
    proc = run_script(
        "eval/serve.py",
        f"ckpt.clip={cascade['clip']}",
        f"ckpt.prior={cascade['prior']}",
        f"ckpt.decoder={evil}",
        "device=cpu",
        "port=0",
        timeout=120,
        env=UNSAFE_TORCH_DEFAULT,
    )
    _refused(proc, evil, marker)


def test_precompute_embeddings_refuses_a_payload(builtin_shards, tmp_path, marker):
    evil = malicious_checkpoint(tmp_path / "clip.ckpt", marker, stage="clip")
    proc = run_script(
        "train/precompute_embeddings.py",
        f"clip_ckpt={evil}",
        f"data.urls='{builtin_shards['val']}'",
        f"out_dir={tmp_path / 'emb'}",
        "trainer.accelerator=cpu",
        env=UNSAFE_TORCH_DEFAULT,
    )
    _refused(proc, evil, marker)


def test_notebook_loader_refuses_a_payload(cascade, tmp_path, marker):
    """notebooks/explore_checkpoints.ipynb loads through the library's safe loader: its loading cell fails with the
    refusal and nothing ran."""
    from nbclient.exceptions import CellExecutionError

    from helpers.notebooks import execute_notebook

    evil = malicious_checkpoint(tmp_path / "clip.ckpt", marker, stage="clip")
    env = {
        "DALLE2_NB_RUN": str(tmp_path / "no_run"),
        "DALLE2_NB_CLIP": evil,
        "DALLE2_NB_PRIOR": cascade["prior"],
        "DALLE2_NB_DECODER": cascade["decoder"],
        "DALLE2_NB_SMOKE": "1",
        **UNSAFE_TORCH_DEFAULT,
    }
    with pytest.raises(CellExecutionError) as e:
        execute_notebook("explore_checkpoints", env=env, tmp_path=tmp_path)
    assert "UntrustedCheckpointError" in str(e.value)
    assert_refused(str(e.value), evil, marker)
