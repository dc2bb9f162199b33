"""eval/decoder_acceptance.py (checker accuracy of decoder samples, PSNR gain of upsamplers) and the cascade's
2-process CPU DDP (ranks end with identical weights, decoder and upsampler)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO_ROOT, "eval"))

from decoder_acceptance import decoder_acceptance, derangement, load_val, main, upsampler_acceptance  # noqa: E402

from dalle2.data.strict_checker import VERDICTS  # noqa: E402
from dalle2.lit.decoder_module import DecoderModule, UpsamplerModule  # noqa: E402
from helpers.cascade import NET_NO_TEXT as NET  # noqa: E402
from helpers.cascade import SR_NET, save_module, save_tiny_clip
from helpers.cascade import tiny_decoder as _decoder  # noqa: E402
from helpers.cascade import tiny_upsampler as _upsampler


class OracleDecoder(DecoderModule):
    """'Samples' the bank image whose embedding is nearest: a perfect decoder, to test the script's wiring."""

    def sample(self, image_embed, **kw):
        idx = (F.normalize(image_embed.float(), dim=-1) @ self.bank_emb.T).argmax(1)
        return self.bank_img[idx]


class BicubicUpsampler(UpsamplerModule):
    def upsample(self, lowres_images, **kw):
        return F.interpolate(lowres_images.float(), scale_factor=self.scale, mode="bicubic", align_corners=False).clamp(
            -1, 1
        )


def test_derangement_has_no_fixed_point():
    for n in (2, 3, 17, 100):
        p = derangement(n, seed=n)
        assert sorted(p.tolist()) == list(range(n))
        assert not (p == torch.arange(n)).any()
    assert torch.equal(derangement(50, seed=1), derangement(50, seed=1))


def test_load_val_and_real_ceiling(builtin_shards):
    val = load_val(builtin_shards["val"], image_size=32, num=40, batch_size=16)
    assert val["image"].shape == (40, 3, 32, 32) and len(val["caption"]) == 40 and val["tokens"].shape == (40, 77)
    assert val["image"].min() >= -1 and val["image"].max() <= 1


def test_oracle_decoder_scores_like_real_images_and_shuffled_control_drops(builtin_shards):
    val = load_val(builtin_shards["val"], image_size=32, num=48)
    val["img_emb"] = torch.randn(48, 8, generator=torch.Generator().manual_seed(0))
    m = OracleDecoder(network=NET, diffusion={"num_timesteps": 100}, image_size=32)
    m.bank_emb, m.bank_img = F.normalize(val["img_emb"], dim=-1), val["image"]
    r = decoder_acceptance(m, val, steps=2, batch_size=16)
    assert r["real"]["accuracy/mean"] >= 0.95  # the checker on clean 32 px renders
    assert r["samples"] == r["real"]  # the oracle returns the real image of each embedding
    assert r["shuffled"]["accuracy/all"] < 0.3 < r["samples"]["accuracy/all"]
    keys = {f"accuracy/{a}" for a in ("shape", "color", "background", "size", "position", "all", "mean")}
    keys |= {f"strict/{k}" for k in ("all", *VERDICTS, "iou_mean", "edge_width_median")}
    assert set(r["samples"]) == set(r["shuffled"]) == keys and r["num_samples"] == 48
    assert r["real"]["strict/all"] >= 0.9  # the strict checker on the val images (JPEG q95, 32 px)
    assert r["shuffled"]["strict/all"] < 0.1


def test_decoder_cli_json_deterministic(builtin_shards, tmp_path):

    torch.manual_seed(0)
    clip_path = str(tmp_path / "clip.ckpt")
    save_tiny_clip(clip_path, image_size=32)
    ckpt = save_module(_decoder(clip_ckpt=clip_path), tmp_path / "dec.ckpt")
    args = [
        "decoder",
        "--ckpt",
        ckpt,
        "--val",
        builtin_shards["val"],
        "--num",
        "12",
        "--steps",
        "2",
        "--guidance-scale",
        "2",
        "--batch-size",
        "8",
    ]
    a = main(args + ["--out", str(tmp_path / "a.json"), "--grid", str(tmp_path / "a.png")])
    b = main(args + ["--clip-ckpt", clip_path])
    saved = json.loads((tmp_path / "a.json").read_text())
    for r in (a, b, saved):
        r.pop("sample_seconds"), r.pop("ckpt")
    assert a == b == saved
    assert a["num_samples"] == 12 and a["guidance_scale"] == 2.0 and a["image_size"] == 32
    assert (tmp_path / "a.png").is_file() and (tmp_path / "a.txt").is_file()


def test_upsampler_acceptance_bicubic_gain_is_zero(builtin_shards):
    val = load_val(builtin_shards["val"], image_size=32, num=10)
    m = BicubicUpsampler(network=SR_NET, diffusion={"num_timesteps": 100}, lowres_size=16, image_size=32)
    r = upsampler_acceptance(m, val["image"], steps=2, batch_size=4)
    assert r["psnr"] == pytest.approx(r["psnr_bicubic"], abs=1e-5) and abs(r["psnr_gain_db"]) < 1e-5
    assert r["psnr_bicubic"] > 15 and r["num_samples"] == 10 and r["lowres_size"] == 16


def test_upsampler_cli(builtin_shards, tmp_path):
    ckpt = save_module(_upsampler(), tmp_path / "up.ckpt")
    r = main(
        [
            "upsampler",
            "--ckpt",
            ckpt,
            "--val",
            builtin_shards["val"],
            "--num",
            "6",
            "--steps",
            "2",
            "--out",
            str(tmp_path / "up.json"),
        ]
    )
    assert json.loads((tmp_path / "up.json").read_text())["psnr_gain_db"] == pytest.approx(r["psnr_gain_db"])
    assert r["image_size"] == 32 and r["psnr"] == pytest.approx(r["psnr_bicubic"] + r["psnr_gain_db"], abs=1e-3)


def test_wrong_stage_checkpoint_is_a_clear_error(tmp_path):
    from dalle2.lit.checkpoints import WrongStageError

    ckpt = save_module(_upsampler(), tmp_path / "up.ckpt")
    with pytest.raises(WrongStageError, match="upsampler"):
        main(["decoder", "--ckpt", ckpt])


# ------------------------------------------------------------------------------------------------ DDP

DDP_SCRIPT = textwrap.dedent(
    """
    import os, sys, torch, lightning as L
    sys.path.insert(0, sys.argv[4])
    from helpers.cascade import tiny_decoder as _decoder, tiny_upsampler as _upsampler
    from dalle2.data.datamodule import WebDataModule
    stage, train, out = sys.argv[1], sys.argv[2], sys.argv[3]
    torch.manual_seed(0)  # same init on both ranks (DDP also broadcasts rank 0's)
    size = 32
    m = _decoder() if stage == "decoder" else _upsampler()
    if stage == "decoder":  # embeddings from the batch: random but fixed per key -> no CLIP needed
        class WithEmb(WebDataModule):
            def on_before_batch_transfer(self, batch, i):
                batch = super().on_before_batch_transfer(batch, i)
                batch["img_emb"] = torch.stack([torch.randn(8, generator=torch.Generator().manual_seed(int(k)))
                                                for k in batch["key"]])
                return batch
        dm = WithEmb(train_urls=train, val_urls=None, image_size=size, batch_size=4, num_workers=0)
    else:
        dm = WebDataModule(train_urls=train, val_urls=None, image_size=size, batch_size=4, num_workers=0)
    init = [p.detach().clone() for p in m.net.parameters()]
    t = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=3, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, default_root_dir=out)
    t.fit(m, datamodule=dm)
    flat = torch.cat([p.detach().flatten() for p in m.net.parameters()])
    ema = torch.cat([p.detach().flatten() for p in m.ema_net.parameters()])
    changed = any(not torch.equal(a, b) for a, b in zip(init, m.net.parameters()))
    torch.save({"net": flat, "ema": ema, "changed": changed, "step": t.global_step}, f"{out}/rank{t.global_rank}.pt")
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["decoder", "upsampler"])
def test_ddp_two_processes_ranks_stay_in_sync(stage, builtin_shards, tmp_path):
    script = tmp_path / "ddp_cascade.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": REPO_ROOT, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, str(script), stage, builtin_shards["train"], str(tmp_path), os.path.join(REPO_ROOT, "tests")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=str(tmp_path),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["step"] == r1["step"] == 3 and r0["changed"] and r1["changed"]
    assert torch.equal(r0["net"], r1["net"])  # gradients all-reduced: identical weights on both ranks
    assert torch.equal(r0["ema"], r1["ema"])
