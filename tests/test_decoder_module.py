"""DecoderModule / UpsamplerModule / SampleGrid: training steps, CFG drops, EMA, checkpoints, frozen CLIP,
sanity check, PSNR, DDP.  Tiny UNets at 16 px."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from dalle2.lit.decoder_module import DecoderModule, UpsamplerModule, downsample, psnr
from dalle2.lit.sample_grid import SampleGrid, noise_like, spatial_autocorrelation
from helpers.cascade import NET_NO_TEXT, SR_NET, save_tiny_clip

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NET = NET_NO_TEXT


def smooth_images(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g) * 2 - 1
    return F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)


def make_batch(n: int = 4, *, emb: bool = True, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed + 1)
    tokens = torch.zeros(n, 77, dtype=torch.long)
    tokens[:, :5] = torch.randint(1, 100, (n, 5), generator=g)
    b = {"image": smooth_images(n, seed=seed), "tokens": tokens, "caption": [f"c{i}" for i in range(n)]}
    if emb:
        b["img_emb"] = torch.randn(n, 8, generator=g) * 3
        b["txt_tokens"] = torch.randn(n, 77, 32, generator=g)
    return b


def decoder(**kw) -> DecoderModule:
    net = {**NET, **kw.pop("net", {})}
    diff = {"num_timesteps": 100, **kw.pop("diffusion", {})}
    return DecoderModule(network=net, diffusion=diff, image_size=16, **kw)


def upsampler(**kw) -> UpsamplerModule:
    return UpsamplerModule(
        network=SR_NET,
        diffusion={"num_timesteps": 100},
        lowres_size=8,
        image_size=16,
        lowres_aug={"num_levels": 100, "max_train_level": 30},
        **kw,
    )


class ListLoader(torch.utils.data.Dataset):
    def __init__(self, batches):
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        return self.batches[i]


def loader(batches):
    return torch.utils.data.DataLoader(ListLoader(batches), batch_size=None)


def tiny_trainer(tmp_path, **kw) -> L.Trainer:
    kw.setdefault("max_steps", 3)
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        **kw,
    )


@pytest.fixture(autouse=True)
def _quiet():
    warnings.filterwarnings("ignore", message=".*self.log.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    yield


# ------------------------------------------------------------------------------------------------ training step


@pytest.mark.parametrize("objective", ["eps", "v"])
@pytest.mark.parametrize("learned_variance", [False, True])
def test_training_step_finite_and_grads(objective, learned_variance):
    m = decoder(
        net={"learned_variance": learned_variance, "text_dim": 32}, diffusion={"objective": objective}, use_text=True
    )
    assert m.diffusion.learned_variance == learned_variance and m.diffusion.objective == objective
    loss = m.training_step(make_batch(), 0)
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in m.net.parameters() if p.requires_grad]
    assert all(g is not None for g in grads[:3])
    assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0
    assert m.net.image_to_time.weight.grad is not None and m.net.text_proj.weight.grad is not None
    assert all(p.grad is None for p in m.ema.parameters())


def test_learned_variance_mismatch_is_an_error():
    with pytest.raises(ValueError, match="learned_variance"):
        decoder(diffusion={"learned_variance": True})


def test_upsampler_training_step_crops():
    m = upsampler(train_crop_size=8)
    b = {"image": smooth_images(2), "tokens": torch.zeros(2, 77, dtype=torch.long)}
    x0, kw = m.training_inputs(b, train=True)
    assert x0.shape == (2, 3, 8, 8) and kw["lowres_image"].shape == (2, 3, 4, 4)
    assert kw["lowres_aug_level"].max() <= 30
    loss = m.training_step(b, 0)
    assert torch.isfinite(loss)
    loss.backward()
    assert m.net.input_conv.weight.grad is not None


def test_residual_upsampler_target_and_untrained_output_is_bicubic():
    # residual=True: the diffusion target is image - bicubic(low-res); the sample is bicubic + the sampled residual,
    # so a network that predicts x0 = 0 (the zero-initialised output layer, x0 objective) returns bicubic exactly
    m = UpsamplerModule(
        network=SR_NET,
        diffusion={"num_timesteps": 100, "objective": "x0"},
        lowres_size=8,
        image_size=16,
        lowres_aug={"num_levels": 100, "max_train_level": 30},
        residual=True,
    )
    hi = smooth_images(3)
    lo = m.lowres(hi)
    bicubic = F.interpolate(lo, size=(16, 16), mode="bicubic", align_corners=False)
    x0, kw = m.training_inputs({"image": hi}, train=False, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x0, hi - bicubic)
    out = m.upsample(lo, steps=5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, bicubic.clamp(-1, 1))
    # the static threshold clips the image (bicubic + residual), not the residual
    bright = torch.full((1, 3, 8, 8), 0.9)
    with torch.no_grad():
        m.ema_net.out[-1].bias.fill_(0.5)  # x0 prediction 0.5 everywhere -> 1.4, clipped to 1
    torch.testing.assert_close(
        m.upsample(bright, steps=5, generator=torch.Generator().manual_seed(0)), torch.ones(1, 3, 16, 16)
    )
    loss = m.training_step({"image": hi}, 0)
    assert torch.isfinite(loss)


def test_upsampler_sample_spacing_hparam():
    torch.manual_seed(0)
    m = upsampler(sample_spacing="leading")
    with torch.no_grad():
        for p in m.ema_net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    lo = m.lowres(smooth_images(2))

    def up(**kw):
        return m.upsample(lo, steps=4, generator=torch.Generator().manual_seed(0), **kw)

    torch.testing.assert_close(up(), up(spacing="leading"), rtol=0, atol=0)
    assert not torch.allclose(up(), up(spacing="trailing"))


def test_cfg_drop_rates():
    m = decoder(use_text=True, net={"text_dim": 32}, image_embed_drop_prob=0.1, text_drop_prob=0.5)
    g = torch.Generator().manual_seed(0)
    d = m.drop_masks(20000, generator=g)
    assert d["drop_image_embed"].dtype == torch.bool
    assert abs(d["drop_image_embed"].float().mean() - 0.1) < 0.01
    assert abs(d["drop_text"].float().mean() - 0.5) < 0.015
    both = (d["drop_image_embed"] & d["drop_text"]).float().mean()
    assert abs(both - 0.05) < 0.01  # independent
    kw = m.model_kwargs(make_batch(), train=False)
    assert not kw["drop_image_embed"].any() and not kw["drop_text"].any()
    assert torch.allclose(kw["image_embed"].norm(dim=-1), torch.ones(4), atol=1e-5)  # unit-norm embeddings
    assert kw["text_mask"][:, :5].all() and not kw["text_mask"][:, 5:].any()


# ------------------------------------------------------------------------------------------------ overfit / EMA


def test_overfit_handful_of_images():
    torch.manual_seed(0)
    small = dict(model_channels=8, channel_mult=[1, 2], attention_levels=[], mid_attention=False, cond_dim=None)
    m = decoder(net=small, ema_decay=0.9, ema_warmup=1)
    batch = make_batch(4)
    opt = torch.optim.Adam(m.net.parameters(), lr=2e-3)
    losses = []
    for step in range(80):
        loss = m.training_step(batch, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        m.ema.update(m.net, step)
        losses.append(float(loss.detach()))
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.5 * first, (first, last)
    # EMA moved away from the online weights and is what sampling uses
    online = torch.cat([p.flatten() for p in m.net.parameters()])
    ema = torch.cat([p.flatten() for p in m.ema_net.parameters()])
    assert not torch.allclose(online, ema)
    emb = batch["img_emb"][:2]
    a = m.sample(emb, steps=4, generator=torch.Generator().manual_seed(1))
    b = m.sample(emb, steps=4, generator=torch.Generator().manual_seed(1), use_ema=False)
    assert not torch.allclose(a, b)
    with m.ema.swapped_into(m.net):
        c = m.sample(emb, steps=4, generator=torch.Generator().manual_seed(1), use_ema=False)
    assert torch.allclose(a, c, atol=1e-5)
    assert a.min() >= -1 and a.max() <= 1


def test_guided_and_dynamic_threshold_sampling():
    m = decoder(use_text=True, net={"text_dim": 32})
    b = make_batch(2)
    x = m.sample(
        b["img_emb"],
        steps=3,
        guidance_scale=3.0,
        threshold="dynamic",
        text_tokens=b["txt_tokens"],
        text_mask=b["tokens"] != 0,
        generator=torch.Generator().manual_seed(0),
    )
    assert x.shape == (2, 3, 16, 16) and torch.isfinite(x).all()


# ------------------------------------------------------------------------------------------------ checkpoints


def _save_and_reload(module, batches, path, tmp_path):
    trainer = tiny_trainer(tmp_path, max_steps=2)
    trainer.fit(module, train_dataloaders=loader(batches))
    trainer.save_checkpoint(path)
    return type(module).load_from_checkpoint(str(path))


def test_decoder_checkpoint_roundtrip_same_samples(tmp_path):
    m = decoder(ema_warmup=1)
    ckpt = tmp_path / "dec.ckpt"
    re = _save_and_reload(m, [make_batch(seed=i) for i in range(2)], ckpt, tmp_path)
    emb = torch.randn(2, 8)
    a = m.sample(emb, steps=3, generator=torch.Generator().manual_seed(5))
    b = re.sample(emb, steps=3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert re.hparams.network == NET and re.diffusion.num_timesteps == 100

    from dalle2.lit.checkpoints import WrongStageError, checkpoint_stage, load_stage_module

    assert checkpoint_stage(ckpt) == "decoder"
    with pytest.raises(WrongStageError):
        load_stage_module(ckpt, "clip")
    assert isinstance(load_stage_module(ckpt, "decoder"), DecoderModule)


def test_upsampler_checkpoint_roundtrip_same_samples(tmp_path):
    m = upsampler(sample_aug_level=5)
    b = {"image": smooth_images(2), "tokens": torch.zeros(2, 77, dtype=torch.long)}
    re = _save_and_reload(m, [b, b], tmp_path / "up.ckpt", tmp_path)
    lo = downsample(smooth_images(2, seed=3), 8)
    a = m.upsample(lo, steps=3, generator=torch.Generator().manual_seed(2))
    c = re.upsample(lo, steps=3, generator=torch.Generator().manual_seed(2))
    assert a.shape == (2, 3, 16, 16) and torch.equal(a, c)
    from dalle2.lit.checkpoints import checkpoint_stage

    assert checkpoint_stage(tmp_path / "up.ckpt") == "upsampler"


# ------------------------------------------------------------------------------------------------ frozen CLIP


def test_frozen_clip_on_the_fly_not_in_checkpoint(tmp_path):
    clip_path = tmp_path / "clip.ckpt"
    clip = save_tiny_clip(clip_path)
    m = decoder(clip_ckpt=str(clip_path), use_text=True, net={"text_dim": 32})
    b = make_batch(2, emb=False)
    emb = m.image_embeddings(b)  # loads lazily
    ref = F.normalize(clip.eval().encode_image(b["image"]), dim=-1)
    assert torch.allclose(emb, ref, atol=1e-5)
    states, mask = m.text_conditioning(b)
    assert states.shape == (2, 77, 32) and mask.shape == (2, 77)
    loss = m.training_step(b, 0)
    loss.backward()
    assert all(p.grad is None for p in m.clip.parameters())
    assert not any(k.startswith(("_clip", "clip")) for k in m.state_dict())
    ckpt = tmp_path / "dec.ckpt"
    trainer = tiny_trainer(tmp_path, max_steps=1)
    trainer.fit(m, train_dataloaders=loader([b]))
    trainer.save_checkpoint(ckpt)
    sd = torch.load(ckpt, weights_only=False)["state_dict"]
    clip_keys = set(clip.state_dict())
    assert not any(k in clip_keys or "visual" in k for k in sd)
    no_clip = decoder()
    with pytest.raises(ValueError, match="img_emb"):
        no_clip.image_embeddings(b)


# ------------------------------------------------------------------------------------------------ sanity / PSNR


def test_noise_check_flags_noise_not_images():
    import numpy as np

    from dalle2.data.synthetic import render, sample_attributes

    rng = np.random.default_rng(0)
    real = torch.stack([torch.from_numpy(render(sample_attributes(rng), 32, rng)).permute(2, 0, 1) for _ in range(8)])
    real = real.float() / 127.5 - 1
    noise = torch.randn(8, 3, 32, 32)
    assert noise_like(noise).all()
    assert noise_like(noise.clamp(-1, 1)).all()
    assert not noise_like(real).any()
    assert not noise_like(smooth_images(8)).any()
    assert not noise_like(torch.zeros(2, 3, 16, 16)).any()
    assert spatial_autocorrelation(real).min() > 0.5


def test_psnr_vs_bicubic():
    hi = smooth_images(4, size=16)
    assert torch.isclose(psnr(hi, hi), torch.full((4,), 10 * torch.log10(torch.tensor(4.0 / 1e-10)))).all()
    off = (hi + 0.1).clamp(-1, 1)
    expected = 10 * torch.log10(4.0 / (off - hi).pow(2).flatten(1).mean(1))
    assert torch.allclose(psnr(off, hi), expected)
    m = upsampler()
    out = m.preview({"image": hi}, steps=2, generator=torch.Generator().manual_seed(0))
    bic = F.interpolate(m.lowres(hi), size=(16, 16), mode="bicubic", align_corners=False).clamp(-1, 1)
    assert abs(out["metrics"]["val/psnr_bicubic"] - float(psnr(bic, hi).mean())) < 1e-4
    assert out["metrics"]["val/psnr_bicubic"] > 20  # smooth images: bicubic is good


def test_sample_grid_callback_writes_png_and_flags_noise(tmp_path):
    m = decoder()  # untrained: zero-init output -> samples are noise
    cb = SampleGrid(every_n_steps=2, num_samples=4, steps=3)
    trainer = tiny_trainer(tmp_path, max_steps=2, callbacks=[cb], limit_val_batches=1, val_check_interval=1)
    with pytest.warns(UserWarning, match="PURE GAUSSIAN NOISE"):
        trainer.fit(
            m,
            train_dataloaders=loader([make_batch(seed=i) for i in range(2)]),
            val_dataloaders=loader([make_batch(seed=9)]),
        )
    png = tmp_path / "samples" / "step_0000002.png"
    assert png.is_file() and png.with_suffix(".txt").is_file()
    assert cb.last["metrics"]["sanity/noise_like"] == 1.0
    from PIL import Image

    assert Image.open(png).size == (4 * 18 + 2, 2 * 18 + 2)


def test_upsampler_callback_logs_psnr(tmp_path):
    m = upsampler()
    cb = SampleGrid(every_n_steps=1, num_samples=2, steps=2)
    trainer = tiny_trainer(tmp_path, max_steps=1, callbacks=[cb])
    b = {"image": smooth_images(2), "tokens": torch.zeros(2, 77, dtype=torch.long)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(m, train_dataloaders=loader([b]))
    assert {"val/psnr", "val/psnr_bicubic", "sanity/noise_like"} <= set(trainer.callback_metrics)


# ------------------------------------------------------------------------------------------------ DDP

DDP_SCRIPT = textwrap.dedent(
    """
    import sys, torch, lightning as L
    sys.path.insert(0, sys.argv[3])
    from helpers.cascade import NET_NO_TEXT as NET, save_tiny_clip
    from dalle2.data.datamodule import WebDataModule
    from dalle2.lit.decoder_module import DecoderModule
    from dalle2.lit.sample_grid import SampleGrid
    train, out = sys.argv[1], sys.argv[2]
    clip_path = out + "/clip.ckpt"
    if int(__import__("os").environ.get("LOCAL_RANK", 0)) == 0:
        save_tiny_clip(clip_path)
    dm = WebDataModule(train_urls=train, val_urls=None, image_size=16, batch_size=4, num_workers=0)
    m = DecoderModule(network=NET, diffusion={"num_timesteps": 100}, clip_ckpt=clip_path, image_size=16)
    t = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=3, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, default_root_dir=out,
                  callbacks=[SampleGrid(every_n_steps=3, num_samples=2, steps=2)])
    t.fit(m, datamodule=dm)
    t.save_checkpoint(out + "/dec.ckpt")  # collective: every rank calls it
    if t.is_global_zero:
        print("DDP_OK", t.global_step)
    """
)


@pytest.mark.slow
def test_ddp_two_processes(builtin_shards, tmp_path):
    script = tmp_path / "ddp_decoder.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": REPO_ROOT, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, str(script), builtin_shards["train"], str(tmp_path), os.path.join(REPO_ROOT, "tests")],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        cwd=str(tmp_path),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "DDP_OK 3" in res.stdout
    assert (tmp_path / "samples" / "step_0000003.png").is_file()
    assert (tmp_path / "dec.ckpt").is_file()
