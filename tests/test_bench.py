"""The benchmark scripts run (tiny presets, a few steps) and report what they promise; the fast paths they
measure compute what the plain paths compute."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import sample as bench_sample  # noqa: E402
import train_step as bench_train  # noqa: E402

TRAIN_KEYS = {
    "stage",
    "config",
    "params",
    "batch",
    "s_per_step",
    "samples_per_s",
    "peak_memory_gib",
    "flops_per_step",
    "tflops_per_s",
    "mfu",
    "final_loss",
    "threads",
    "loadavg",
    "optimizer_impl",
}


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize(
    "stage,config,batch",
    [("prior", "tiny", 2), ("decoder", "tiny32", 2), ("upsampler", "tiny_sr32_64", 1), ("clip", "tiny", 4)],
)
def test_train_step_reports(stage, config, batch, tmp_path):
    out = tmp_path / "r.json"
    r = bench_train.main(
        [f"stage={stage}", f"config={config}", f"batch={batch}", "steps=2", "warmup=1", "threads=1", "--out", str(out)]
    )
    assert TRAIN_KEYS <= set(r)
    assert json.loads(out.read_text())["samples_per_s"] == pytest.approx(r["samples_per_s"])
    assert r["samples_per_s"] == pytest.approx(batch / r["s_per_step"])
    assert r["flops_per_step"] > 0 and r["mfu"] is None  # no known peak on CPU
    assert r["optimizer_impl"]["fused"] is True


def test_train_step_compare_reports_both_variants():
    r = bench_train.main(
        [
            "stage=decoder",
            "config=tiny32",
            "batch=1",
            "steps=2",
            "warmup=0",
            "threads=1",
            "flops=0",
            "compare=precision",
        ]
    )
    assert set(r["variants"]) == {"fp32", "bf16"} and r["speedup_on_vs_off"] > 0
    assert all(v["s_per_step"] > 0 for v in r["variants"].values())


def test_sample_reports_every_stage_and_sampler():
    r = bench_sample.main(
        [
            "prior_config=tiny",
            "decoder_config=tiny32",
            "upsampler_config=tiny_sr32_64",
            "batch=1",
            "steps=2",
            "samplers=ddim,heun",
            "guidance=2.0",
            "threads=1",
        ]
    )
    got = {(row["stage"], row["sampler"]) for row in r["results"]}
    assert got == {(s, x) for s in ("prior", "decoder", "upsampler") for x in ("ddim", "heun")}
    for row in r["results"]:
        assert row["s_per_step"] == pytest.approx(row["seconds"] / 2)
        assert row["model_calls"] == (3 if row["sampler"] == "heun" else 2)


def test_cli_parses_key_value_and_rejects_unknown():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "train_step.py"), "stage=prior", "bogus=1"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode != 0 and "unknown argument 'bogus'" in proc.stderr


# -- the fast paths equal the plain ones ---------------------------------------------------------------------------


def test_prior_last_block_read_out_equals_full_block():
    from dalle2.prior.network import PriorBlock, prior_from_preset

    torch.set_num_threads(1)  # tiny ops: one thread is faster on a shared machine
    for positional in ("learned", "rotary"):
        torch.manual_seed(0)
        net = prior_from_preset(
            "tiny", embed_dim=32, text_token_dim=16, width=64, depth=2, heads=2, dim_head=32, positional=positional
        )
        kw = dict(
            text_embed=torch.randn(3, 32),
            text_tokens=torch.randn(3, 6, 16),
            text_mask=torch.arange(6)[None] < torch.tensor([[2], [6], [1]]),
            drop_text=torch.tensor([0, 1, 0]).bool(),
        )
        x, t = torch.randn(3, 32), torch.randint(0, 1000, (3,))
        fast = net(x, t, **kw)
        fast.square().sum().backward()
        g_fast = [p.grad.clone() for p in net.parameters()]
        net.zero_grad()
        full = PriorBlock.forward
        for block in net.blocks:  # force the full computation in every block
            block.forward = types.MethodType(
                lambda self, h, m, r=None, past=None, last_only=False, kv_only=False: full(self, h, m, r, past), block
            )
        slow = net(x, t, **kw)
        slow.square().sum().backward()
        torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
        for a, b in zip(g_fast, [p.grad for p in net.parameters()]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_default_adamw_is_fused_and_matches_foreach():
    from dalle2.lit.optim import build_optimizers, default_adamw

    torch.manual_seed(0)
    a, b = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)
    b.load_state_dict(a.state_dict())
    oa = default_adamw(a.parameters(), lr=1e-2, weight_decay=0.1)
    ob = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.1, betas=(0.9, 0.99), foreach=True)
    assert oa.defaults["fused"] is True
    for _ in range(3):
        x = torch.randn(5, 8)
        for m, o in ((a, oa), (b, ob)):
            m(x).square().mean().backward()
            o.step()
            o.zero_grad()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q)
    # a Hydra-style AdamW partial without fused/foreach gets the fused kernel; an explicit choice is kept
    opt = build_optimizers(a, functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.1), None)["optimizer"]
    assert opt.defaults["fused"] is True and opt.param_groups[0]["weight_decay"] == 0.1
    opt = build_optimizers(a, functools.partial(torch.optim.AdamW, lr=1e-3, foreach=False), None)["optimizer"]
    assert not opt.defaults["fused"] and opt.defaults["foreach"] is False


def test_fused_adamw_allows_clipping_under_mixed_precision():
    import lightning as L

    from dalle2.lit.optim import build_optimizers

    class M(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            return self.net(batch[0]).square().mean()

        def configure_optimizers(self):
            return build_optimizers(self.net, functools.partial(torch.optim.AdamW, lr=1e-2), None)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 4)), batch_size=4)
    trainer = L.Trainer(
        max_steps=2,
        precision="bf16-mixed",
        gradient_clip_val=1.0,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(M(), data)
    assert trainer.global_step == 2 and trainer.optimizers[0].defaults["fused"] is True


def test_train_step_on_sr_crops_counts_the_crops_flops_and_writes_a_results_file(tmp_path):
    # crop=: the SR stage trains on random crops (the paper's quarter-size ones): the step's FLOPs are the crop's,
    # a quarter of the whole picture's at half the side, and result= writes a results file (command, sha, machine)
    args = ["stage=upsampler", "config=tiny_sr32_64", "batch=1", "steps=1", "warmup=0", "threads=1"]
    whole = bench_train.main(args)
    out = tmp_path / "r.json"
    cropped = bench_train.main([*args, "crop=32", f"result={out}"])
    assert cropped["train_crop_size"] == 32 and whole["train_crop_size"] is None
    assert 0.15 < cropped["flops_per_step"] / whole["flops_per_step"] < 0.35
    saved = json.loads(out.read_text())
    assert saved["figures"]["flops_per_step"] == cropped["flops_per_step"] and saved["git_sha"]
