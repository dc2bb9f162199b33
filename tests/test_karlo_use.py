"""A converted Karlo directory used as a whole: UnCLIPPipeline.from_dir with Karlo's own sampling settings,
eval/sample.py / eval/coco_fid.py / eval/serve.py with pipeline=DIR (and the Karlo preset), and fine-tuning each
stage from the converted weights with train/train.py init_from= (EMA starting from them; resume; 2-process DDP and
FSDP)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from dalle2.pipeline import SamplingSettings, UnCLIPPipeline  # noqa: E402
from helpers.cascade import build_tiny_checkpoints  # noqa: E402
from helpers.karlo import write_karlo_shards  # noqa: E402
from helpers.scripts import compose_conf, load_script  # noqa: E402
from helpers.tiny_runs import run  # noqa: E402

FAST = ["steps.prior=3", "steps.decoder=3", "steps.upsampler=2"]


def test_from_dir_loads_the_cascade_with_karlo_settings(tiny_karlo):
    pipe = UnCLIPPipeline.from_dir(str(tiny_karlo["out"]))
    st = pipe.default_settings
    assert (st.prior.sampler, st.decoder.sampler, st.upsampler.sampler) == ("unclip",) * 3
    assert (st.prior.guidance_scale, st.decoder.guidance_scale, st.n_prior_samples) == (4.0, 8.0, 1)
    fast = SamplingSettings.from_overrides(steps={"prior": 3, "decoder": 3, "upsampler": 2}, base=st)
    assert fast.decoder.guidance_scale == 8.0 and fast.upsampler_aug_level == 0  # overrides keep the rest
    a = pipe(["a red cube", "a blue ball"], seed=1, settings=fast)
    b = pipe(["a blue ball"], seed=1, indices=[1], settings=fast)
    assert a.shape == (2, 3, 16, 16) and torch.isfinite(a).all()
    assert (a[1:] - b).abs().max() < 1e-4  # per-image noise streams: batch mates do not matter
    with pytest.raises(ValueError, match="no image tower"):
        pipe.variations(a[:1], settings=fast)


def test_sample_script_takes_a_pipeline_dir(tiny_karlo, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\n\na green cone\n")
    out = tmp_path / "samples"
    cfg = compose_conf("sample", [f"pipeline={tiny_karlo['out']}", f"prompts={prompts}", f"out_dir={out}", *FAST])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_script("eval", "sample").run(cfg)
    assert {p.name for p in out.glob("*.png")} == {"00000.png", "00002.png", "grid.png"}
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    settings = rows[0]["settings"]
    assert settings["decoder"] == {"steps": 3, "sampler": "unclip", "guidance_scale": 8.0, "eta": 0.0}
    assert rows[0]["ckpt"]["prior"].endswith("prior.safetensors")
    with pytest.raises(SystemExit, match="give pipeline=DIR"):
        load_script("eval", "sample").run(compose_conf("sample", [f"prompts={prompts}", f"out_dir={out}"]))


def _fake_coco(root: Path) -> dict:
    rng = np.random.default_rng(0)
    (root / "val2014").mkdir(parents=True)
    images, anns = [], []
    for j in range(4):
        name = f"COCO_val2014_{j:012d}.jpg"
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / "val2014" / name)
        images.append({"id": j, "file_name": name})
        anns.append({"image_id": j, "id": 10 + j, "caption": f"a picture number {j}"})
    (root / "captions.json").write_text(json.dumps({"images": images, "annotations": anns}))
    return {"captions": root / "captions.json", "images": root / "val2014"}


def test_coco_fid_with_the_karlo_preset(tiny_karlo, tmp_path):
    preset = compose_conf("coco", ["sampling_preset=karlo", "captions=x", "images=y", "out=z"])
    assert dict(preset.steps) == {"prior": 25, "decoder": 50, "upsampler": 7}
    assert dict(preset.guidance) == {"prior": 4.0, "decoder": 8.0, "upsampler": None}
    coco = _fake_coco(tmp_path / "coco")
    (tmp_path / "ckpts").mkdir()
    clip_ckpt = build_tiny_checkpoints(tmp_path / "ckpts")["clip"]  # a CLIP with an image tower, for the score
    args = [
        f"captions={coco['captions']}",
        f"images={coco['images']}",
        "n=3",
        f"out={tmp_path / 'out'}",
        f"pipeline={tiny_karlo['out']}",
        "sampling_preset=karlo",
        *FAST,
        "batch_size=3",
        "eval.num_workers=0",
    ]
    script = load_script("eval", "coco_fid")
    with pytest.raises(SystemExit, match="clip_score.ckpt="):  # the converted CLIP is a text tower only
        script.run(compose_conf("coco", args))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = script.run(compose_conf("coco", [*args, f"clip_score.ckpt={clip_ckpt}", "force=true"]))
    assert result["sampling"]["decoder"]["sampler"] == "unclip" and result["sampling"]["decoder"]["guidance_scale"] == 8
    assert np.isfinite(result["clip_score"]) and len(list((tmp_path / "out" / "samples").glob("0*.png"))) == 3


def test_serve_takes_a_pipeline_dir(tiny_karlo):
    from fastapi.testclient import TestClient

    cfg = compose_conf("serve", [f"pipeline={tiny_karlo['out']}", "device=cpu", *FAST])
    app = load_script("eval", "serve").build_app(cfg)
    with TestClient(app) as tc:
        r = tc.post("/v1/images/generations", json={"prompt": "a red cube", "n": 1, "size": "16x16"})
        assert r.status_code == 200, r.text
        assert len(r.json()["data"]) == 1


def _finetune_cmd(stage: str, tiny_karlo, shards: str, run_dir, *extra):
    import sys

    return [
        sys.executable,
        "train/train.py",
        f"stage={stage}",
        f"init_from={Path(tiny_karlo['out']) / f'{stage}.safetensors'}",
        "data=embeddings",
        f"data.train_urls='{shards}'",
        "data.val_urls=null",
        "data.batch_size=4",
        "data.num_workers=0",
        "data.epoch_size=16",
        "trainer=cpu",
        "trainer.limit_val_batches=0",
        "trainer.enable_progress_bar=false",
        "logger=csv",
        "optimizer.lr=1e-3",
        "module.ema_decay=0.5",
        f"hydra.run.dir={run_dir}",
        *(["~callbacks.sample_grid"] if stage != "prior" else []),
        *extra,
    ]


def _weights(path) -> dict:
    from dalle2.checkpoint import read_stage

    return read_stage(path, None, weights="ema").weights


@pytest.fixture(scope="module")
def karlo_shards(tiny_karlo, tmp_path_factory):
    return write_karlo_shards(tmp_path_factory.mktemp("karlo_shards"), tiny_karlo["out"], image_size=16)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["prior", "decoder", "upsampler"])
def test_finetune_starts_from_the_converted_weights(tiny_karlo, karlo_shards, tmp_path, stage):
    proc = run(_finetune_cmd(stage, tiny_karlo, karlo_shards, tmp_path, "trainer.max_steps=2"), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    init = _weights(Path(tiny_karlo["out"]) / f"{stage}.safetensors")
    ema = _weights(tmp_path / "checkpoints" / "last.ckpt")
    raw = read_raw(tmp_path / "checkpoints" / "last.ckpt")
    assert set(ema) == set(init)
    moved = max(float((raw[k].float() - init[k].float()).abs().max()) for k in init if init[k].is_floating_point())
    assert 0 < moved < 0.1  # trained a little, from the converted weights (a random init is O(1) away)
    drift = max(float((ema[k].float() - init[k].float()).abs().max()) for k in init if init[k].is_floating_point())
    assert drift <= moved + 1e-6  # the EMA started at the converted weights, not at a random init
    stored = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert stored["hyper_parameters"]["network"]["arch"] in ("karlo", "karlo_sr")
    if stage != "upsampler":  # bound to the converted CLIP's vocabulary (the data was tokenized with it)
        assert stored["dalle2_vocabulary"]["pad_id"] == stored["dalle2_vocabulary"]["vocab_size"] - 1


def read_raw(path) -> dict:
    from dalle2.checkpoint import read_stage

    return read_stage(path, None, weights="raw").weights


@pytest.mark.slow
def test_finetune_resumes_and_runs_ddp_and_fsdp(tiny_karlo, karlo_shards, tmp_path):
    first = run(_finetune_cmd("prior", tiny_karlo, karlo_shards, tmp_path / "r", "trainer.max_steps=2"), timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    again = run(
        _finetune_cmd("prior", tiny_karlo, karlo_shards, tmp_path / "r", "trainer.max_steps=4", "ckpt_path=last"),
        timeout=600,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert torch.load(tmp_path / "r" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    ddp = run(
        _finetune_cmd(
            "prior",
            tiny_karlo,
            karlo_shards,
            tmp_path / "ddp",
            "trainer=ddp",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            "trainer.max_steps=2",
        ),
        timeout=600,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert (tmp_path / "ddp" / "checkpoints" / "last.ckpt").exists()
    fsdp_args = ("trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_steps=2")
    fsdp = run(_finetune_cmd("prior", tiny_karlo, karlo_shards, tmp_path / "fsdp", *fsdp_args), timeout=600)
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    sharded = _weights(tmp_path / "fsdp" / "checkpoints" / "last.ckpt")  # a directory of shards, consolidated
    init = _weights(Path(tiny_karlo["out"]) / "prior.safetensors")
    assert set(sharded) == set(init) and float((sharded["pos_embed"] - init["pos_embed"]).abs().max()) < 0.1


def test_init_from_takes_the_files_network_and_refuses_another_stage(tiny_karlo):
    train = load_script("train", "train")
    cfg = compose_conf("config", ["stage=decoder", f"init_from={Path(tiny_karlo['out']) / 'decoder.safetensors'}"])
    found = train.apply_init_from(cfg, False)
    assert found.stage == "decoder" and cfg.module.network.arch == "karlo" and cfg.module.use_text
    assert cfg.data.image_size == cfg.module.image_size == 8 and cfg.module.diffusion.objective == "eps"
    wrong = compose_conf("config", ["stage=decoder", f"init_from={Path(tiny_karlo['out']) / 'prior.safetensors'}"])
    with pytest.raises(SystemExit, match="error: init_from: .*'decoder' checkpoint was expected"):
        train.apply_init_from(wrong, False)
