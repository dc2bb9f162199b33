"""A tiny 2-job Hydra multirun finishes, each job in its own dir, and train/sweep_table.py gathers both."""

from __future__ import annotations

import subprocess
import sys

import pytest

from helpers.tiny_runs import REPO_ROOT, decoder_cmd, run_env, tiny_clip_ckpt

sys.path.insert(0, str(REPO_ROOT / "train"))
import sweep_table  # noqa: E402


@pytest.mark.slow
def test_multirun_two_jobs_and_table(builtin_shards, tmp_path):
    sweep_dir = tmp_path / "sweep"
    cmd = decoder_cmd(
        builtin_shards,
        tiny_clip_ckpt(tmp_path / "clip.ckpt"),
        tmp_path / "unused",
        "-m",
        "hydra/launcher=local",
        "module.diffusion.objective=eps,v",
        "trainer.max_steps=2",
        f"hydra.sweep.dir={sweep_dir}",
    )
    cmd.remove("-m")
    cmd.insert(2, "-m")  # flags before overrides
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=run_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (sweep_dir / "0" / "final_metrics.json").is_file() and (sweep_dir / "1" / "final_metrics.json").is_file()
    assert (sweep_dir / "0" / "checkpoints").is_dir() and (sweep_dir / "1" / "checkpoints").is_dir()

    out = tmp_path / "table.csv"
    text = sweep_table.main([str(sweep_dir), "--metrics", "train/loss", "--csv", str(out)])
    lines = text.splitlines()
    assert lines[0] == "| job | module.diffusion.objective | status | step | train/loss |"
    assert len(lines) == 4 and "| 0 | eps | finished | 2 |" in lines[2] and "| 1 | v | finished | 2 |" in lines[3]
    rows = out.read_text().splitlines()
    assert len(rows) == 3 and rows[1].startswith("0,eps,finished,2,")
