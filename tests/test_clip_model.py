"""CLIP model: shapes, config round trip, gradients, logit-scale clamp, eot pooling, preprocessing, ResNet tower."""

from __future__ import annotations

import math

import pytest
import torch

from dalle2.clip.model import (
    CLIP,
    CLIP_MEAN,
    CLIP_PRESETS,
    CLIP_STD,
    LOGIT_SCALE_MAX,
    clip_preset,
    preprocess_for_clip,
)

TINY = dict(
    embed_dim=16,
    image_size=16,
    vision_width=32,
    vision_layers=2,
    vision_heads=2,
    vision_patch_size=8,
    context_length=12,
    vocab_size=50,
    text_width=32,
    text_layers=2,
    text_heads=2,
)


def _tokens(lengths, *, ctx=12, vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(len(lengths), ctx, dtype=torch.long)
    for i, n in enumerate(lengths):
        tokens[i, : n - 1] = torch.randint(1, vocab - 1, (n - 1,), generator=g)
        tokens[i, n - 1] = vocab - 1
    return tokens


def test_shapes_and_forward_outputs():
    model = CLIP(**TINY)
    images, tokens = torch.randn(3, 3, 16, 16), _tokens([4, 7, 12])
    assert model.encode_image(images).shape == (3, 16)
    states, pooled = model.encode_text_tokens(tokens)
    assert states.shape == (3, 12, 32) and pooled.shape == (3, 16)
    torch.testing.assert_close(pooled, model.encode_text(tokens))
    out = model(images, tokens)
    assert set(out) == {"image_features", "text_features", "logit_scale"}
    torch.testing.assert_close(out["image_features"].norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(out["text_features"].norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(out["logit_scale"], torch.tensor(1 / 0.07))
    with pytest.raises(ValueError, match="expected images of size 16x16"):
        model.encode_image(torch.randn(1, 3, 32, 32))


def test_config_round_trip_and_presets():
    model = CLIP(**TINY)
    again = CLIP.from_config(model.to_config())
    again.load_state_dict(model.state_dict())
    assert again.config == model.config
    assert set(CLIP_PRESETS) >= {"tiny", "vit_b32", "vit_b16", "rn50"}
    assert clip_preset("tiny", vocab_size=123)["vocab_size"] == 123
    b32 = CLIP_PRESETS["vit_b32"]
    assert (b32["embed_dim"], b32["vision_width"], b32["vision_patch_size"], b32["text_heads"]) == (512, 768, 32, 8)
    with pytest.raises(ValueError, match="unknown CLIP preset"):
        clip_preset("vit_z99")


def test_tiny_preset_is_small():
    model = CLIP(**CLIP_PRESETS["tiny"])
    assert sum(p.numel() for p in model.parameters()) < 5_000_000
    out = model(torch.randn(2, 3, 32, 32), _tokens([5, 77], ctx=77, vocab=8192))
    assert out["image_features"].shape == (2, 128)


def test_gradients_reach_every_parameter():
    model = CLIP(**TINY)
    out = model(torch.randn(4, 3, 16, 16), _tokens([3, 5, 8, 12]))
    logits = out["logit_scale"] * out["image_features"] @ out["text_features"].t()
    labels = torch.arange(4)
    ce = torch.nn.functional.cross_entropy
    (ce(logits, labels) + ce(logits.t(), labels)).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == [], no_grad


def test_logit_scale_clamped_at_100():
    model = CLIP(**TINY)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    out = model(torch.randn(2, 3, 16, 16), _tokens([3, 4]))
    torch.testing.assert_close(out["logit_scale"], torch.tensor(100.0))
    assert math.isclose(LOGIT_SCALE_MAX, math.log(100.0))


def test_text_features_taken_at_end_of_text():
    model = CLIP(**TINY).eval()
    tokens = _tokens([5, 9])
    changed = tokens.clone()
    changed[0, 5:] = torch.randint(1, 49, (7,))  # after eot (position 4): must not matter (causal + eot pooling)
    changed[1, 9:] = 7
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(tokens), model.encode_text(changed))
        before = changed.clone()
        before[0, 2] = (before[0, 2] % 47) + 1  # before eot: must matter
        assert not torch.allclose(model.encode_text(before)[0], model.encode_text(tokens)[0])
        # shorter sequences than context_length work and give the same features
        torch.testing.assert_close(model.encode_text(tokens[:, :9]), model.encode_text(tokens))


def test_grad_checkpointing_matches():
    torch.manual_seed(0)
    plain = CLIP(**TINY)
    ckpt = CLIP(**{**TINY, "grad_checkpointing": True})
    ckpt.load_state_dict(plain.state_dict())
    images, tokens = torch.randn(2, 3, 16, 16), _tokens([3, 6])
    for m in (plain, ckpt):
        out = m(images, tokens)
        (out["image_features"] @ out["text_features"].t()).sum().backward()
    for (n, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=n)


def test_resnet_tower():
    model = CLIP(**{**TINY, "image_size": 64, "vision_width": 8, "vision_layers": [1, 2, 1, 1], "vision_heads": 4})
    assert model.config["vision_layers"] == [1, 2, 1, 1]
    feats = model.encode_image(torch.randn(2, 3, 64, 64))
    assert feats.shape == (2, 16) and torch.isfinite(feats).all()
    rn50 = CLIP_PRESETS["rn50"]
    assert rn50["vision_layers"] == [3, 4, 6, 3] and rn50["embed_dim"] == 1024


def test_preprocess_for_clip():
    white = torch.ones(2, 3, 32, 32)  # +1 -> pixel 1.0
    out = preprocess_for_clip(white, 16)
    assert out.shape == (2, 3, 16, 16)
    expected = (1.0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(out[0, :, 5, 5], expected)
    black = preprocess_for_clip(-torch.ones(1, 3, 20, 30), 16)  # non-square: resize shorter side, centre crop
    assert black.shape == (1, 3, 16, 16)
    torch.testing.assert_close(black[0, :, 0, 0], -torch.tensor(CLIP_MEAN) / torch.tensor(CLIP_STD))
    same = torch.rand(1, 3, 16, 16) * 2 - 1  # no resize when the size already matches
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(preprocess_for_clip(same, 16), ((same + 1) / 2 - mean) / std)
