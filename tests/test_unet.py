"""Decoder networks: shapes, conditioning, CFG null embeddings, masks, checkpointing, memory formats, presets."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from dalle2.decoder import UNET_PRESETS, UNet, count_parameters, unet_from_preset

B, CLIP, TEXT = 2, 8, 6


def tiny_base(**overrides) -> UNet:
    kw = dict(
        model_channels=16,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_levels=(1,),
        head_channels=16,
        clip_dim=CLIP,
        text_dim=TEXT,
        cond_dim=16,
    )
    kw.update(overrides)
    return UNet(**kw)


def tiny_sr(**overrides) -> UNet:
    kw = dict(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, mid_attention=False, lowres_cond=True)
    kw.update(overrides)
    return UNet(**kw)


def randomize_zeros(model: torch.nn.Module) -> torch.nn.Module:
    """Zero-initialised output layers / null embeddings make outputs trivially constant; give them values."""
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.1)
    return model.eval()


def base_cond(length: int = 5) -> dict:
    return dict(
        image_embed=torch.randn(B, CLIP),
        text_tokens=torch.randn(B, length, TEXT),
        text_mask=torch.tensor([[True] * 3 + [False] * (length - 3), [True] * length]),
    )


def sr_cond(h: int = 8, w: int = 8) -> dict:
    return dict(lowres_image=torch.randn(B, 3, h, w), lowres_aug_level=torch.tensor([0, 250]))


T = torch.tensor([3, 700])


# ---------------------------------------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("learned_variance", [False, True])
def test_base_output_shape(learned_variance):
    model = tiny_base(learned_variance=learned_variance)
    out = model(torch.randn(B, 3, 16, 16), T, **base_cond())
    assert out.shape == (B, 6 if learned_variance else 3, 16, 16)
    assert model.out_channels == out.shape[1]


@pytest.mark.parametrize(
    ("size", "lowres"), [((16, 16), (8, 8)), ((12, 20), (6, 10)), ((32, 32), (16, 16)), ((8, 8), (8, 8))]
)
def test_sr_shapes_crops_and_full_size(size, lowres):
    model = tiny_sr(learned_variance=True)
    out = model(torch.randn(B, 3, *size), T, **sr_cond(*lowres))
    assert out.shape == (B, 6, *size)


def test_float_timesteps_and_scalar_t():
    model = randomize_zeros(tiny_base())
    x, cond = torch.randn(B, 3, 16, 16), base_cond()
    a = model(x, torch.tensor([5.0, 5.0]), **cond)
    b = model(x, torch.tensor(5), **cond)
    torch.testing.assert_close(a, b)
    assert model(x, torch.tensor([0.5, 999.5]), **cond).isfinite().all()


# ------------------------------------------------------------------------------------------------------------- gradients


def _all_grads_nonzero(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    zero = [n for n, p in model.named_parameters() if p.grad is not None and not p.grad.any()]
    return missing, zero


def test_gradients_reach_every_parameter_with_conditioning():
    model = randomize_zeros(tiny_base(text_embed_dim=5, learned_variance=True)).train()
    cond = base_cond()
    # one row keeps everything, the other drops everything: the null embeddings get gradient too
    out = model(
        torch.randn(B, 3, 16, 16),
        T,
        **cond,
        text_embed=torch.randn(B, 5),
        drop_image_embed=torch.tensor([False, True]),
        drop_text=torch.tensor([True, False]),
    )
    missing, zero = _all_grads_nonzero(model, out.square().mean())
    assert not missing and not zero, (missing, zero)


def test_gradients_reach_every_parameter_sr_and_unconditional():
    sr = randomize_zeros(tiny_sr()).train()
    missing, zero = _all_grads_nonzero(sr, sr(torch.randn(B, 3, 16, 16), T, **sr_cond()).square().mean())
    assert not missing and not zero, (missing, zero)
    plain = randomize_zeros(
        UNet(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), head_channels=16)
    ).train()
    missing, zero = _all_grads_nonzero(plain, plain(torch.randn(B, 3, 16, 16), T).square().mean())
    assert not missing and not zero, (missing, zero)


def test_fresh_model_zero_init_still_has_grads():
    """Freshly built: residual branches and the output conv are zero, so the output is 0 but every parameter that
    conditioning uses still gets a (possibly zero) gradient, and the output conv's is non-zero."""
    model = tiny_base().train()
    out = model(torch.randn(B, 3, 16, 16), T, **base_cond(), drop_image_embed=torch.tensor([False, True]))
    assert not out.any()
    (out - 1.0).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None and n != "null_text_token"]
    assert not missing, missing
    assert model.out[-1].weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------------------- conditioning


def test_drop_image_embed_replaces_it_by_learned_null():
    model = randomize_zeros(tiny_base())
    x, cond = torch.randn(B, 3, 16, 16), base_cond()
    other = dict(cond, image_embed=torch.randn(B, CLIP))
    drop = torch.ones(B, dtype=torch.bool)
    with torch.no_grad():
        a = model(x, T, **cond, drop_image_embed=drop)
        b = model(x, T, **other, drop_image_embed=drop)
        c = model(x, T, **{**cond, "image_embed": None}, drop_image_embed=drop)
        keep = torch.zeros(B, dtype=torch.bool)
        d = model(x, T, **cond, drop_image_embed=keep)
        e = model(x, T, **other, drop_image_embed=keep)
        f = model(x, T, **cond)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)
    assert not torch.allclose(d, e)
    torch.testing.assert_close(d, f)


def test_drop_text_is_independent_of_text_and_length():
    model = randomize_zeros(tiny_base(text_embed_dim=5))
    x, img = torch.randn(B, 3, 16, 16), torch.randn(B, CLIP)
    drop = torch.ones(B, dtype=torch.bool)
    with torch.no_grad():
        a = model(
            x, T, image_embed=img, text_tokens=torch.randn(B, 5, TEXT), text_embed=torch.randn(B, 5), drop_text=drop
        )
        b = model(
            x, T, image_embed=img, text_tokens=torch.randn(B, 9, TEXT), text_embed=torch.randn(B, 5), drop_text=drop
        )
        c = model(x, T, image_embed=img, drop_text=drop)
        d = model(x, T, image_embed=img, text_tokens=torch.randn(B, 5, TEXT), text_embed=torch.randn(B, 5))
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)
    assert not torch.allclose(a, d)


def test_masked_out_text_tokens_do_not_matter():
    model = randomize_zeros(tiny_base())
    x, cond = torch.randn(B, 3, 16, 16), base_cond(length=6)
    tokens = cond["text_tokens"].clone()
    tokens[0, 3:] = float("nan")  # even NaN in padding must not leak
    with torch.no_grad():
        a = model(x, T, **cond)
        b = model(x, T, **dict(cond, text_tokens=tokens))
        tokens2 = cond["text_tokens"].clone()
        tokens2[0, 0] += 1.0  # a real token does matter
        c = model(x, T, **dict(cond, text_tokens=tokens2))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a[0], c[0])


def test_coord_input_makes_the_network_position_aware():
    from dalle2.decoder.unet import coordinate_grid

    grid = coordinate_grid(torch.zeros(2, 3, 4, 6))
    assert grid.shape == (2, 2, 4, 6)
    assert torch.allclose(grid[0, 0, 0], torch.linspace(-5 / 6, 5 / 6, 6))  # x varies along W
    assert torch.allclose(grid[0, 1, :, 0], torch.linspace(-3 / 4, 3 / 4, 4))  # y along H
    # a constant input: without coordinates (and away from the zero padding) every pixel is alike; with them not
    x = torch.zeros(B, 3, 64, 64)
    spread = {}
    for coord in (False, True):
        torch.manual_seed(0)
        net = randomize_zeros(tiny_base(coord_input=coord, attention_levels=(), mid_attention=False, text_dim=None))
        out = net(x, T, image_embed=torch.randn(B, CLIP))
        # a centre patch away from the borders, every 2nd pixel (the stride-2 down / nearest up sampling makes a
        # period-2 pattern even on a constant input)
        inner = out[..., 28:36:2, 28:36:2]
        spread[coord] = float((inner - inner[..., :1, :1]).abs().max())
    assert spread[True] > 100 * spread[False], spread
    net = randomize_zeros(tiny_base(coord_input=True)).train()
    net(x[..., :16, :16], T, **base_cond()).square().mean().backward()
    assert net.input_conv.weight.shape[1] == 5 and net.input_conv.weight.grad[:, 3:].abs().sum() > 0


def test_sr_depends_on_lowres_and_aug_level():
    model = randomize_zeros(tiny_sr())
    x, cond = torch.randn(B, 3, 16, 16), sr_cond()
    with torch.no_grad():
        a = model(x, T, **cond)
        b = model(x, T, **dict(cond, lowres_image=torch.randn(B, 3, 8, 8)))
        c = model(x, T, **dict(cond, lowres_aug_level=torch.tensor([500, 10])))
    assert not torch.allclose(a, b) and not torch.allclose(a, c)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(image_embed=None), "image_embed"),
        (dict(image_embed=torch.randn(B, CLIP + 1)), "image_embed"),
        (dict(text_tokens=None), "text_tokens"),
        (dict(text_tokens=torch.randn(B, 5, TEXT + 2)), "text_tokens"),
        (dict(text_mask=torch.ones(B, 4, dtype=torch.bool)), "text_mask"),
        (dict(drop_image_embed=torch.ones(B + 1, dtype=torch.bool)), "drop_image_embed"),
        (dict(lowres_image=torch.randn(B, 3, 8, 8)), "lowres_image"),
    ],
)
def test_bad_base_conditioning_names_the_argument(kwargs, name):
    model = tiny_base()
    with pytest.raises(ValueError, match=name):
        model(torch.randn(B, 3, 16, 16), T, **{**base_cond(), **kwargs})


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(lowres_image=None), "lowres_image"),
        (dict(lowres_image=torch.randn(B, 1, 8, 8)), "lowres_image"),
        (dict(lowres_aug_level=None), "lowres_aug_level"),
        (dict(lowres_aug_level=torch.zeros(B + 1)), "lowres_aug_level"),
        (dict(image_embed=torch.randn(B, CLIP)), "image_embed"),
    ],
)
def test_bad_sr_conditioning_names_the_argument(kwargs, name):
    model = tiny_sr()
    with pytest.raises(ValueError, match=name):
        model(torch.randn(B, 3, 16, 16), T, **{**sr_cond(), **kwargs})


def test_bad_input_sizes():
    with pytest.raises(ValueError, match="divisible"):
        tiny_sr()(torch.randn(B, 3, 15, 16), T, **sr_cond())
    with pytest.raises(ValueError, match=r"\bx\b"):
        tiny_sr()(torch.randn(B, 4, 16, 16), T, **sr_cond())
    with pytest.raises(ValueError, match="attention_levels"):
        tiny_base(attention_levels=(2,))


# ------------------------------------------------------------------------------------------- memory, precision, state


def test_grad_checkpointing_gives_same_grads():
    ref = randomize_zeros(tiny_base(learned_variance=True)).train()
    ckpt = copy.deepcopy(ref)
    ckpt.grad_checkpointing = True
    x, cond = torch.randn(B, 3, 16, 16), base_cond()
    grads = []
    for model in (ref, ckpt):
        model(x, T, **cond).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6, msg=n)


def test_channels_last_equals_contiguous():
    model = randomize_zeros(tiny_base())
    x, cond = torch.randn(B, 3, 16, 16), base_cond()
    with torch.no_grad():
        ref = model(x, T, **cond)
        cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
        out = cl(x.to(memory_format=torch.channels_last), T, **cond)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_bf16_autocast_is_finite():
    model = randomize_zeros(tiny_base(learned_variance=True)).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(B, 3, 16, 16), T, **base_cond(), drop_text=torch.tensor([True, False]))
    assert out.isfinite().all()
    out.float().square().mean().backward()
    assert all(p.grad.isfinite().all() for p in model.parameters() if p.grad is not None)


def test_state_dict_roundtrip_identical_output():
    model = randomize_zeros(tiny_base())
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh = tiny_base().eval()
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    x, cond = torch.randn(B, 3, 16, 16), base_cond()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, T, **cond), model(x, T, **cond), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------- presets


def test_bench_preset_parameter_count():
    with torch.device("meta"):
        model = unet_from_preset("bench")
    assert 40e6 <= count_parameters(model) <= 60e6


@pytest.mark.parametrize("name", sorted(UNET_PRESETS))
def test_presets_build(name):
    with torch.device("meta"):
        model = unet_from_preset(name, clip_dim=UNET_PRESETS[name].get("clip_dim", 512 if "sr" not in name else None))
    assert count_parameters(model) > 0


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown UNet preset"):
        unet_from_preset("nope")


def test_sr_with_optional_clip_conditioning():
    """SR UNet without attention: the CLIP embedding conditions through the time embedding only (no tokens)."""
    model = randomize_zeros(tiny_sr(clip_dim=CLIP)).train()
    assert model.num_image_tokens == 0
    x, cond = torch.randn(B, 3, 16, 16), sr_cond()
    out = model(x, T, **cond, image_embed=torch.randn(B, CLIP), drop_image_embed=torch.tensor([False, True]))
    missing, zero = _all_grads_nonzero(model, out.square().mean())
    assert not missing and not zero, (missing, zero)
    with pytest.raises(ValueError, match="text_dim"):
        tiny_sr(text_dim=TEXT)


def test_tiny_presets_forward():
    base = unet_from_preset("tiny32", clip_dim=CLIP, text_dim=TEXT)
    assert 1e6 <= count_parameters(base) <= 3e6
    out = base(torch.randn(1, 3, 32, 32), T[:1], image_embed=torch.randn(1, CLIP), text_tokens=torch.randn(1, 4, TEXT))
    assert out.shape == (1, 3, 32, 32)
    sr = unet_from_preset("tiny_sr32_64")
    out = sr(torch.randn(1, 3, 64, 64), T[:1], lowres_image=torch.randn(1, 3, 32, 32), lowres_aug_level=torch.zeros(1))
    assert out.shape == (1, 3, 64, 64)


# ------------------------------------------------------------------------------------------------ patch_size (64 px)


def test_patch_size_runs_the_network_at_a_quarter_of_the_pixels():
    """patch_size 2: a 64 px picture goes through the UNet's levels at 32 px (pixel unshuffle / shuffle at the ends),
    with tiny32's parameters but for the wider input/output convs, and every output pixel has its own value."""
    net = randomize_zeros(tiny_base(patch_size=2))
    seen = []
    net.down[0].register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape[-2:])))
    out = net(torch.randn(B, 3, 64, 64), T, **base_cond())
    assert out.shape == (B, 3, 64, 64) and seen == [(32, 32)]
    assert net.downsample_factor == 4
    # the four pixels of a 2 x 2 patch are predicted separately, not one value repeated
    assert (out[..., 0::2, 0::2] - out[..., 1::2, 1::2]).abs().min() > 0
    extra = sum(m.weight.numel() + m.bias.numel() for m in (net.input_conv, net.out[-1]))
    plain = tiny_base()
    extra_plain = sum(m.weight.numel() + m.bias.numel() for m in (plain.input_conv, plain.out[-1]))
    assert count_parameters(net) - extra == count_parameters(plain) - extra_plain
    with pytest.raises(ValueError, match=r"divisible by 4 \(patch_size"):
        net(torch.randn(B, 3, 34, 34), T, **base_cond())
    with pytest.raises(ValueError, match="patch_size"):
        tiny_base(patch_size=0)


def test_patch_size_gradients_reach_every_parameter():
    net = randomize_zeros(tiny_base(patch_size=2, coord_input=True)).train()
    drops = dict(drop_image_embed=torch.tensor([False, True]), drop_text=torch.tensor([True, False]))
    missing, zero = _all_grads_nonzero(net, net(torch.randn(B, 3, 16, 16), T, **base_cond(), **drops).square().mean())
    assert not missing and not zero, (missing, zero)


def test_tiny64_preset_is_tiny32_behind_a_64_px_level():
    """tiny64: the levels below 64 px have tiny32's widths (32, 64, 64 channels at 32, 16, 8 px)."""
    from dalle2.presets import load_preset

    p64, p32 = load_preset("decoder", "tiny64"), load_preset("decoder", "tiny32")
    widths = lambda p: [p["model_channels"] * m for m in p["channel_mult"]]  # noqa: E731
    assert widths(p64)[1:] == widths(p32)
    net = unet_from_preset("tiny64", clip_dim=CLIP)
    assert count_parameters(net) <= 1.1 * count_parameters(unet_from_preset("tiny32", clip_dim=CLIP))
    assert net(torch.randn(1, 3, 64, 64), T[:1], image_embed=torch.randn(1, CLIP)).shape == (1, 3, 64, 64)


# ------------------------------------------------------------------------------------------------ narrow_upsample


def test_narrow_upsample_hands_each_level_its_own_width():
    """narrow_upsample: each up-path upsampling conv writes the width of the level it enters, so the full-resolution
    level's up blocks read (16 + 16) channels, not (32 + 16); fewer parameters, same output, gradients everywhere."""
    wide, narrow = tiny_base(channel_mult=(1, 2, 2)), tiny_base(channel_mult=(1, 2, 2), narrow_upsample=True)
    conv_in = lambda net: [m.in_channels for m in net.up.modules() if isinstance(m, torch.nn.Conv2d)]  # noqa: E731
    ups = lambda net: [m.conv.out_channels for m in net.up.modules() if type(m).__name__ == "Upsample"]  # noqa: E731
    assert ups(wide) == [32, 32] and ups(narrow) == [32, 16]
    assert max(conv_in(narrow)[-4:]) < max(conv_in(wide)[-4:])  # the 16 px level's first block: 32 in, not 48
    assert count_parameters(narrow) < count_parameters(wide)
    net = randomize_zeros(narrow).train()
    drops = dict(drop_image_embed=torch.tensor([False, True]), drop_text=torch.tensor([True, False]))
    out = net(torch.randn(B, 3, 16, 16), T, **base_cond(), **drops)
    assert out.shape == (B, 3, 16, 16)
    missing, zero = _all_grads_nonzero(net, out.square().mean())
    assert not missing and not zero, (missing, zero)


def test_tiny64_lite_preset_is_tiny64_with_less_attention_and_narrow_upsampling():
    from dalle2.presets import load_preset

    lite, full = load_preset("decoder", "tiny64_lite"), load_preset("decoder", "tiny64")
    assert lite["attention_levels"] == [3] and lite["narrow_upsample"] is True
    same = lambda p: {k: v for k, v in p.items() if k not in ("attention_levels", "narrow_upsample")}  # noqa: E731
    assert same(lite) == same(full)
    net = unet_from_preset("tiny64_lite", clip_dim=CLIP)
    assert count_parameters(net) < count_parameters(unet_from_preset("tiny64", clip_dim=CLIP))
    assert net(torch.randn(1, 3, 64, 64), T[:1], image_embed=torch.randn(1, CLIP)).shape == (1, 3, 64, 64)
