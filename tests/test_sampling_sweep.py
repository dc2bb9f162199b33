"""A guidance x sampler x steps sweep end to end on the tiny random cascade: one ``eval/sample.py -m`` multirun (each
job samples and scores into its own dir), then ``eval/sweep_gather.py`` writes the CSV, the Markdown table and the
trade-off / steps plots, and ``train/demo_report.py`` shows them."""

from __future__ import annotations

import csv
import json
import sys

import pytest
from PIL import Image

from helpers.cascade import build_tiny_checkpoints
from helpers.tiny_runs import REPO_ROOT, run

sys.path.insert(0, str(REPO_ROOT / "eval"))
import sweep_gather  # noqa: E402

PROMPTS = [
    "a small red circle on the left of a black background",
    "a large blue square in the center of a white background",
    "a small green cross on the right of a gray background",
]
GRID = {"guidance.decoder": ["1", "3"], "sampler.decoder": ["ddim", "dpmpp_2m"], "steps.decoder": ["2", "3"]}


@pytest.fixture(scope="module")
def sweep(builtin_shards, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sampling_sweep")
    (tmp / "ckpts").mkdir()
    ckpts = build_tiny_checkpoints(tmp / "ckpts")
    prompts = tmp / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    sweep_dir = tmp / "multirun"
    cmd = [
        sys.executable,
        "eval/sample.py",
        "-m",
        f"ckpt.clip={ckpts['clip']}",
        f"ckpt.prior={ckpts['prior']}",
        f"ckpt.decoder={ckpts['decoder']}",
        "ckpt.upsamplers=[]",
        f"prompts={prompts}",
        "steps.prior=2",
        "n_prior_samples=1",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        f"score.reference_urls='{builtin_shards['val']}'",
        "score.max_reference=16",
        *(f"{k}={','.join(v)}" for k, v in GRID.items()),
        f"hydra.sweep.dir={sweep_dir}",
    ]
    proc = run(cmd, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sweep_dir, tmp


def test_each_job_samples_and_scores_in_its_own_dir(sweep):
    sweep_dir, _ = sweep
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit())
    assert len(jobs) == 8
    seen = set()
    for job in jobs:
        assert len(list(job.glob("0000[0-2].png"))) == 3 and (job / "manifest.jsonl").is_file()
        final = json.loads((job / "final_metrics.json").read_text())
        st, m = final["settings"]["decoder"], final["metrics"]
        seen.add((st["guidance_scale"], st["sampler"], st["steps"]))
        assert f"steps.decoder={st['steps']}" in final["overrides"]
        assert m["num_images"] == 3 and m["seconds_per_image"] > 0 and m["num_reference"] == 16
        assert m["clip_fd"] >= 0 and m["clip_score"] >= 0
        assert 0 <= m["checker/accuracy/all"] <= 1 and 0 <= m["checker/strict/all"] <= 1
        # the job's JSON says how FID-like figures would be preprocessed and which CLIP gave the CLIP score
        assert final["preprocessing"]["image_size"] == m["image_size"] and "BICUBIC" in final["preprocessing"]["resize"]
        assert final["clip_score_clip"]["kind"] == "dalle2 checkpoint" and len(final["clip_score_clip"]["sha256"]) == 64
    assert seen == {(g, s, n) for g in (1.0, 3.0) for s in ("ddim", "dpmpp_2m") for n in (2, 3)}


def test_gather_writes_csv_table_and_plots(sweep):
    sweep_dir, tmp = sweep
    out = tmp / "gathered"
    written = sweep_gather.main([str(sweep_dir), "--out", str(out)])
    with open(out / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8
    assert {(r["guidance"], r["sampler"], r["steps"]) for r in rows} == {
        (f"{float(g)}", s, n)
        for g in GRID["guidance.decoder"]
        for s in GRID["sampler.decoder"]
        for n in GRID["steps.decoder"]
    }
    finals = {json.loads((sweep_dir / r["job"] / "final_metrics.json").read_text())["metrics"]["clip_fd"] for r in rows}
    assert {float(r["clip_fd"]) for r in rows} == finals  # the CSV carries each job's own score
    assert all(r["strict_all"] != "" and r["checker_all"] != "" and float(r["seconds_per_image"]) > 0 for r in rows)
    for r in rows:  # the headline with its interval over the checked images (one seed per setting here)
        assert r["seeds"] == "1" and int(r["checked"]) == 3
        assert float(r["strict_all_lo"]) <= float(r["strict_all"]) <= float(r["strict_all_hi"])
    assert (out / "sweep.md").read_text().count("\n") == 10  # header, rule, 8 rows
    for name in ("tradeoff", "steps"):
        with Image.open(written[name]) as im:
            im.load()
            assert im.size[0] >= 400 and im.size[1] >= 300 and len(im.getcolors(1 << 16) or range(300)) > 10


def test_gather_refuses_a_dir_without_jobs(tmp_path):
    with pytest.raises(SystemExit, match="no Hydra job dirs"):
        sweep_gather.main([str(tmp_path), "--out", str(tmp_path / "o")])


def test_demo_report_shows_the_sweep_plots_and_wandb_runs(sweep, tmp_path):
    sweep_dir, tmp = sweep
    sweep_gather.main([str(sweep_dir), "--out", str(tmp_path / "sweep")])
    wandb_run = tmp_path / "clip" / "wandb" / "offline-run-20250101_000000-abc"
    wandb_run.mkdir(parents=True)
    proc = run([sys.executable, "train/demo_report.py", str(tmp_path)], timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    md = (tmp_path / "report.md").read_text()
    assert "sweep/tradeoff.png" in md and "sweep/steps.png" in md and "| dpmpp_2m |" in md
    assert "clip/wandb/offline-run-20250101_000000-abc" in md and "wandb sync" in md
