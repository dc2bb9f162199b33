"""Weights are shared as safetensors: every stage exports to ``<name>.safetensors`` + ``<name>.json``
(``python -m dalle2.export ckpt=... out=...``); the pipeline, sample, evaluate and serve load the exports directly and
sample the same images as from the ``.ckpt`` files; loading an export never unpickles anything."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from dalle2.lit.checkpoints import WrongStageError, load_checkpoint, load_stage_module
from dalle2.pipeline import SamplingSettings, StageSettings, UnCLIPPipeline
from helpers.cascade import build_tiny_checkpoints
from helpers.scripts import run_script

STAGES = ("clip", "prior", "decoder", "upsampler")
PROMPTS = ["a red circle on a blue background", "two green squares", "x"]
FAST = SamplingSettings(
    prior=StageSettings(steps=3, guidance_scale=2.0),
    decoder=StageSettings(steps=3, guidance_scale=3.0),
    upsampler=StageSettings(steps=2),
    n_prior_samples=2,
    upsampler_aug_level=10,
)


@pytest.fixture(scope="module")
def cascade(tmp_path_factory):
    return build_tiny_checkpoints(tmp_path_factory.mktemp("export_cascade"))


@pytest.fixture(scope="module")
def exports(cascade, tmp_path_factory):
    from dalle2.export import export_checkpoint

    out = tmp_path_factory.mktemp("exports")
    return {stage: export_checkpoint(cascade[stage], out / stage) for stage in STAGES}


def _pipe(paths: dict) -> UnCLIPPipeline:
    return UnCLIPPipeline.from_checkpoints(
        clip=str(paths["clip"]),
        prior=str(paths["prior"]),
        decoder=str(paths["decoder"]),
        upsamplers=[str(paths["upsampler"])],
    )


def test_cli_writes_safetensors_and_json(cascade, tmp_path):
    proc = run_script("-m dalle2.export", f"ckpt={cascade['prior']}", f"out={tmp_path / 'shared' / 'prior'}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    st, js = tmp_path / "shared" / "prior.safetensors", tmp_path / "shared" / "prior.json"
    assert st.is_file() and js.is_file() and str(st) in proc.stdout
    config = json.loads(js.read_text())
    assert config["stage"] == "prior" and config["weights"] == "ema"
    assert config["hparams"]["network"]["embed_dim"] == 8 and config["hparams"]["clip_ckpt"] is None
    assert config["hparams"]["diffusion"]["num_timesteps"] == 100


def test_json_config_is_also_in_the_safetensors_metadata(exports):
    from safetensors import safe_open

    for stage, path in exports.items():
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["dalle2_export"])
        assert meta == json.loads(path.with_suffix(".json").read_text())
        assert meta["stage"] == stage


@pytest.mark.parametrize("stage", ["prior", "decoder", "upsampler"])
def test_sampling_stages_export_their_ema_weights(cascade, exports, stage):
    from safetensors.torch import load_file

    sd = load_checkpoint(cascade[stage])["state_dict"]
    exported = load_file(str(exports[stage]))
    ema = {k.removeprefix("ema.module."): v for k, v in sd.items() if k.startswith("ema.module.")}
    assert set(exported) == set(ema)
    assert all(torch.equal(exported[k], ema[k]) for k in ema)
    assert not all(torch.equal(exported[k], sd["net." + k]) for k in ema)  # the EMA, not the raw weights


def test_exports_sample_the_same_images_as_the_checkpoints(cascade, exports):
    from_ckpt, from_export = _pipe(cascade), _pipe(exports)
    a = from_ckpt(PROMPTS, seed=3, settings=FAST)
    b = from_export(PROMPTS, seed=3, settings=FAST)
    assert a.shape == (3, 3, 32, 32) and torch.equal(a, b)
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(
        from_ckpt.variations(images, seed=1, settings=FAST), from_export.variations(images, seed=1, settings=FAST)
    )


def test_loading_an_export_never_unpickles(exports, monkeypatch):
    import torch._weights_only_unpickler as wou

    def refuse(*args, **kwargs):
        raise AssertionError("an export was unpickled")

    for obj, name in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (wou, "Unpickler")):
        monkeypatch.setattr(obj, name, refuse)
    pipe = _pipe(exports)
    assert pipe.sizes == (16, 32) and pipe.prior is not None


def test_a_clip_export_loads_as_the_same_clip(cascade, exports):
    from dalle2.lit.clip_module import load_clip

    a, b = load_clip(cascade["clip"]), load_clip(str(exports["clip"]))
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    tokens = torch.randint(1, 8000, (2, 77))
    with torch.no_grad():
        assert torch.equal(a.encode_image(images), b.encode_image(images))
        assert torch.equal(a.model.encode_text(tokens), b.model.encode_text(tokens))


def test_stage_checks_hold_for_exports(exports):
    with pytest.raises(WrongStageError, match=r"prior\.safetensors.*'prior'.*'decoder'"):
        load_stage_module(exports["prior"], "decoder")


def test_export_never_overwrites_unless_forced(cascade, tmp_path):
    from dalle2.export import export_checkpoint

    first = export_checkpoint(cascade["upsampler"], tmp_path / "up")
    before = first.read_bytes()
    with pytest.raises(FileExistsError, match="force=true"):
        export_checkpoint(cascade["decoder"], tmp_path / "up")
    assert first.read_bytes() == before
    assert export_checkpoint(cascade["decoder"], tmp_path / "up", force=True) == first
    assert json.loads(first.with_suffix(".json").read_text())["stage"] == "decoder"


def test_a_foreign_safetensors_file_is_a_clear_error(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "random.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match=r"random\.safetensors.*not a dalle2 export"):
        load_stage_module(path, "prior")


def test_sample_cli_loads_exports_and_writes_the_same_pngs(cascade, exports, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\ntwo green squares\n")
    common = [
        f"prompts={prompts}",
        "steps.prior=2",
        "steps.decoder=2",
        "steps.upsampler=2",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
    ]
    outs = {}
    for name, paths in (("ckpt", cascade), ("export", exports)):
        out = tmp_path / name
        proc = run_script(
            "eval/sample.py",
            f"ckpt.clip={paths['clip']}",
            f"ckpt.prior={paths['prior']}",
            f"ckpt.decoder={paths['decoder']}",
            f"ckpt.upsamplers=[{paths['upsampler']}]",
            f"out_dir={out}",
            *common,
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        outs[name] = {p.name: p.read_bytes() for p in sorted(out.glob("*.png"))}
    assert set(outs["ckpt"]) == {"00000.png", "00001.png", "grid.png"}
    assert outs["ckpt"] == outs["export"]


def test_evaluate_cli_loads_a_clip_export(cascade, exports, builtin_shards, tmp_path):
    results = {}
    for name, clip in (("ckpt", cascade["clip"]), ("export", exports["clip"])):
        out = tmp_path / f"{name}.json"
        proc = run_script(
            "eval/evaluate.py",
            "task=retrieval",
            f"clip_ckpt={clip}",
            f"data.urls='{builtin_shards['val']}'",
            "data.num_workers=0",
            "trainer.accelerator=cpu",
            "trainer.enable_progress_bar=false",
            f"out={out}",
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        results[name] = json.loads(out.read_text())
    assert results["ckpt"]["num_samples"] == 64 and results["ckpt"] == results["export"]


def test_serve_builds_from_exports(exports):
    """eval/serve.py's build_app on exported files (no server started)."""
    import os

    from omegaconf import OmegaConf

    from helpers.scripts import REPO_ROOT, load_script

    cfg = OmegaConf.load(os.path.join(REPO_ROOT, "conf", "serve.yaml"))
    cfg.pop("hydra"), cfg.pop("defaults")
    cfg = OmegaConf.merge(
        cfg,
        OmegaConf.from_dotlist(
            [
                f"ckpt.clip={exports['clip']}",
                f"ckpt.prior={exports['prior']}",
                f"ckpt.decoder={exports['decoder']}",
                "device=cpu",
            ]
        ),
    )
    app = load_script("eval", "serve").build_app(cfg)  # serve.py imports no other script
    assert any(getattr(r, "path", "") == "/v1/images/generations" for r in app.routes)
