"""The super-resolution stage's regression mean (dalle2.decoder.sr_mean; docs/decoder.md "The cascade").

The diffusion UNet alone kept bicubic's blur: its clean-image estimate from a noisy image (where sampling starts)
learned the sharp edges far slower than a plain regressor does.  With ``network.regression_mean`` the SR stage
is a deterministic estimate trained with MSE plus a diffusion model of what is left."""

from __future__ import annotations

import warnings

import pytest
import torch

from dalle2.data.synthetic import write_shards
from dalle2.data.webdataset import expand_urls, iter_raw_samples, load_rgb
from dalle2.decoder.networks import build_unet
from dalle2.decoder.sr_eval import bicubic, psnr
from dalle2.decoder.sr_mean import MeanResidualSR
from dalle2.decoder.stage import UpsamplerStage
from dalle2.lit.decoder_module import UpsamplerModule

SR_NET = dict(
    model_channels=16,
    channel_mult=[1, 2],
    num_res_blocks=1,
    attention_levels=[],
    mid_attention=False,
    lowres_cond=True,
    regression_mean={"channels": 32, "layers": 3},
)


def upsampler(**kw) -> UpsamplerModule:
    kw.setdefault("diffusion", {"num_timesteps": 100, "objective": "v"})
    kw.setdefault("lowres_aug", {"num_levels": 100, "max_train_level": 30})
    kw.setdefault("residual", True)
    kw.setdefault("residual_gain", 16.0)
    return UpsamplerModule(
        network=kw.pop("network", SR_NET), lowres_size=kw.pop("lowres_size", 16), image_size=64, **kw
    )


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> dict:
    """Built-in 64 px JPEG pictures read as the data loader reads them (train: 48, held out: 16)."""
    root = tmp_path_factory.mktemp("sr_mean")
    urls = write_shards(root, num_train=48, num_val=16, image_size=64, samples_per_shard=16)
    out = {}
    for split in ("train", "val"):
        raw = [s["jpg"] for url in expand_urls(urls[split]) for s in iter_raw_samples(url)]
        out[split] = torch.stack([load_rgb(b, image_size=64) for b in raw])
    return out


def test_an_untrained_mean_is_bicubic_and_steps_0_returns_it():
    m = upsampler()
    assert isinstance(m.net, MeanResidualSR)
    lo = torch.rand(2, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(m.upsample(lo, steps=0), bicubic(lo, 64), rtol=0, atol=1e-6)
    # and the diffusion target is the image minus that estimate (times the gain)
    hi = torch.rand(2, 3, 64, 64) * 2 - 1
    x0, kw, mean_loss = m.sr_inputs({"image": hi}, train=False, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x0, (hi - m.base(kw["lowres_image"])) * 16.0, rtol=0, atol=1e-4)
    assert mean_loss is not None and float(mean_loss.detach()) > 0


def test_a_regression_mean_needs_the_residual_and_the_stages_scale():
    with pytest.raises(ValueError, match="residual: true"):
        upsampler(residual=False)
    with pytest.raises(ValueError, match="scale 2 != image_size / lowres_size 4"):
        upsampler(network={**SR_NET, "regression_mean": {"scale": 2}})
    with pytest.raises(ValueError, match="lowres_cond"):
        build_unet({**SR_NET, "lowres_cond": False})


def test_a_trained_regression_mean_beats_bicubic_on_held_out_pictures(pictures):
    # The property the stage exists for: closer to the real pictures than bicubic, on pictures it never saw.
    # (the mean's own loss only: the diffusion's is the same as without a mean, and it is the slow part)
    torch.manual_seed(0)
    m = upsampler(lowres_size=32)
    opt = torch.optim.Adam(m.net.mean.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    train = pictures["train"]
    for _ in range(300):
        idx = torch.randint(0, len(train), (16,), generator=g)
        _, _, mean_loss = m.sr_inputs({"image": train[idx]}, train=True, generator=g)
        opt.zero_grad()
        mean_loss.backward()
        opt.step()
    m.eval()
    hi = pictures["val"]
    lo = m.lowres(hi)
    ours = float(psnr(m.upsample(lo, steps=0, use_ema=False), hi).mean())
    theirs = float(psnr(bicubic(lo, 64), hi).mean())
    assert ours > theirs + 0.5, (ours, theirs)  # an untrained mean is bicubic (+0 dB)


def test_the_stage_rebuilt_from_the_checkpoints_hyperparameters_has_the_same_mean():
    m = upsampler()
    with torch.no_grad():
        for p in m.ema_net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    stage = UpsamplerStage.from_hparams(m.hparams)
    stage.net.load_state_dict(m.ema_net.state_dict())
    lo = torch.rand(2, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(stage.upsample(lo, steps=0), m.upsample(lo, steps=0), rtol=0, atol=1e-6)
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    torch.testing.assert_close(stage.upsample(lo, steps=2, generator=g()), m.upsample(lo, steps=2, generator=g()))


def test_a_chain_started_at_start_t_refines_the_estimate_in_the_steps_asked():
    # SDEdit from the estimate: the network is called at start_t first and at t = 0 last, `steps` times, and the
    # chain starts from the estimate noised to start_t (a zero residual), not from pure noise.
    m = upsampler()
    seen: list[int] = []
    first: list[float] = []
    net = m.ema_net
    forward = net.forward

    def spy(x, t, **kw):
        seen.append(int(t[0]))
        if not first:
            first.append(float(x.std()))
        return forward(x, t, **kw)

    net.forward = spy
    lo = torch.rand(2, 3, 16, 16) * 2 - 1
    m.upsample(lo, steps=3, start_t=40, generator=torch.Generator().manual_seed(0))
    assert seen == [40, 20, 0]
    expected = float((1 - m.diffusion.schedule.alphas_cumprod[40]).sqrt())
    assert abs(first[0] - expected) < 0.1 * expected
    with pytest.raises(ValueError, match="start_t"):
        upsampler(residual=False, network={k: v for k, v in SR_NET.items() if k != "regression_mean"}).upsample(
            lo, steps=2, start_t=10
        )
    # the stage's default and the whole chain on request
    seen.clear()
    m.hparams["sample_start_t"] = 20
    m.upsample(lo, steps=2, generator=torch.Generator().manual_seed(0))
    assert seen == [20, 0]
    seen.clear()
    m.upsample(lo, steps=2, start_t=-1, generator=torch.Generator().manual_seed(0))
    assert seen[0] > 20 and seen[-1] == 0


def test_the_training_loss_is_the_diffusions_plus_the_means_and_reaches_both_networks():
    m = upsampler()
    batch = {"image": torch.rand(2, 3, 64, 64) * 2 - 1}
    torch.manual_seed(0)
    x0, kw, extra = m.inputs_and_losses(batch, train=True)
    diffusion = m.diffusion.training_losses(m.net, x0, model_kwargs=kw)["loss"]
    torch.manual_seed(0)
    with warnings.catch_warnings():  # Lightning warns (once per process) about logging without a Trainer
        warnings.simplefilter("ignore")
        loss = m.training_step(batch, 0)
    assert set(extra) == {"loss/mean"}
    torch.testing.assert_close(loss, diffusion + extra["loss/mean"])
    loss.backward()
    assert all(p.grad is not None for p in m.net.mean.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.net.unet.parameters())
