"""bench/scale_plan.py: the plan is internally consistent (bytes add up, FSDP state = DDP state / GPUs, the largest
micro-batch fits the memory it claims and one more does not, times and GPU-hours agree), and what it measures on
the meta device equals the same measurement on real CPU tensors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import scale_plan  # noqa: E402

GIB = 2**30
TINY = [("prior", "tiny"), ("decoder", "tiny32"), ("upsampler", "tiny_sr32_64")]
# a small GPU so that tiny models fill it: 0.25 GiB, 10 TFLOP/s
SMALL_GPU = ["gpu=custom", "memory_gib=0.25", "peak_tflops=10", "context_gib=0.01", "min_micro=1"]


@pytest.fixture(scope="module")
def plans():
    out = {}
    for stage, config in TINY:
        r = scale_plan.main(
            [
                f"stage={stage}",
                f"config={config}",
                "gpus=1,4,16",
                *SMALL_GPU,
                "global_batch=64",
                "iterations=1000",
                "image_size=16",
            ]
        )
        out[(stage, config)] = r["plans"]
    return out


@pytest.mark.parametrize("stage,config", TINY)
def test_bytes_add_up_and_the_micro_batch_fits_exactly(plans, stage, config):
    for p in plans[(stage, config)]:
        for strategy in ("ddp", "fsdp"):
            for mode in ("no_ckpt", "ckpt"):
                m = p["memory"][strategy][mode]
                state = sum(m["state_bytes"].values())
                assert m["state_gib"] * GIB == pytest.approx(state)
                per = m["activation_bytes_per_sample"]
                micro = m["max_micro_batch"]
                assert m["total_gib_at_max"] * GIB == pytest.approx(state + micro * per)
                assert state + micro * per <= m["usable_gib"] * GIB  # what it claims fits, fits
                assert state + (micro + 1) * per > m["usable_gib"] * GIB  # and it is the largest
        chosen = p["chosen"]
        mem = p["memory"][p["strategy"]]["ckpt" if chosen["ckpt"] else "no_ckpt"]
        assert chosen["bytes"]["activations"] == pytest.approx(
            chosen["micro_batch"] * mem["activation_bytes_per_sample"]
        )
        assert {k: v for k, v in chosen["bytes"].items() if k != "activations"} == mem["state_bytes"]


@pytest.mark.parametrize("stage,config", TINY)
def test_fsdp_state_is_ddp_state_over_gpus(plans, stage, config):
    for p in plans[(stage, config)]:
        ddp, fsdp = (p["memory"][s]["no_ckpt"]["state_bytes"] for s in ("ddp", "fsdp"))
        for part in ("weights", "gradients", "optimizer", "ema"):
            assert fsdp[part] * p["gpus"] == pytest.approx(ddp[part])
        # 4 + 4 + 8 + 4 bytes a parameter under DDP
        assert sum(ddp[k] for k in ("weights", "gradients", "optimizer", "ema")) == 20 * p["params"]
    by_gpus = {p["gpus"]: p for p in plans[(stage, config)]}
    assert (
        by_gpus[16]["memory"]["fsdp"]["no_ckpt"]["max_micro_batch"]
        >= by_gpus[1]["memory"]["fsdp"]["no_ckpt"]["max_micro_batch"]
    )
    assert by_gpus[16]["memory"]["ddp"]["no_ckpt"] == by_gpus[1]["memory"]["ddp"]["no_ckpt"]  # DDP does not shard


@pytest.mark.parametrize("stage,config", TINY)
def test_times_rates_and_gpu_hours_agree(plans, stage, config):
    for p in plans[(stage, config)]:
        f = p["flops_per_sample"]
        assert f["train"] > f["forward"] > 0 and f["train_with_ckpt"] == pytest.approx(f["train"] + f["forward"])
        flops = f["train_with_ckpt"] if p["chosen"]["ckpt"] else f["train"]
        batch, iters = p["paper"]["global_batch"], p["paper"]["iterations"]
        assert p["compute_s_per_step"] == pytest.approx(
            batch * flops / (p["gpus"] * p["peak_tflops"] * 1e12 * p["mfu"])
        )
        assert p["step_time_s"] == pytest.approx(max(p["compute_s_per_step"], p["comm_s_per_step"]))
        assert p["samples_per_s"] * p["step_time_s"] == pytest.approx(batch)
        assert p["gpu_hours"] == pytest.approx(iters * p["step_time_s"] * p["gpus"] / 3600)
        assert p["days"] == pytest.approx(p["gpu_hours"] / p["gpus"] / 24)
        nodes = max(1, p["gpus"] // 8)
        assert p["input"]["mb_per_s_per_node"] == pytest.approx(
            p["samples_per_s"] / nodes * p["input"]["bytes_per_sample"] / 1e6
        )
        c = p["chosen"]
        if c["fits"]:
            assert c["micro_batch"] * c["accumulation"] * p["gpus"] >= batch  # the global batch is reached
        assert (p["comm_s_per_step"] == 0) == (p["gpus"] == 1)


@pytest.mark.parametrize("stage,config", TINY)
def test_meta_measurement_equals_real_tensors(stage, config):
    """FLOPs, parameters and saved-activation bytes measured on the meta device are those of real CPU tensors."""
    _, kwargs = scale_plan.model_config(stage, config)
    m = {}
    for device in ("meta", "cpu"):
        torch.manual_seed(0)
        net = scale_plan.build_network(stage, kwargs, device=device)
        args, kw = scale_plan.training_inputs(stage, net, 2, image_size=16, text_len=12, device=device)
        m[device] = scale_plan.measure(net, args, kw, 2)
    assert m["meta"].params == m["cpu"].params == sum(p.numel() for p in net.parameters())
    assert m["meta"].fwd_flops == pytest.approx(m["cpu"].fwd_flops, rel=0.02)
    assert m["meta"].train_flops == pytest.approx(m["cpu"].train_flops, rel=0.02)
    assert m["meta"].act_bytes == pytest.approx(m["cpu"].act_bytes, rel=0.01)
    assert m["meta"].act_bytes_ckpt == pytest.approx(m["cpu"].act_bytes_ckpt, rel=0.01)
    assert 0 < m["meta"].act_bytes_ckpt < m["meta"].act_bytes  # checkpointing keeps less
    assert m["meta"].units > 1 and m["meta"].root_params + m["meta"].largest_unit_params <= m["meta"].params


def test_activations_scale_with_batch():
    _, kwargs = scale_plan.model_config("decoder", "tiny32")
    net = scale_plan.build_network("decoder", kwargs)
    per = []
    for b in (2, 8):
        args, kw = scale_plan.training_inputs("decoder", net, b, image_size=16, text_len=0)
        per.append(scale_plan.measure(net, args, kw, b))
    assert per[1].act_bytes == pytest.approx(per[0].act_bytes, rel=0.05)  # per sample: linear in the batch
    assert per[1].train_flops == pytest.approx(per[0].train_flops, rel=0.01)


def test_a_model_larger_than_the_gpu_does_not_fit():
    r = scale_plan.main(
        ["stage=prior", "config=tiny", "gpus=1", "gpu=custom", "memory_gib=0.001", "peak_tflops=10", "context_gib=0"]
    )
    p = r["plans"][0]
    assert p["chosen"]["fits"] is False and p["chosen"]["max_micro_batch"] == 0 and "does not fit" in r["table"]


def test_cli_prints_json_and_a_table(tmp_path):
    out = tmp_path / "plan.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "scale_plan.py"),
            "stage=prior",
            "config=tiny",
            "gpus=8",
            "gpu=a100",
            "strategy=ddp",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert json.loads(out.read_text()) == result
    p = result["plans"][0]
    assert p["strategy"] == "ddp" and p["memory_gib"] == 80 and p["peak_tflops"] == 312.0
    assert "| prior/tiny |" in proc.stderr and result["table"] in proc.stderr
    with pytest.raises(SystemExit, match="unknown gpu 'tpu'"):
        scale_plan.main(["stage=prior", "config=tiny", "gpu=tpu"])
