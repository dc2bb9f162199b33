"""The super-resolution table (real / bicubic / SR): numbers that can fail.  An upsampler that returns the real
pictures scores the real row; bicubic x4 is measurably blurrier (wider edges, finite PSNR); a flat grey or a
shuffled candidate is rejected by the strict checker; eval/sr_table.py writes the table as a results file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dalle2.data.synthetic import parse_caption, write_shards
from dalle2.decoder.sr_eval import bicubic, compare_upsampling, edge_width
from dalle2.metrics.fidelity import load_val
from helpers.cascade import save_module, tiny_upsampler
from helpers.scripts import run_script


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("sr")
    return write_shards(root, num_train=8, num_val=16, num_test=16, image_size=64, samples_per_shard=16)


@pytest.fixture(scope="module")
def pictures(shards):
    hi = load_val(shards["test"], image_size=64, num=16)
    lo = load_val(shards["test"], image_size=16, num=16)
    return hi["image"], lo["image"], [parse_caption(c) for c in hi["caption"]]


def test_real_bicubic_and_degenerate_candidates_score_apart(pictures):
    real, low, attributes = pictures
    grey = torch.zeros_like(real)
    shuffled = real[torch.roll(torch.arange(len(real)), 1)]
    rows = compare_upsampling(
        real, {"same": real.clone(), "bicubic": bicubic(low, 64), "grey": grey, "shuffled": shuffled}, attributes
    )
    assert rows["same"]["edge_width_ratio"] == pytest.approx(1.0)
    assert rows["same"]["psnr"] > 60 and rows["same"]["strict/all"] == rows["real"]["strict/all"] >= 0.9
    assert rows["bicubic"]["edge_width_ratio"] > 1.5 and 15 < rows["bicubic"]["psnr"] < 40
    assert rows["grey"]["strict/all"] == 0.0 and rows["shuffled"]["strict/all"] < 0.5
    assert rows["bicubic"]["psnr"] > rows["shuffled"]["psnr"]
    assert np.isfinite(edge_width(bicubic(low, 64), attributes)).all()
    with pytest.raises(ValueError, match="do not match"):
        compare_upsampling(real, {"small": low}, attributes)


def test_sr_table_cli_writes_a_results_file(shards, tmp_path):
    ckpt = save_module(tiny_upsampler(lowres_size=16, image_size=64), tmp_path / "up.ckpt", seed=0)
    out = tmp_path / "sr_table.json"
    proc = run_script(
        "eval/sr_table.py",
        "--upsampler",
        ckpt,
        "--urls",
        shards["test"],
        "--num",
        "8",
        "--steps",
        "2",
        "--out",
        str(out),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    rows = res["figures"]["rows"]
    assert set(rows) == {"real", "bicubic", "sr"} and res["figures"]["stage"] == "16 -> 64 px"
    assert rows["sr"]["psnr"] < rows["bicubic"]["psnr"]  # an untrained upsampler: worse than bicubic, and it shows
    assert "upsampler" in json.dumps(res.get("checkpoints", {})) and res["split"] == "test"


def test_sr_table_of_an_upsampler_with_a_regression_mean_compares_its_ways_to_sample(shards, tmp_path):
    from helpers.cascade import SR_NET

    net = {**SR_NET, "regression_mean": {"channels": 8, "layers": 2}}
    m = tiny_upsampler(lowres_size=16, image_size=64, network=net, residual=True, residual_gain=8.0)
    ckpt = save_module(m, tmp_path / "up.ckpt")  # unperturbed: the mean starts at bicubic
    out = tmp_path / "sr_table.json"
    args = ["--upsampler", ckpt, "--urls", shards["test"], "--num", "4", "--out", str(out)]
    proc = run_script("eval/sr_table.py", *args, "--steps", "0", "--whole-chain", "2", "--refined", "2:10", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["figures"]["rows"]
    assert set(rows) == {"real", "bicubic", "sr", "sr_refined", "sr_whole_chain"}
    # the estimate of a mean network that has not been trained is bicubic (its last layer starts at zero)
    assert rows["sr"]["psnr"] == pytest.approx(rows["bicubic"]["psnr"], abs=0.05)
