"""Why the super-resolution stage lost to bicubic: one test per cause found (docs/cascade.md "Causes").

Each test states a property the upsampler needs in order to redraw the edges a bicubic upsampling blurs, on the
built-in pictures, and each failed on the code before the fix."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from dalle2.data.synthetic import write_shards
from dalle2.data.webdataset import expand_urls, iter_raw_samples, load_rgb
from dalle2.lit.decoder_module import UpsamplerModule

SR_NET = dict(
    model_channels=16, channel_mult=[1, 2], num_res_blocks=1, attention_levels=[], mid_attention=False, lowres_cond=True
)


def upsampler(**kw) -> UpsamplerModule:
    kw.setdefault("diffusion", {"num_timesteps": 100})
    kw.setdefault("lowres_aug", {"num_levels": 100, "max_train_level": 30})
    return UpsamplerModule(network=SR_NET, lowres_size=kw.pop("lowres_size", 16), image_size=64, **kw)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> dict:
    """Eight built-in 64 px JPEG pictures read as the data loader reads them, at 64 px and at 16 px."""
    root = tmp_path_factory.mktemp("sr_causes")
    urls = write_shards(root, num_train=8, num_val=0, image_size=64, samples_per_shard=8)
    raw = [s["jpg"] for url in expand_urls(urls["train"]) for s in iter_raw_samples(url)]
    return {
        "hi": torch.stack([load_rgb(b, image_size=64) for b in raw]),
        "lo": torch.stack([load_rgb(b, image_size=16) for b in raw]),
    }


def test_lowres_conditioning_is_the_base_decoders_view_of_the_picture(pictures):
    # The upsampler is trained on low-res copies it makes itself and sampled on the base decoder's outputs, which
    # imitate the data loader's low-res view of the same pictures (a JPEG decoded at reduced scale: a box filter).
    # The two must agree: before, the upsampler made its copies with an antialiased bicubic filter (sharper edges,
    # up to 0.23 off at the edges of these pictures) and met blurrier low-res images when sampled.
    m = upsampler()
    made = m.lowres(pictures["hi"])
    assert float((made - pictures["lo"]).abs().max()) < 0.05


def test_lowres_of_a_training_crop_is_the_crop_of_the_lowres_image(pictures):
    # Trained on random crops, sampled on whole images: the conditioning a crop gets must be the same pixels the
    # whole low-res image has there (before: the antialiased bicubic filter read past the crop's border).
    m = upsampler(train_crop_size=32)
    hi = pictures["hi"]
    crop = hi[..., 16:48, 8:40]  # aligned to the x4 grid, as _random_crop takes them
    torch.testing.assert_close(m.lowres(crop), m.lowres(hi)[..., 4:12, 2:10], rtol=0, atol=1e-6)


def test_last_sampling_step_is_at_t0():
    # An upsampler's sample is the network's clean-image estimate at the last timestep it is called at. Ending at
    # t = T/steps - 1 ('trailing', the old default) returns the estimate from a noisy image (a blur of the edges
    # it should draw); the default ends at t = 0.
    m = upsampler()
    seen: list[int] = []
    net = m.ema_net
    forward = net.forward

    def spy(x, t, **kw):
        seen.append(int(t[0]))
        return forward(x, t, **kw)

    net.forward = spy
    m.upsample(torch.zeros(1, 3, 16, 16), steps=4, generator=torch.Generator().manual_seed(0))
    assert len(seen) == 4 and seen[-1] == 0


def test_residual_is_taken_over_the_image_the_network_is_given():
    # With blur augmentation the network is conditioned on a blurred low-res copy; the residual it learns must be
    # the one over THAT image's bicubic upsampling, as when sampling (where the base is the given low-res image's).
    # Before, training took it over the unblurred copy: a blurry low-res input then got a residual for a sharp one.
    m = upsampler(
        residual=True, lowres_aug={"num_levels": 100, "max_train_level": 0, "blur_prob": 1.0, "blur_sigma": [1.0, 1.0]}
    )
    hi = torch.rand(2, 3, 64, 64) * 2 - 1
    x0, kw = m.training_inputs({"image": hi}, train=True, generator=torch.Generator().manual_seed(0))
    assert (kw["lowres_aug_level"] == 0).all()  # no noise: the network sees the blurred copy itself
    torch.testing.assert_close(hi - x0, m.base(kw["lowres_image"]), rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def pictures256(tmp_path_factory) -> torch.Tensor:
    root = tmp_path_factory.mktemp("sr_causes256")
    urls = write_shards(root, num_train=16, num_val=0, image_size=256, samples_per_shard=16)
    return torch.stack(
        [load_rgb(s["jpg"], image_size=256) for url in expand_urls(urls["train"]) for s in iter_raw_samples(url)]
    )


@pytest.mark.parametrize("experiment", ["upsampler_64_256", "upsampler_tiny"])
def test_the_diffused_residual_has_unit_variance(experiment, pictures256):
    # The v (and eps) parametrisations assume data of unit variance: a network that predicts nothing then estimates
    # x0 = sqrt(alpha_bar) x_t, and the noise buries the data at about half the timesteps. The residual of these
    # pictures over bicubic is a thin line of edge pixels (RMS 0.035 at 256 px): at gain 1 an untrained network
    # added noise to bicubic (x0 = sqrt(alpha_bar) x_t is noise at mid t), the noise hid the residual at 99 % of
    # the training timesteps, and training had to learn to cancel that noise before drawing any edge.
    from hydra import compose, initialize_config_dir

    from conftest import REPO_ROOT

    with initialize_config_dir(config_dir=os.path.join(REPO_ROOT, "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={experiment}"])
    mod = cfg.module
    m = UpsamplerModule(
        network=SR_NET,
        diffusion=dict(mod.diffusion),
        lowres_size=int(mod.lowres_size),
        image_size=int(mod.image_size),
        residual=bool(mod.residual),
        residual_gain=float(mod.get("residual_gain", 1.0)),
    )
    hi = F.interpolate(pictures256, size=int(mod.image_size), mode="area")  # the data at the stage's size
    x0, _ = m.training_inputs({"image": hi}, train=False, generator=torch.Generator().manual_seed(0))
    assert 0.5 <= float(x0.std()) <= 2.0


def test_focused_crops_hold_the_detail_and_uniform_ones_often_do_not():
    # On one small object over a plain background most uniform crops hold no edge at all, so they teach the
    # upsampler nothing; train_crop_focus centres crops on detail bicubic misses (one crop per image).
    hi = -torch.ones(64, 3, 64, 64)
    hi[:, :, 40:48, 40:48] = 1.0  # a small square: the only detail
    torch.manual_seed(0)
    detail = lambda m, x: (x - m.base(m.lowres(x))).abs().flatten(1).sum(1)  # noqa: E731
    uniform = upsampler(residual=True, train_crop_size=32)
    focused = upsampler(residual=True, train_crop_size=32, train_crop_focus=1.0)
    u = detail(uniform, uniform._random_crop(hi))
    f = detail(focused, focused._random_crop(hi))
    assert (f > 0).all() and float((u > 0).float().mean()) < 0.5
    with pytest.raises(ValueError, match="train_crop_focus"):
        upsampler(train_crop_focus=1.5)
