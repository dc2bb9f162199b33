"""train/train_all.py: override plumbing (fast), and the whole stack for a few steps per stage on the tiny built-in
shards, every artefact read back, then a rerun that skips finished stages (slow)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO_ROOT
from helpers.scripts import compose_conf


def load_script(name: str):
    """train/<name>.py as a module (by path: `train` is not a package, and train/train.py shadows the name)."""
    spec = importlib.util.spec_from_file_location(
        f"_dalle2_script_{name}", os.path.join(REPO_ROOT, "train", f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


train_all = load_script("train_all")
write_report = load_script("demo_report").write_report
STAGES, flatten, format_value = train_all.STAGES, train_all.flatten, train_all.format_value
mirrored_urls, overrides, run, stage_override_argv = (
    train_all.mirrored_urls,
    train_all.overrides,
    train_all.run,
    train_all.stage_override_argv,
)


def compose(overrides_: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=os.path.join(REPO_ROOT, "conf", "train_all"), version_base="1.3"):
        return hydra_compose("config", overrides=stage_override_argv(overrides_))


# ------------------------------------------------------------------------------------------------ fast


def test_format_value_is_hydra_override_grammar():
    assert format_value(None) == "null" and format_value(True) == "true" and format_value(3) == "3"
    assert format_value(1e-3) == "0.001"
    assert format_value("clip_tiny") == "clip_tiny"
    assert format_value("/d/{00000..00015}.tar") == "'/d/{00000..00015}.tar'"
    assert format_value("it's") == "'it\\'s'"
    assert format_value(["/a.ckpt", "b"]) == "[/a.ckpt,b]"
    # the quoted forms parse back to the same values in Hydra's override parser
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for v in ["/d/{00000..00015}.tar", "it's", "a b,c", "x=y", "/a.ckpt"]:
        assert parser.parse_override(f"k={format_value(v)}").value() == v
    assert parser.parse_override(f"k={format_value(['/a.ckpt', 'b c'])}").value() == ["/a.ckpt", "b c"]


def test_flatten_and_stage_overrides_win():
    section = {
        "experiment": "clip_tiny",
        "trainer": {"max_steps": 5, "val_check_interval": 2},
        "data.train_urls": "mine.tar",
        "callbacks": {},
    }
    assert flatten(section) == {
        "experiment": "clip_tiny",
        "trainer.max_steps": 5,
        "trainer.val_check_interval": 2,
        "data.train_urls": "mine.tar",
        "callbacks": {},
    }
    out = overrides({"data.train_urls": "shared.tar", "hydra.run.dir": "/o/clip"}, section)
    assert out[:2] == ["++data.train_urls=mine.tar", "hydra.run.dir=/o/clip"]
    assert "++trainer.max_steps=5" in out and "experiment=clip_tiny" in out and "callbacks={}" in out


def test_a_stage_section_can_add_keys_its_config_lacks():
    # swapping a stage's scheduler needs that scheduler's own arguments (keys the stage config does not have)
    section = {
        "experiment": "decoder_tiny",
        "scheduler": {"_target_": "dalle2.lit.optim.warmup_cosine", "total_steps": 100},
        "trainer": {"max_steps": 100},
    }
    cfg = compose_conf("config", overrides({"clip_ckpt": "c.ckpt"}, section))
    assert cfg.scheduler._target_ == "dalle2.lit.optim.warmup_cosine"
    assert cfg.scheduler.total_steps == 100 and cfg.scheduler.warmup_steps == 50
    assert cfg.trainer.max_steps == 100 and cfg.clip_ckpt == "c.ckpt"


def test_cli_stage_overrides_become_stage_settings():
    assert stage_override_argv(["clip.trainer.max_steps=3", "out_dir=x", "+prior.a=1", "data.val_urls=v"]) == [
        "++clip.trainer.max_steps=3",
        "out_dir=x",
        "+prior.a=1",
        "data.val_urls=v",
    ]
    assert stage_override_argv(["clip.model=clip/vit_b32", "clip.model.embed_dim=64", "sample.trainer=x"]) == [
        "++clip.groups.model=clip/vit_b32",
        "++clip.model.embed_dim=64",
        "++sample.trainer=x",
    ]
    cfg = compose(
        [
            "experiment=demo",
            "out_dir=/tmp/x",
            "clip.trainer.max_steps=7",
            "decoder.module.use_text=true",
            "decoder.trainer=gpu",
            "stages=[clip,decoder]",
        ]
    )
    assert cfg.clip.trainer.max_steps == 7 and cfg.clip.trainer.val_check_interval == 200  # demo's value kept
    assert cfg.decoder.module.use_text is True and cfg.decoder.groups.trainer == "gpu"
    argv = train_all.Plan(cfg).build("decoder").commands[0]
    demo_steps = cfg.decoder.trainer.max_steps  # conf/train_all/experiment/demo.yaml's, passed through
    assert (
        "trainer=gpu" in argv
        and f"++trainer.max_steps={demo_steps}" in argv
        and "experiment=decoder_tiny64_lite" in argv
    )
    assert list(cfg.stages) == ["clip", "decoder"]


def test_embedding_urls_mirror_the_input_shards(tmp_path):
    (tmp_path / "a").mkdir()
    for n in ("00000.tar", "00001.tar"):
        (tmp_path / "a" / n).write_bytes(b"")
    assert mirrored_urls("/d/{00000..00015}.tar", tmp_path / "e") == str(tmp_path / "e" / "{00000..00015}.tar")
    both = f"{tmp_path}/a/00000.tar::{tmp_path}/a/00001.tar"
    assert mirrored_urls(both, tmp_path / "e") == f"{tmp_path}/e/00000.tar::{tmp_path}/e/00001.tar"


def test_dry_run_plans_every_stage_with_the_right_inputs(tmp_path, capsys):
    cfg = compose(
        [
            "experiment=demo_cascade",
            f"out_dir={tmp_path}",
            "dry_run=true",
            "report=false",
            "data.train_urls='/d/train/{00000..00003}.tar'",
            "data.val_urls=/d/val/00000.tar",
        ]
    )
    summary = run(cfg)
    assert [s for s in STAGES if summary[s]["status"] == "would run"] == list(STAGES)
    assert "train/train.py" in capsys.readouterr().out
    assert not (tmp_path / "clip").exists()
    plan = train_all.Plan(cfg)
    argv = {s: plan.build(s).commands for s in STAGES}
    assert len(argv["embeddings"]) == 2 and all(len(argv[s]) == 1 for s in STAGES if s != "embeddings")
    emb = f"data.train_urls='{tmp_path}/embeddings/train/{{00000..00003}}.tar'"
    assert emb in argv["prior"][0] and emb in argv["decoder"][0] and "data.load_embeddings=true" in argv["decoder"][0]
    assert "data.train_urls='/d/train/{00000..00003}.tar'" in argv["clip"][0] + argv["upsampler"][0]
    assert "++trainer.max_steps=600" in argv["clip"][0] and "experiment=decoder_tiny" in argv["decoder"][0]
    assert f"out_dir={tmp_path}/embeddings/val" in argv["embeddings"][1]
    assert f"ckpt.upsamplers=[{tmp_path}/upsampler/checkpoints/last.ckpt]" in argv["sample"][0]
    assert "task=samples" in argv["evaluate"][0] and f"samples={tmp_path}/sample" in argv["evaluate"][0]


def test_the_clip_score_comes_from_an_independent_clip(tmp_path):
    """score_clip: another seed on the other half of the train shards (the generator's CLIP trains on the first
    half), and evaluate scores with it; without the stage the generator's CLIP trains on every shard and scores; a
    given CLIP file is used as is."""
    base = [f"out_dir={tmp_path}", "dry_run=true", "report=false", "data.train_urls='/d/train/{00000..00003}.tar'"]
    plan = train_all.Plan(compose(base))
    clip, score, evaluate = (" ".join(plan.build(s).commands[0]) for s in ("clip", "score_clip", "evaluate"))
    assert "data.train_urls=/d/train/00000.tar::/d/train/00001.tar" in clip
    assert "data.train_urls=/d/train/00002.tar::/d/train/00003.tar" in score
    assert "++seed=1" in score and "experiment=clip_tiny" in score and "seed" not in clip
    assert f"clip_score.ckpt={tmp_path}/score_clip/checkpoints/last.ckpt" in evaluate
    plan = train_all.Plan(compose([*base, "stages=[clip,sample,evaluate]"]))
    assert "data.train_urls='/d/train/{00000..00003}.tar'" in plan.build("clip").commands[0]
    assert "clip_score.ckpt" not in " ".join(plan.build("evaluate").commands[0])
    plan = train_all.Plan(compose([*base, "ckpt.score_clip=/m/ViT-B-32.pt"]))
    assert "clip_score.ckpt=/m/ViT-B-32.pt" in plan.build("evaluate").commands[0]
    assert "data.train_urls='/d/train/{00000..00003}.tar'" in plan.build("clip").commands[0]
    with pytest.raises(SystemExit, match="score_clip trains on half of the train shards"):
        train_all.Plan(compose([*base, "data.train_urls=/d/train/0.tar"])).build("clip")


def test_reported_figures_use_the_test_split_and_val_is_for_choosing(tmp_path):
    """Choose on val, report on test: sample prompts, the evaluation's reference and retrieval read the test shards
    (report_split=test, the default); report_split=val switches them while choosing; training still validates on val."""
    base = [f"out_dir={tmp_path}", "dry_run=true", "report=false", "data.val_urls=/d/val/0.tar"]
    plan = train_all.Plan(compose([*base, "data.test_urls=/d/test/0.tar"]))
    assert "reference.urls=/d/test/0.tar" in plan.build("evaluate").commands[0]
    assert "data.urls=/d/test/0.tar" in plan.build("retrieval").commands[0]
    assert plan.report_urls() == "/d/test/0.tar" and "data.val_urls=/d/val/0.tar" in plan.build("clip").commands[0]
    plan = train_all.Plan(compose([*base, "data.test_urls=/d/test/0.tar", "report_split=val"]))
    assert "reference.urls=/d/val/0.tar" in plan.build("evaluate").commands[0]
    with pytest.raises(SystemExit, match="data.test_urls is not set"):
        train_all.Plan(compose([*base, "data.test_urls=null"])).build("evaluate")
    with pytest.raises(SystemExit, match="report_split must be val or test"):
        train_all.Plan(compose([*base, "report_split=train"])).build("evaluate")


@pytest.mark.parametrize(
    "experiment, decoder_experiment, clip_precision, cascade",
    [("demo", "decoder_tiny64_lite", "bf16-mixed-if-native", True), ("demo64", "decoder_tiny64", None, False)],
)
def test_demos_plan_a_64_px_decoder_and_the_demo_the_64_to_256_upsampler(
    tmp_path, experiment, decoder_experiment, clip_precision, cascade
):
    """demo: the lighter bf16 decoder for 4500 steps, CLIP in bf16 too, then the 64 -> 256 SR sampled by its mean
    (steps 0); demo64: the fp32 reference, stopping the cascade at the decoder."""
    cfg = compose([f"experiment={experiment}", f"out_dir={tmp_path}", "dry_run=true", "report=false"])
    summary = run(cfg)
    assert [s for s in STAGES if summary.get(s, {}).get("status") == "would run"] == [
        s for s in STAGES if cascade or s != "upsampler"
    ]  # score_clip included: the CLIP score comes from an independent CLIP
    plan = train_all.Plan(cfg)
    decoder, clip = plan.build("decoder").commands[0], plan.build("clip").commands[0]
    assert f"experiment={decoder_experiment}" in decoder and "++trainer.max_steps=4500" in decoder
    assert "++trainer.max_steps=600" in clip
    assert [a for a in clip if "precision" in a] == (
        [f"++trainer.precision={clip_precision}"] if clip_precision else []
    )
    sample = plan.build("sample").commands[0]
    if cascade:
        assert "experiment=upsampler_64_256" in plan.build("upsampler").commands[0]
        assert "ckpt.upsamplers=[]" not in sample and any("steps.upsampler=0" in a for a in sample)
    else:
        assert "ckpt.upsamplers=[]" in sample


def test_unknown_stage_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="unknown stages.*'decodr'"):
        run(compose([f"out_dir={tmp_path}", "stages=[clip,decodr]", "dry_run=true"]))
    with pytest.raises(SystemExit, match="force names unknown"):
        run(compose([f"out_dir={tmp_path}", "force=[priorr]", "dry_run=true"]))


# ------------------------------------------------------------------------------------------------ slow


def tiny_overrides(builtin_shards, out_dir) -> list[str]:
    few = [
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "trainer.limit_val_batches=1",
        "trainer.enable_progress_bar=false",
        "data.num_workers=0",
    ]
    diffusion = [
        "module.sample_every_n_steps=2",
        "callbacks.sample_grid.steps=2",
        "callbacks.sample_grid.num_samples=4",
    ]
    stage = lambda s, xs: [f"{s}.{x}" for x in xs]  # noqa: E731
    return [
        f"out_dir={out_dir}",
        f"data.train_urls='{builtin_shards['train']}'",
        f"data.val_urls='{builtin_shards['val']}'",
        f"data.test_urls='{builtin_shards['test']}'",
        "prompts.num=4",
        # bf16-mixed-if-native (the demo's): resolved by train.py to bf16-mixed or 32-true, either trains
        *stage("clip", few + ["data.batch_size=16", "trainer.precision=bf16-mixed-if-native"]),
        *stage("retrieval", ["data.num_workers=0", "trainer.enable_progress_bar=false"]),
        *stage("prior", few + ["data.batch_size=16", "module.val_sample_steps=2"]),
        *stage("decoder", few + diffusion + ["data.batch_size=8"]),
        *stage("upsampler", few + diffusion + ["data.batch_size=4"]),
        *stage(
            "sample",
            [
                "steps.prior=2",
                "steps.decoder=2",
                "steps.upsampler=2",
                "batch_size=4",
                "trainer.enable_progress_bar=false",
            ],
        ),
        *stage("score_clip", few + ["data.batch_size=16"]),
        *stage(
            "evaluate",
            [
                "reference.max_samples=16",
                "data.batch_size=16",
                "data.num_workers=0",
                "trainer.enable_progress_bar=false",
            ],
        ),
    ]


@pytest.mark.slow
def test_whole_stack_few_steps_every_artefact_then_rerun_skips(builtin_shards64, tmp_path):
    out = tmp_path / "demo"
    args = tiny_overrides(builtin_shards64, out)
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, OMP_NUM_THREADS="1", WANDB_MODE="offline")
    proc = subprocess.run(
        [sys.executable, "train/train_all.py", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # every stage finished, with its wall time
    for s in STAGES:
        done = json.loads((out / s / "DONE.json").read_text())
        assert done["stage"] == s and done["wall_s"] > 0 and done["commands"]
    # checkpoints load as their stage's module
    from dalle2.lit.clip_module import load_clip
    from dalle2.lit.decoder_module import DecoderModule, UpsamplerModule
    from dalle2.lit.prior_module import load_prior

    assert load_clip(str(out / "clip/checkpoints/last.ckpt")).model.embed_dim == 128
    assert load_prior(str(out / "prior/checkpoints/last.ckpt")).embed_dim == 128
    DecoderModule.load_from_checkpoint(str(out / "decoder/checkpoints/last.ckpt"), map_location="cpu")
    UpsamplerModule.load_from_checkpoint(str(out / "upsampler/checkpoints/last.ckpt"), map_location="cpu")
    # embedding shards: one per input shard, each sample with its embeddings
    from dalle2.data.webdataset import expand_urls, iter_raw_samples

    for split in ("train", "val"):
        names = sorted(Path(u).name for u in expand_urls(builtin_shards64[split]))
        assert sorted(p.name for p in (out / "embeddings" / split).glob("*.tar")) == names
    first = next(iter_raw_samples(str(sorted((out / "embeddings/val").glob("*.tar"))[0])))
    assert {"img_emb.npy", "txt_emb.npy", "txt_tokens.npy"} <= set(first)
    # samples: 4 prompts from the val captions, one 64 px PNG each (decoder 32 px -> upsampler), manifest, grid
    prompts = (out / "sample/prompts.txt").read_text().splitlines()
    assert len(prompts) == 4 and all(prompts)
    manifest = [json.loads(x) for x in (out / "sample/manifest.jsonl").read_text().splitlines()]
    assert [m["prompt"] for m in manifest] == prompts
    for m in manifest:
        assert np.asarray(Image.open(out / "sample" / m["file"])).shape == (64, 64, 3)
    Image.open(out / "sample/grid.png").verify()
    # metrics
    retrieval = json.loads((out / "retrieval/metrics.json").read_text())
    assert 0.0 <= retrieval["image_to_text_R@1"] <= 1.0
    evaluation = json.loads((out / "evaluate/metrics.json").read_text())
    assert evaluation and json.dumps(evaluation)
    # the CLIP score comes from the independent scoring CLIP, and the report says so beside the real images' score
    assert evaluation["clip_score_clip"]["path"] == str(out / "score_clip/checkpoints/last.ckpt")
    assert evaluation["reference_clip_score"] is not None
    # report and its plots
    report = (out / "report.md").read_text()
    assert "Wall time per stage" in report and "sample/grid.png" in report and "not run" not in report.split("##")[2]
    assert "(real images: " in report and "scored by an independent CLIP (stage score_clip" in report
    for stage in ("clip", "prior", "decoder", "upsampler"):
        assert f"report/loss_{stage}.png" in report
        Image.open(out / "report" / f"loss_{stage}.png").verify()
    Image.open(out / "report/prior_cosine.png").verify()
    assert (out / "report.html").read_text().count("<img") >= 6

    # rerun: every stage is skipped (no process started), the report is rewritten
    stamps = {s: (out / s / "DONE.json").stat().st_mtime_ns for s in STAGES}
    summary = run(compose(args))
    assert {s: v["status"] for s, v in summary.items()} == {s: "skipped" for s in STAGES}
    assert stamps == {s: (out / s / "DONE.json").stat().st_mtime_ns for s in STAGES}
    # forcing one stage reruns it and what uses its output, nothing else
    summary = run(compose([*args, "force=[upsampler]", "dry_run=true"]))
    rerun = [s for s in STAGES if summary[s]["status"] == "would run"]
    assert rerun == ["upsampler", "sample", "evaluate"]
    summary = run(compose([*args, "force=[clip]", "dry_run=true"]))  # the scoring CLIP is independent of it
    assert [s for s in STAGES if summary[s]["status"] == "skipped"] == ["upsampler", "score_clip"]
    # a stage killed before its DONE.json resumes from its last.ckpt (here: already at max_steps, so no new steps)
    (out / "upsampler" / "DONE.json").unlink()
    summary = run(compose([*args, "stages=[upsampler]", "report=false"]))
    done = json.loads((out / "upsampler" / "DONE.json").read_text())
    assert summary["upsampler"]["status"] == "ran" and done["resumed"] is True
    assert not any("ckpt_path" in a for a in done["commands"][0])  # recorded as the plain command


def test_report_says_not_run_for_missing_pieces(tmp_path):
    (tmp_path / "clip" / "csv").mkdir(parents=True)
    (tmp_path / "clip" / "csv" / "metrics.csv").write_text(
        "epoch,step,train/loss,val/loss\n0,9,4.5,\n0,19,4.0,\n0,19,,3.9\n"
    )
    (tmp_path / "clip" / "DONE.json").write_text(json.dumps({"stage": "clip", "wall_s": 61.0}))
    md = write_report(tmp_path).read_text()
    assert "1 min 01 s" in md and "not run" in md
    assert "report/loss_clip.png" in md and (tmp_path / "report/loss_clip.png").is_file()
    assert (tmp_path / "report.html").is_file()


def test_report_counts_every_attempt_of_a_resumed_stage(tmp_path):
    (tmp_path / "decoder").mkdir()
    attempts = [
        {"wall_s": 2760.0, "cpu_s": 5000.0, "ended": "killed"},
        {"wall_s": 1200.0, "cpu_s": 2200.0, "ended": "finished"},
    ]
    done = {"stage": "decoder", "wall_s": 3960.0, "cpu_s": 7200.0, "attempts": attempts}
    (tmp_path / "decoder" / "DONE.json").write_text(json.dumps(done))
    md = write_report(tmp_path).read_text()
    assert "| decoder | 66 min 00 s | 120 min 00 s | 2 (killed, finished) |" in md


def test_report_checks_generated_images_against_their_prompts(tmp_path):
    """Without evaluate/metrics.json the report scores the samples itself with the built-in attribute checker."""
    from dalle2.data.synthetic import make_caption, render, sample_attributes

    rng = np.random.default_rng(0)
    sample = tmp_path / "sample"
    sample.mkdir()
    with (sample / "manifest.jsonl").open("w") as f:
        for i in range(6):
            attrs = sample_attributes(rng)
            img = render(attrs, 64, rng)
            if i == 5:  # one image that does not follow its prompt
                img = np.zeros_like(img)
            Image.fromarray(img).save(sample / f"{i:05d}.png")
            f.write(json.dumps({"file": f"{i:05d}.png", "prompt": make_caption(attrs, rng)}) + "\n")
    md = write_report(tmp_path).read_text()
    assert "all attributes right 83.3 %" in md
    # strict/all is the headline, with its bootstrap interval over the 6 images (5 right, 1 blank)
    assert "(strict/all: every attribute judged strictly, docs/checker.md): 83.3 % [" in md and "(n=6, 1 seed)" in md
    assert "| strict/all | 83.3 % |" in md and "| strict/shape |" in md and "| strict/sharp |" in md


def test_printed_commands_paste_back_into_a_shell():
    import shlex

    argv = ["python", "x.py", "data.urls='/d/{0..9}.tar'", "ckpt.upsamplers=[/a/b.ckpt]", "k=$HOME", "p=a b", 'q=it"s']
    line = train_all.shell_join(argv)
    assert shlex.split(line) == argv and "\"data.urls='/d/{0..9}.tar'\"" in line


def test_given_checkpoints_replace_their_stages(tmp_path):
    cfg = compose(
        [
            "experiment=demo",
            f"out_dir={tmp_path}",
            "dry_run=true",
            "report=false",
            "ckpt.clip=/w/clip.ckpt",
            "ckpt.decoder=/w/dec.ckpt",
            "stages=[clip,embeddings,decoder,sample]",
        ]
    )
    summary = run(cfg)
    assert {s: v["status"] for s, v in summary.items()} == {
        "clip": "given",
        "embeddings": "would run",
        "decoder": "given",
        "sample": "would run",
    }
    argv = train_all.Plan(cfg).build("sample").commands[0]
    assert "ckpt.clip=/w/clip.ckpt" in argv and "ckpt.decoder=/w/dec.ckpt" in argv
    assert "ckpt.upsamplers=[]" in argv  # no upsampler trained, listed or given: the cascade stops at the decoder
    assert "clip_ckpt=/w/clip.ckpt" in train_all.Plan(cfg).build("embeddings").commands[0]


def test_train_groups_are_the_config_groups_of_train_py():
    conf = Path(REPO_ROOT) / "conf"
    not_train = ("train_all", "hydra", "predict", "sampling_preset")  # sampling_preset: sample/coco_fid/serve's
    groups = {p.name for p in conf.iterdir() if p.is_dir() and p.name not in not_train} | {"model"}
    assert set(train_all.TRAIN_GROUPS) == groups


def test_train_all_killed_mid_stage_then_resumed_keeps_the_metrics_history_and_the_cost(builtin_shards, tmp_path):
    """The reproduced case, with a real kill -9 of train_all and its stage (the whole process group) once the stage
    has saved a checkpoint: the rerun resumes it, and its metrics.csv holds every step once (Lightning's CSVLogger
    deleted the file on resume, so the curve began at the checkpoint), and DONE.json counts both attempts' time."""
    import csv
    import signal
    import time

    import torch

    from helpers.tiny_runs import _TINY

    n, k = 64, 4  # many steps after the first checkpoint: the kill lands mid-stage even on a loaded machine
    out = tmp_path / "run"
    args = [
        f"out_dir={out}",
        f"data.train_urls='{builtin_shards['train']}'",
        f"data.val_urls='{builtin_shards['val']}'",
        "stages=[clip]",
        "report=false",
        "heartbeat_s=0.5",
        *(f"clip.{x}" for x in _TINY["clip"][1:]),
        *(
            f"clip.{x}"
            for x in [
                f"trainer.max_steps={n}",
                f"callbacks.model_checkpoint.every_n_train_steps={k}",
                "trainer.limit_val_batches=0",
                "trainer.log_every_n_steps=1",
                "trainer.enable_progress_bar=false",
                "data.batch_size=8",
                "data.num_workers=0",
                "logger=csv",
            ]
        ),
    ]
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, OMP_NUM_THREADS="1", WANDB_MODE="offline")
    cmd = [sys.executable, "train/train_all.py", *args]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, start_new_session=True, stdout=subprocess.DEVNULL)
    last, metrics, started = (out / "clip" / p for p in ("checkpoints/last.ckpt", "csv/metrics.csv", "STARTED.json"))

    def steps(path):
        with open(path) as f:
            return [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]

    deadline = time.time() + 400
    try:
        while proc.poll() is None and time.time() < deadline:
            if last.exists() and metrics.exists() and started.exists():
                saved = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
                beat = json.loads(started.read_text())["attempts"][-1]["wall_s"]
                try:
                    if max(steps(metrics), default=-1) >= saved - 1 and beat > 0:
                        break
                except ValueError:  # a row being appended, read half-written
                    pass
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # train_all and its stage at once
        proc.wait(timeout=30)
    killed_at = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    assert k <= killed_at < n and not (out / "clip" / "DONE.json").exists()
    dead_rows = steps(metrics)

    again = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    # from the newest checkpoint of the stage's run (last.ckpt, or a step_*.ckpt written after it when the kill fell
    # between the two saves)
    assert f"resuming from {last.parent}/" in again.stdout
    rows = steps(metrics)
    assert rows == list(range(n)), (killed_at, dead_rows, rows)  # every step, once, in order
    done = json.loads((out / "clip" / "DONE.json").read_text())
    assert [a["ended"] for a in done["attempts"]] == ["killed", "finished"]
    first, second = done["attempts"]
    assert first["wall_s"] > 0 and first["cpu_s"] > 0 and second["wall_s"] > 0
    assert done["wall_s"] == pytest.approx(first["wall_s"] + second["wall_s"], abs=0.02)
    assert done["cpu_s"] == pytest.approx(first["cpu_s"] + second["cpu_s"], abs=0.02)
