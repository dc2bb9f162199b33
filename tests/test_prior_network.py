"""PriorNetwork: shapes, masking, CFG null text, gradients, rotary, checkpointing, autocast, save/load, scaler."""

from __future__ import annotations

import io
import math

import pytest
import torch

from dalle2.prior import PRIOR_PRESETS, EmbeddingScaler, PriorNetwork, prior_from_preset

D, DT, L, B = 32, 24, 6, 3


def make_net(**kw) -> PriorNetwork:
    args = dict(embed_dim=D, text_token_dim=DT, width=64, depth=2, heads=2, dim_head=16, max_text_len=8)
    args.update(kw)
    return PriorNetwork(**args).eval()


def make_inputs(b: int = B):
    x = torch.randn(b, D)
    t = torch.randint(0, 1000, (b,))
    text_embed = torch.randn(b, D)
    tokens = torch.randn(b, L, DT)
    mask = torch.ones(b, L, dtype=torch.bool)
    mask[0, 4:] = False
    return x, t, text_embed, tokens, mask


@pytest.mark.parametrize("positional", ["learned", "rotary"])
def test_output_shape_and_finite(positional):
    net = make_net(positional=positional)
    x, t, te, tok, mask = make_inputs()
    out = net(x, t, text_embed=te, text_tokens=tok, text_mask=mask)
    assert out.shape == (B, D) and torch.isfinite(out).all()
    # without token features and with float timesteps
    out = net(x, t.float() + 0.5, text_embed=te)
    assert out.shape == (B, D) and torch.isfinite(out).all()


@pytest.mark.parametrize("positional", ["learned", "rotary"])
def test_padded_tokens_do_not_matter(positional):
    net = make_net(positional=positional)
    x, t, te, tok, mask = make_inputs()
    out = net(x, t, text_embed=te, text_tokens=tok, text_mask=mask)
    tok2 = tok.clone()
    tok2[0, 4:] = torch.randn(L - 4, DT) * 100
    tok2[0, 5] = float("nan")  # even garbage in a padded slot must not leak
    out2 = net(x, t, text_embed=te, text_tokens=tok2, text_mask=mask)
    torch.testing.assert_close(out, out2)
    # changing a real token does change the output
    tok3 = tok.clone()
    tok3[0, 1] += 1.0
    assert not torch.allclose(out[0], net(x, t, text_embed=te, text_tokens=tok3, text_mask=mask)[0])


def test_fully_padded_text_is_finite():
    net = make_net()
    x, t, te, tok, _ = make_inputs()
    mask = torch.zeros(B, L, dtype=torch.bool)
    mask[2] = True
    out = net(x, t, text_embed=te, text_tokens=tok, text_mask=mask)
    assert torch.isfinite(out).all()
    # also with gradients: no NaN grads from empty softmax rows
    net.train()
    net(x, t, text_embed=te, text_tokens=tok, text_mask=mask).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


def test_drop_text_makes_output_independent_of_text():
    net = make_net()
    x, t, te, tok, mask = make_inputs()
    drop = torch.tensor([True, False, True])
    out = net(x, t, text_embed=te, text_tokens=tok, text_mask=mask, drop_text=drop)
    te2, tok2 = torch.randn_like(te), torch.randn_like(tok)
    out2 = net(x, t, text_embed=te2, text_tokens=tok2, text_mask=mask, drop_text=drop)
    torch.testing.assert_close(out[drop], out2[drop])
    assert not torch.allclose(out[~drop], out2[~drop])
    # text embedding alone also matters when not dropped
    out3 = net(x, t, text_embed=te2, text_tokens=tok, text_mask=mask, drop_text=drop)
    assert not torch.allclose(out[~drop], out3[~drop])
    # the null branch does not depend on the padding mask either
    out4 = net(x, t, text_embed=te, text_tokens=tok, text_mask=torch.ones_like(mask), drop_text=drop)
    torch.testing.assert_close(out[drop], out4[drop])


@pytest.mark.parametrize("positional", ["learned", "rotary"])
def test_null_text_does_not_depend_on_text_length(positional):
    # classifier-free guidance: the unconditional branch must be the same whatever length the batch's text was
    # padded or trimmed to (else a prompt's guided sample would depend on its neighbours)
    net = make_net(positional=positional)
    x, t, te, tok, mask = make_inputs()
    drop = torch.ones(B, dtype=torch.bool)
    short = net(x, t, text_embed=te, text_tokens=tok[:, :2], text_mask=mask[:, :2], drop_text=drop)
    long = net(x, t, text_embed=te, text_tokens=tok, text_mask=mask, drop_text=drop)
    torch.testing.assert_close(short, long, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("positional", ["learned", "rotary"])
def test_gradients_reach_every_parameter(positional):
    net = make_net(positional=positional).train()
    x, t, te, tok, mask = make_inputs(4)
    drop = torch.tensor([True, False, False, False])  # null params are used only on dropped rows
    net(x, t, text_embed=te, text_tokens=tok, text_mask=mask, drop_text=drop).pow(2).sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name


def test_grad_checkpointing_same_grads():
    torch.manual_seed(1)
    a = make_net(positional="rotary").train()
    b = make_net(positional="rotary", grad_checkpointing=True).train()
    b.load_state_dict(a.state_dict())
    x, t, te, tok, mask = make_inputs()
    outs = []
    for net in (a, b):
        out = net(x, t, text_embed=te, text_tokens=tok, text_mask=mask)
        out.pow(2).sum().backward()
        outs.append(out)
    torch.testing.assert_close(outs[0], outs[1])
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, msg=n)


def test_bf16_autocast_finite():
    net = make_net()
    x, t, te, tok, mask = make_inputs()
    mask[1] = False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x, t, text_embed=te, text_tokens=tok, text_mask=mask, drop_text=torch.tensor([False, True, False]))
    assert out.shape == (B, D) and torch.isfinite(out.float()).all()


@pytest.mark.parametrize("positional", ["learned", "rotary"])
def test_save_load_identical(positional):
    net = make_net(positional=positional)
    x, t, te, tok, mask = make_inputs()
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    buf.seek(0)
    torch.manual_seed(123)
    net2 = make_net(positional=positional)
    net2.load_state_dict(torch.load(buf, weights_only=True))
    a = net(x, t, text_embed=te, text_tokens=tok, text_mask=mask)
    b = net2(x, t, text_embed=te, text_tokens=tok, text_mask=mask)
    assert torch.equal(a, b)


def test_scaler_round_trip():
    scaler = EmbeddingScaler.for_dim(D)
    assert scaler.scale == pytest.approx(math.sqrt(D))
    e = torch.randn(5, D) * 3
    s = scaler.scale_embed(e)
    torch.testing.assert_close(s.norm(dim=-1), torch.full((5,), math.sqrt(D)))
    back = scaler.unscale_embed(s)
    torch.testing.assert_close(back, torch.nn.functional.normalize(e, dim=-1))
    torch.testing.assert_close(EmbeddingScaler(scale=17.2).unscale_embed(s * 2, renormalize=False) * 17.2, s * 2)
    with pytest.raises(ValueError):
        EmbeddingScaler(scale=0.0)


def test_presets_and_errors():
    assert set(PRIOR_PRESETS) == {"tiny", "paper", "bench"}
    with torch.device("meta"):
        bench = prior_from_preset("bench")
        paper = prior_from_preset("paper", embed_dim=768, text_token_dim=768)
    assert bench.embed_dim == 512 and len(bench.blocks) == 6
    assert 1.0e9 < sum(p.numel() for p in paper.parameters()) < 1.5e9
    tiny = prior_from_preset("tiny", embed_dim=D, text_token_dim=DT, depth=1)
    assert tiny(torch.randn(2, D), torch.zeros(2), text_embed=torch.randn(2, D)).shape == (2, D)
    # the one preset definition (dalle2/presets/model/prior/tiny.yaml) carries the tiny CLIP's dims; others override
    assert prior_from_preset("tiny", depth=1).embed_dim == 128
    with pytest.raises(ValueError, match="unknown prior preset"):
        prior_from_preset("huge", embed_dim=D, text_token_dim=DT)
    with pytest.raises(ValueError, match="unknown positional"):
        make_net(positional="alibi")
    with pytest.raises(ValueError, match="max_text_len"):
        make_net()(torch.randn(1, D), torch.zeros(1), text_embed=torch.randn(1, D), text_tokens=torch.randn(1, 9, DT))


def test_attention_mask_rows_never_empty_and_causal():
    net = make_net()
    valid = torch.tensor([[False, False, True, True, True], [True, True, True, True, True]])
    mask = net._attention_mask(valid)  # (B, 1, N, N)
    assert mask.shape == (2, 1, 5, 5)
    assert mask.any(dim=-1).all()  # every query row sees at least one key (no NaN rows in SDPA kernels)
    assert not mask[:, 0].triu(1).any()  # causal
    assert not mask[0, 0, 2:, :2].any()  # valid rows never see padded keys
    assert torch.equal(mask[1, 0], torch.ones(5, 5, dtype=torch.bool).tril())


def _full_sequence_reference(net: PriorNetwork, x, t, te, tok, mask) -> torch.Tensor:
    """One causal pass over the whole sequence [tokens, text emb, t, x, query] (what the network computes in two)."""
    tokens, valid = net._text_tokens(tok, mask, None)
    b = x.shape[0]
    h = torch.cat(
        [
            tokens,
            net.text_embed_proj(torch.nn.functional.normalize(te, dim=-1))[:, None],
            torch.stack([net.time_embed(t), net.x_proj(x), net.query[None].expand(b, -1)], dim=1),
        ],
        dim=1,
    )
    positions = torch.cat([torch.arange(tok.shape[1]), torch.arange(4) + net.max_text_len])
    h, rotary = net._position(h, positions)
    full_mask = net._attention_mask(torch.cat([valid, torch.ones(b, 4, dtype=torch.bool)], dim=1))
    for block in net.blocks:
        h, _ = block(h, full_mask, rotary)
    return net.out_proj(net.ln_final(h[:, -1]))


@pytest.mark.parametrize("positional", ["learned", "rotary"])
def test_text_prefix_pass_equals_one_causal_pass(positional):
    net = make_net(positional=positional)
    x, t, te, tok, mask = make_inputs()
    out = net(x, t, text_embed=te, text_tokens=tok, text_mask=mask)
    torch.testing.assert_close(out, _full_sequence_reference(net, x, t, te, tok, mask), rtol=1e-5, atol=1e-5)
    prefix = net.encode_text(text_embed=te, text_tokens=tok, text_mask=mask)
    torch.testing.assert_close(net(x, t, prefix=prefix), out, rtol=0, atol=0)
    with pytest.raises(ValueError, match="prefix has batch"):
        net(x[:2], t[:2], prefix=prefix)
    with pytest.raises(ValueError, match="needs text_embed"):
        net(x, t)


def test_cached_text_prior_reuses_the_prefix_under_guidance():
    from dalle2.diffusion.guidance import cfg_model_fn
    from dalle2.prior import CachedTextPrior

    net = make_net()
    x, t, te, tok, mask = make_inputs()
    kw = dict(text_embed=te, text_tokens=tok, text_mask=mask, drop_text=torch.zeros(B, dtype=torch.bool))
    calls = []
    encode = net.encode_text
    net.encode_text = lambda **k: calls.append(1) or encode(**k)
    cached, plain = cfg_model_fn(CachedTextPrior(net), guidance_scale=3.0), cfg_model_fn(net, guidance_scale=3.0)
    for step in range(3):  # a sampler's steps: new x and t, the same text
        xs, ts = torch.randn_like(x), torch.full_like(t, 900 - 300 * step)
        n_before = len(calls)
        torch.testing.assert_close(cached(xs, ts, **kw), plain(xs, ts, **kw), rtol=1e-5, atol=1e-5)
        assert len(calls) - n_before == (2 if step == 0 else 1)  # cached: once in all; plain: every call
    # other text -> the prefix is recomputed
    te2 = torch.randn_like(te)
    torch.testing.assert_close(
        cached(x, t, **{**kw, "text_embed": te2}), plain(x, t, **{**kw, "text_embed": te2}), rtol=1e-5, atol=1e-5
    )
