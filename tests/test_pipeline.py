"""UnCLIPPipeline: determinism per (seed, index), batch invariance, sizes, stage checks, variations without a prior,
interpolation; per-row generators in the samplers, the low-res augmentation and the prior.

Tiny random stages (CLIP, prior, 16 px decoder with text, 16 -> 32 upsampler) are written as checkpoints once per
session; their weights are perturbed so that every network's output depends on its input (no zero-init heads)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dalle2.diffusion import LowResAugmentation, Schedule
from dalle2.diffusion.samplers import randn
from dalle2.lit.checkpoints import WrongStageError
from dalle2.pipeline import SamplingSettings, StageSettings, UnCLIPPipeline, sample_generators, sample_seed, slerp
from helpers.images import assert_same_8bit, png_bytes

PROMPTS = ["a red circle on a blue background", "two green squares", "x", "a small yellow triangle at the top left"]
FAST = SamplingSettings(
    prior=StageSettings(steps=4, guidance_scale=2.0),
    decoder=StageSettings(steps=4, guidance_scale=3.0),
    upsampler=StageSettings(steps=3),
    n_prior_samples=3,
    upsampler_aug_level=10,
)


@pytest.fixture(scope="module")
def pipe(tiny_ckpts):
    return UnCLIPPipeline.from_checkpoints(
        clip=tiny_ckpts["clip"],
        prior=tiny_ckpts["prior"],
        decoder=tiny_ckpts["decoder"],
        upsamplers=[tiny_ckpts["upsampler"]],
    )


# ------------------------------------------------------------------------------------------------ noise plumbing


def test_randn_per_row_generators():
    gens = lambda: [torch.Generator().manual_seed(s) for s in (3, 5, 7)]  # noqa: E731
    x = randn((3, 2, 4), generator=gens())
    for row, s in zip(x, (3, 5, 7)):
        assert torch.equal(row, torch.randn((1, 2, 4), generator=torch.Generator().manual_seed(s))[0])
    # groups of k = 2 consecutive rows per generator
    y = randn((6, 4), generator=gens())
    assert torch.equal(y[2:4], torch.randn((2, 4), generator=torch.Generator().manual_seed(5)))
    # a single generator keeps the old behaviour
    assert torch.equal(
        randn((3, 4), generator=torch.Generator().manual_seed(1)),
        torch.randn((3, 4), generator=torch.Generator().manual_seed(1)),
    )
    with pytest.raises(ValueError, match="3 generators cannot split a batch of 4"):
        randn((4, 2), generator=gens())


def test_lowres_aug_per_row_generators():
    aug = LowResAugmentation(schedule=Schedule.make("linear", 100))
    x = torch.rand(3, 3, 8, 8) * 2 - 1
    a, _ = aug(x, train=False, level=20, generator=sample_generators([0, 0, 0], [0, 1, 2], 9))
    b, _ = aug(x[1:2], train=False, level=20, generator=sample_generators([0], [1], 9))
    assert torch.equal(a[1:2], b) and not torch.equal(a[0], a[1])
    # train mode draws blur / levels per row too
    c, lv = aug(x, train=True, generator=sample_generators([0, 0, 0], [0, 1, 2], 9))
    d, lv1 = aug(x[2:], train=True, generator=sample_generators([0], [2], 9))
    assert torch.equal(lv[2:], lv1) and torch.allclose(c[2:], d, atol=1e-6)


def test_prior_sampling_is_batch_invariant_with_per_prompt_generators():
    from dalle2.diffusion.gaussian import GaussianDiffusion
    from dalle2.prior import EmbeddingScaler, PriorNetwork, sample_prior

    net = PriorNetwork(embed_dim=8, text_token_dim=6, width=32, depth=1, heads=2, dim_head=16, max_text_len=5).eval()
    diffusion = GaussianDiffusion(schedule=Schedule.make("cosine", 50), objective="x0")
    te, tok = torch.randn(3, 8), torch.randn(3, 5, 6)
    kw = dict(n_samples_per_prompt=4, steps=4, sampler="ddpm", guidance_scale=2.0, scaler=EmbeddingScaler.for_dim(8))
    full = sample_prior(
        net, diffusion, text_embed=te, text_tokens=tok, generator=sample_generators([1] * 3, [0, 1, 2], 1), **kw
    )
    one = sample_prior(
        net, diffusion, text_embed=te[2:], text_tokens=tok[2:], generator=sample_generators([1], [2], 1), **kw
    )
    torch.testing.assert_close(full[2:], one, atol=1e-5, rtol=0)


def test_sample_seed_mixing():
    assert (
        sample_seed(0, 5, 1) == sample_seed(0, (5, 0), 1) == sample_seed(0, (5,), 1) == sample_seed(0, np.int64(5), 1)
    )
    seeds = {sample_seed(s, i, st) for s in range(4) for i in range(4) for st in (1, 2, 3)}
    assert len(seeds) == 48  # no collisions, e.g. (seed 1, index 0) vs (seed 0, index 1_000_003)
    assert sample_seed(1, 0) != sample_seed(0, 1_000_003) and sample_seed(0, (1, 2)) != sample_seed(0, (2, 1))
    assert all(0 <= s < 2**63 for s in seeds)


def test_slerp():
    a, b = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 2.0, 0.0])
    out = slerp(a, b, torch.linspace(0, 1, 3))
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(out[0], a)
    torch.testing.assert_close(out[2], b / 2)
    torch.testing.assert_close(out[1], torch.tensor([0.5**0.5, 0.5**0.5, 0.0]))


def test_settings_overrides_and_validation():
    s = SamplingSettings.from_overrides(
        steps={"decoder": 7}, sampler={"prior": "ddpm"}, guidance={"decoder": 2}, n_prior_samples=5, threshold=None
    )
    assert s.decoder.steps == 7 and s.prior.sampler == "ddpm" and s.decoder.guidance_scale == 2.0
    assert s.n_prior_samples == 5 and s.threshold == "static"
    assert SamplingSettings.from_dict(s.to_dict()) == s
    with pytest.raises(ValueError, match="guidance_scale must be 1"):
        SamplingSettings(upsampler=StageSettings(guidance_scale=2.0))
    with pytest.raises(ValueError, match="unknown stage 'decodr'"):
        SamplingSettings.from_overrides(steps={"decodr": 3})


# ------------------------------------------------------------------------------------------------ pipeline


def test_sizes_and_size_errors(pipe):
    assert pipe.sizes == (16, 32)
    small = pipe(PROMPTS[:2], size=16, settings=FAST)
    full = pipe(PROMPTS[:2], settings=FAST)
    assert small.shape == (2, 3, 16, 16) and full.shape == (2, 3, 32, 32)
    assert float(full.min()) >= 0.0 and float(full.max()) <= 1.0 and float(full.std()) > 0.01
    with pytest.raises(ValueError, match=r"size=64 .* one of \[16, 32\]"):
        pipe(PROMPTS[:1], size=64, settings=FAST)


def test_deterministic_for_a_seed_and_seeds_differ(pipe):
    a = pipe(PROMPTS, seed=3, settings=FAST)
    b = pipe(PROMPTS, seed=3, settings=FAST)
    assert torch.equal(a, b)
    assert [png_bytes(x) for x in a] == [png_bytes(x) for x in b]
    c = pipe(PROMPTS, seed=4, settings=FAST)
    assert all((a[i] - c[i]).abs().max() > 0.05 for i in range(len(PROMPTS)))
    # the index is part of the seed: same prompt, different index -> different image
    same = pipe([PROMPTS[0]] * 2, seed=3, settings=FAST)
    assert (same[0] - same[1]).abs().max() > 0.05


@pytest.mark.parametrize("decoder_sampler", ["ddim", "ddpm"])
def test_image_does_not_depend_on_its_batch(pipe, decoder_sampler):
    st = SamplingSettings.from_dict(
        {**FAST.to_dict(), "decoder": {"steps": 4, "sampler": decoder_sampler, "guidance_scale": 3.0, "eta": 0.0}}
    )
    batch = pipe(PROMPTS, seed=11, settings=st)
    for i in (0, 2):
        alone = pipe([PROMPTS[i]], seed=11, indices=[i], settings=st)
        assert_same_8bit(alone[0], batch[i])
    # reversed batch order with the same indices: same images
    rev = pipe(PROMPTS[::-1], seed=11, indices=list(range(len(PROMPTS)))[::-1], settings=st)
    for i in range(len(PROMPTS)):
        assert_same_8bit(rev.flip(0)[i], batch[i])
    # per-prompt seeds: seed list [s_0..s_B] == separate calls
    mixed = pipe(PROMPTS[:2], seed=[11, 12], settings=st)
    assert_same_8bit(mixed[0], batch[0])
    assert (mixed[1] - batch[1]).abs().max() > 0.05


def test_variations_without_prior(tiny_ckpts):
    pipe = UnCLIPPipeline.from_checkpoints(
        clip=tiny_ckpts["clip"], decoder=tiny_ckpts["decoder"], upsamplers=[tiny_ckpts["upsampler"]]
    )
    assert pipe.prior is None
    images = torch.rand(2, 3, 24, 24)
    v = pipe.variations(images, seed=1, settings=FAST)
    assert v.shape == (2, 3, 32, 32) and torch.isfinite(v).all()
    assert torch.equal(v, pipe.variations(images, seed=1, settings=FAST))
    alone = pipe.variations(images[1:], seed=1, indices=[1], settings=FAST)
    assert_same_8bit(alone[0], v[1])
    assert pipe.variations(images, size=16, settings=FAST).shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="needs a prior"):
        pipe(["a prompt"], settings=FAST)


def test_interpolate_endpoints_match_decoding(pipe):
    emb = torch.nn.functional.normalize(torch.randn(2, 8), dim=-1)
    frames = pipe.interpolate(emb[0], emb[1], num=4, seed=2, size=16, settings=FAST)
    assert frames.shape == (4, 3, 16, 16)
    ends = pipe.decode(emb, seeds=[2, 2], indices=[0, 0], settings=FAST, num_upsamplers=0)
    assert_same_8bit(frames[0], ends[0])
    assert_same_8bit(frames[3], ends[1])
    assert (frames[1] - frames[0]).abs().max() > 0
    by_prompt = pipe.interpolate(PROMPTS[0], PROMPTS[1], num=3, settings=FAST)
    assert by_prompt.shape == (3, 3, 32, 32)
    by_image = pipe.interpolate(torch.rand(3, 20, 20), torch.rand(3, 20, 20), num=2, size=16, settings=FAST)
    assert by_image.shape == (2, 3, 16, 16)


def test_wrong_stage_checkpoint_is_a_clear_error(tiny_ckpts):
    with pytest.raises(WrongStageError, match=r"prior.ckpt is a 'prior' checkpoint, but a 'decoder'"):
        UnCLIPPipeline.from_checkpoints(clip=tiny_ckpts["clip"], decoder=tiny_ckpts["prior"])
    with pytest.raises(WrongStageError, match="'upsampler' was expected|but a 'upsampler'"):
        UnCLIPPipeline.from_checkpoints(
            clip=tiny_ckpts["clip"], decoder=tiny_ckpts["decoder"], upsamplers=[tiny_ckpts["decoder"]]
        )
    with pytest.raises(WrongStageError, match="'clip' checkpoint was expected|but a 'clip'"):
        UnCLIPPipeline.from_checkpoints(clip=tiny_ckpts["decoder"], decoder=tiny_ckpts["decoder"])


def test_mismatched_cascade_is_a_clear_error(tiny_ckpts):
    from dalle2.lit.checkpoints import load_stage_module
    from dalle2.lit.clip_module import load_clip

    clip, dec = load_clip(tiny_ckpts["clip"]), load_stage_module(tiny_ckpts["decoder"], "decoder")
    up = load_stage_module(tiny_ckpts["upsampler"], "upsampler")
    with pytest.raises(ValueError, match="upsampler 1 takes 16 px images but the stage before it makes 32 px"):
        UnCLIPPipeline(clip=clip, decoder=dec, upsamplers=[up, up])
