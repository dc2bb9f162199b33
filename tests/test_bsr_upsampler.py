"""The second super-resolution stage (256 -> 1024 px, DALL-E 2's BSR-degraded one): the BSR-style degradation
(dalle2.diffusion.bsr) and the ``sr256_1024`` preset training on quarter-size crops and sampling at full size, at
reduced width."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dalle2.decoder import UNET_PRESETS
from dalle2.diffusion import LowResAugmentation
from dalle2.diffusion.bsr import BSRConfig, anisotropic_gaussian_kernels, bsr_degrade, jpeg_roundtrip
from dalle2.lit.decoder_module import UpsamplerModule

OFF = dict(blur_prob=0.0, blur2_prob=0.0, noise_prob=0.0, jpeg_prob=0.0)


def pictures(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Flat discs on flat backgrounds with antialiased edges (what the built-in data looks like), in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    out = []
    for _ in range(n):
        cx, cy, r = (torch.rand(3, generator=g) * torch.tensor([0.4, 0.4, 0.15]) + torch.tensor([0.3, 0.3, 0.1])) * size
        inside = ((((xs - cx) ** 2 + (ys - cy) ** 2).sqrt() - r).clamp(-0.5, 0.5) * -1 + 0.5)[None]
        fg, bg = torch.rand(3, 1, 1, generator=g) * 2 - 1, torch.rand(3, 1, 1, generator=g) * 2 - 1
        out.append(bg * (1 - inside) + fg * inside)
    return torch.stack(out)


def test_bsr_degrade_shapes_range_and_seeds():
    hi = pictures(4, 64)
    a = bsr_degrade(hi, 4, generator=torch.Generator().manual_seed(0))
    b = bsr_degrade(hi, 4, generator=torch.Generator().manual_seed(0))
    c = bsr_degrade(hi, 4, generator=torch.Generator().manual_seed(1))
    assert a.shape == (4, 3, 16, 16) and a.min() >= -1 and a.max() <= 1
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # a seed fixes every draw
    assert not torch.allclose(a, c)
    # per-row generators: a row's degradation does not depend on its batch mates
    gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
    both = bsr_degrade(hi[:2], 4, generator=gens)
    alone = bsr_degrade(hi[1:2], 4, generator=[torch.Generator().manual_seed(6)])
    torch.testing.assert_close(both[1:], alone, rtol=0, atol=0)
    with pytest.raises(ValueError, match="divisible"):
        bsr_degrade(hi[..., :63, :63], 4)


def test_bsr_steps_do_what_they_say():
    hi = pictures(8, 64, seed=3)
    area = F.interpolate(hi, size=16, mode="area")
    # every step off: a plain downsampling (one of the three filters), close to the box filter
    plain = bsr_degrade(hi, 4, config=BSRConfig(**OFF), generator=torch.Generator().manual_seed(0))
    assert float((plain - area).abs().max()) < 0.35 and float((plain - area).pow(2).mean()) < 2e-3
    # noise only: the added noise has the configured std (in 8-bit levels)
    cfg = BSRConfig(**{**OFF, "noise_prob": 1.0, "noise_std": (20.0, 20.0), "gray_noise_prob": 0.0})
    noisy = bsr_degrade(torch.zeros(8, 3, 256, 256), 4, config=cfg, generator=torch.Generator().manual_seed(0))
    assert abs(float(noisy.std()) * 127.5 - 20.0) < 1.0
    # JPEG only: a JPEG round trip of the downsampled image, which differs from it
    cfg = BSRConfig(**{**OFF, "jpeg_prob": 1.0, "jpeg_quality": (30, 30)})
    jpg = bsr_degrade(hi, 4, config=cfg, generator=torch.Generator().manual_seed(0))
    down = bsr_degrade(hi, 4, config=BSRConfig(**OFF), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(jpg, jpeg_roundtrip(down, torch.full((8,), 30)), rtol=0, atol=1e-6)
    assert float((jpg - down).abs().mean()) > 0.005
    # blur only: softer than the plain downsampling (smaller mean gradient)
    cfg = BSRConfig(**{**OFF, "blur_prob": 1.0, "blur_sigma": (6.0, 6.0)})  # 1.5 low-res px
    soft = bsr_degrade(hi, 4, config=cfg, generator=torch.Generator().manual_seed(0))

    def grad(x):
        return float((x[..., 1:] - x[..., :-1]).abs().mean())

    assert grad(soft) < 0.8 * grad(down)


def test_anisotropic_kernels_are_normalised_and_oriented():
    k = anisotropic_gaussian_kernels(torch.tensor([3.0, 3.0]), torch.tensor([0.5, 0.5]), torch.tensor([0.0, 1.5708]), 9)
    torch.testing.assert_close(k.sum((1, 2)), torch.ones(2))
    # theta = 0: wide along x (columns); theta = pi/2: wide along y (rows)
    assert float(k[0, 9, :].sum()) > 3 * float(k[0, :, 9].sum())
    assert float(k[1, :, 9].sum()) > 3 * float(k[1, 9, :].sum())


def test_lowres_augmentation_bsr_option():
    aug = LowResAugmentation(degradation="bsr", bsr={"jpeg_prob": 0.0})
    hi = pictures(2, 64)
    lo = aug.degrade(
        hi, 4, lambda x: F.interpolate(x, size=16, mode="area"), generator=torch.Generator().manual_seed(0)
    )
    assert lo.shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="degradation"):
        LowResAugmentation(degradation="jpeg")


def small_sr256_1024() -> dict:
    """The paper's 256 -> 1024 network (6 levels, no attention) at reduced width."""
    net = dict(UNET_PRESETS["sr256_1024"])
    assert net["lowres_cond"] and not net["attention_levels"] and not net.get("mid_attention", True)
    return {**net, "model_channels": 4, "num_res_blocks": 1}


def test_sr256_1024_trains_on_quarter_crops_with_bsr_and_samples_at_full_size():
    torch.manual_seed(0)
    m = UpsamplerModule(
        network=small_sr256_1024(),
        diffusion={"schedule": "linear", "num_timesteps": 100, "objective": "v"},
        lowres_size=256,
        image_size=1024,
        train_crop_size=256,  # a quarter of the target size
        residual=True,
        residual_gain=8.0,
        lowres_aug={"degradation": "bsr", "num_levels": 100, "max_train_level": 30},
        sample_aug_level=0,
    )
    hi = pictures(1, 1024, seed=1)
    x0, kw = m.training_inputs({"image": hi}, train=True, generator=torch.Generator().manual_seed(0))
    assert x0.shape == (1, 3, 256, 256) and kw["lowres_image"].shape == (1, 3, 64, 64)
    opt = torch.optim.AdamW(m.net.parameters(), lr=1e-3)
    for step in range(2):
        loss = m.training_step({"image": hi}, step)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert m.net.input_conv.weight.grad is not None and float(m.net.out[-1].weight.abs().sum()) > 0
    lo = m.lowres(hi)
    out = m.upsample(lo, steps=1, generator=torch.Generator().manual_seed(0), use_ema=False)
    assert out.shape == (1, 3, 1024, 1024) and torch.isfinite(out).all()
    assert out.min() >= -1 and out.max() <= 1
