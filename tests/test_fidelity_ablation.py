"""dalle2.metrics.fidelity.stage_fidelity (the per-stage ablation) and eval/fidelity_ablation.py: an oracle decoder
scores like the real images, an upsampler that is bicubic scores like bicubic, the figures do not depend on the
batch size, the sweep reuses the prior embeddings; the CLI writes JSON + Markdown, and the calibration table."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO_ROOT
from dalle2.metrics.fidelity import SCORE_KEYS, fidelity_table, load_val, stage_fidelity, stage_fidelity_seeds
from dalle2.pipeline import SamplingSettings, StageSettings, UnCLIPPipeline
from helpers.cascade import save_run_dir, tiny_modules

FAST = SamplingSettings(
    prior=StageSettings(steps=2),
    decoder=StageSettings(steps=2, guidance_scale=2.0),
    upsampler=StageSettings(steps=2),
    n_prior_samples=1,
)


@pytest.fixture(scope="module")
def val64(tmp_path_factory):
    from dalle2.data.synthetic import write_shards

    urls = write_shards(tmp_path_factory.mktemp("fid_val"), num_train=1, num_val=12, image_size=64, samples_per_shard=8)
    return urls["val"]


def _oracle_pipeline(val_low: dict, upsampler: bool = True) -> UnCLIPPipeline:
    """A cascade whose decoder returns the val image whose CLIP embedding is nearest (a perfect decoder) and whose
    upsampler (if any) is bicubic."""
    m = tiny_cascade_modules_32()
    ups = [m["upsampler"]] if upsampler else []
    pipe = UnCLIPPipeline(clip=m["clip"], prior=m["prior"], decoder=m["decoder"], upsamplers=ups)
    bank_img = val_low["image"].float()
    bank_emb = pipe.encode_images((bank_img + 1) / 2)

    def oracle(image_embed, **kw):
        return bank_img[(F.normalize(image_embed.float(), dim=-1) @ bank_emb.T).argmax(1)]

    def bicubic(low, **kw):
        return F.interpolate(low.float(), scale_factor=2, mode="bicubic", align_corners=False).clamp(-1, 1)

    pipe.decoder.sample = oracle
    if upsampler:
        pipe.upsamplers[0].upsample = bicubic
    return pipe


def _scores(row: dict) -> dict:
    return {k: row[k] for k in SCORE_KEYS}


def test_stage_rows_oracle_decoder_bicubic_upsampler_and_batch_size(val64):
    val_low, val_high = load_val(val64, image_size=32, num=12), load_val(val64, image_size=64, num=12)
    pipe = _oracle_pipeline(val_low)
    sweep = [{"sampler": "dpmpp_2m", "steps": 3}, {"guidance_scale": 1.0}]
    rows = stage_fidelity(
        pipe, val_low, val_high, settings=FAST, sweep=sweep, sweep_num=5, batch_size=5, log=lambda *a: None
    )
    assert [(r["stage"], r["size"]) for r in rows] == [
        ("real", 32),
        ("real", 64),
        ("a", 32),
        ("b", 64),
        ("b", 64),
        ("c", 32),
        ("d", 64),
        ("d", 64),
        ("sweep", 64),
        ("sweep", 64),
    ]
    by = {(r["stage"], r["what"]): r for r in rows}
    real32, a = rows[0], rows[2]
    assert real32["strict/all"] >= 0.9 and rows[1]["strict/all"] >= 0.9  # the val images: the ceiling
    assert real32["n"] == 12 and real32["strict/all_ci"][0] <= real32["strict/all"] <= real32["strict/all_ci"][1]
    assert _scores(a) == _scores(real32)  # the oracle decoder returns the real images from their embeddings
    assert _scores(by[("b", "(a) + upsampler")]) == _scores(by[("b", "(a) + bicubic")])  # a bicubic "upsampler"
    sweep_rows = rows[-2:]
    assert all(r["n"] == 5 for r in sweep_rows)
    assert sweep_rows[0]["decoder"] == {"steps": 3, "sampler": "dpmpp_2m", "guidance_scale": 2.0, "eta": 0.0}
    assert sweep_rows[1]["decoder"]["guidance_scale"] == 1.0 and sweep_rows[1]["decoder"]["steps"] == 2
    # another batch size, the same figures (each image's noise comes from its index)
    again = stage_fidelity(
        _oracle_pipeline(val_low), val_low, val_high, settings=FAST, batch_size=12, log=lambda *a: None
    )
    assert [_scores(r) for r in again] == [_scores(r) for r in rows[:8]]
    with pytest.raises(ValueError, match="same samples"):
        stage_fidelity(pipe, val_low, load_val(val64, image_size=64, num=6), settings=FAST)
    table = fidelity_table(rows)
    assert table.count("\n") == len(rows) + 1 and "| a | decoder <- true CLIP image embedding | 32 |" in table


def test_a_cascade_without_upsampler_has_no_b_and_its_full_pipeline_is_c(val64):
    """The 64 px demo decoder has no upsampler: (a), (c), and (d) = (c)'s images; the sweep scores decoder samples."""
    val_low = load_val(val64, image_size=32, num=12)
    pipe = _oracle_pipeline(val_low, upsampler=False)
    sweep = [{"guidance_scale": 1.0}]
    rows = stage_fidelity(pipe, val_low, None, settings=FAST, sweep=sweep, sweep_num=5, log=lambda *a: None)
    assert [(r["stage"], r["size"]) for r in rows] == [("real", 32), ("a", 32), ("c", 32), ("d", 32), ("sweep", 32)]
    assert _scores(rows[1]) == _scores(rows[0])  # the oracle decoder
    assert _scores(rows[3]) == _scores(rows[2]) and rows[3]["what"] == "full pipeline = (c) (no upsampler)"
    assert rows[4]["strict/all"] == rows[4]["decoder_strict"]  # nothing after the decoder
    with pytest.raises(ValueError, match="exactly when the pipeline has an upsampler"):
        stage_fidelity(pipe, val_low, load_val(val64, image_size=64, num=12), settings=FAST)


def test_seeds_are_merged_with_an_interval_over_all_pictures(val64):
    """stage_fidelity_seeds: one row per stage, n = pictures x seeds, strict/all the mean of the seeds' figures with
    a bootstrap interval around it; the oracle decoder gives every seed the real images' figures."""
    val_low = load_val(val64, image_size=32, num=8)
    pipe = _oracle_pipeline(val_low, upsampler=False)
    rows = stage_fidelity_seeds(pipe, val_low, None, settings=FAST, seeds=(0, 1, 2), log=lambda *a: None)
    assert [r["stage"] for r in rows] == ["real", "a", "c", "d"]
    for r in rows:
        assert r["n"] == 24 and r["seeds"] == [0, 1, 2] and len(r["per_seed"]) == 3
        assert r["strict/all_ci"][0] <= r["strict/all"] <= r["strict/all_ci"][1]
        assert not any(k.startswith("_") for k in r)  # no per-image arrays in what goes to JSON
    assert rows[1]["per_seed"] == [rows[0]["strict/all"]] * 3
    with pytest.raises(ValueError, match="at least one seed"):
        stage_fidelity_seeds(pipe, val_low, None, settings=FAST, seeds=())


@pytest.mark.slow
def test_cli_run_and_calibrate_write_json_and_markdown(val64, tmp_path):
    run_dir = save_run_dir(tmp_path / "run", tiny_cascade_modules_32())
    out, md = tmp_path / "abl.json", tmp_path / "abl.md"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [
        sys.executable,
        "eval/fidelity_ablation.py",
        "run",
        "--run-dir",
        str(run_dir),
        "--val",
        val64,
        "--seeds",
        "0",
        "1",
        "2",
        "--num",
        "6",
        "--batch-size",
        "4",
        "--prior-steps",
        "2",
        "--decoder-steps",
        "2",
        "--upsampler-steps",
        "2",
        "--sweep",
        "--sweep-num",
        "3",
        "--samplers",
        "ddim",
        "--steps-list",
        "2",
        "--guidance-list",
        "3",
        "--out",
        str(out),
        "--md",
        str(md),
    ]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text())
    result = record["figures"]  # dalle2.results.write_result: the figures and what made them
    assert record["seeds"] == [0, 1, 2] and record["split"] is None and set(record["checkpoints"]) >= {"decoder"}
    assert result["num"] == 6 and result["settings"]["decoder"]["steps"] == 2
    assert all(r["seeds"] == [0, 1, 2] and r["n"] == 3 * (3 if r["stage"] == "sweep" else 6) for r in result["rows"])
    assert [r["stage"] for r in result["rows"]] == ["real", "real", "a", "b", "b", "c", "d", "d", "sweep"]
    assert md.read_text().startswith("| stage | what |")
    missing = subprocess.run(
        [sys.executable, "eval/fidelity_ablation.py", "run", "--run-dir", str(tmp_path / "none")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert missing.returncode != 0 and "no clip checkpoint" in missing.stderr
    cal = tmp_path / "cal.json"
    args = ["calibrate", "--num", "4", "--num-val", "4", "--sizes", "32", "--seeds", "0", "--out", str(cal)]
    proc = subprocess.run(
        [sys.executable, "eval/fidelity_ablation.py", *args, "--cases", "clean", "two_objects"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(cal.read_text())
    assert record["split"] == "test" and record["figures"]["chosen_on_val"]["edge_width"]["measurement"] == "edge_width"
    rows = {r["case"]: r for r in record["figures"]["rows"]}
    assert set(rows) == {"clean", "two_objects"} and rows["two_objects"]["strict/all"] == 0.0
    assert rows["two_objects"]["strict/one_object"] == 0.0 and rows["clean"]["strict/one_object"] == 1.0


def tiny_cascade_modules_32() -> dict:
    """The tiny random cascade at the built-in data's sizes (32 px decoder, 32 -> 64 upsampler), no text decoder."""
    torch.manual_seed(0)
    return tiny_modules(image_size=32, use_text=False)
