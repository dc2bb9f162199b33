"""Prior sampling: reranking, batched k-candidate sampling with CFG, determinism, and a tiny overfit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dalle2.diffusion.gaussian import GaussianDiffusion
from dalle2.diffusion.schedules import Schedule
from dalle2.prior import EmbeddingScaler, PriorNetwork, rerank_by_similarity, sample_prior, sample_prior_candidates

D, DT, L, B = 16, 12, 5, 3


def make_net(**kw) -> PriorNetwork:
    args = dict(embed_dim=D, text_token_dim=DT, width=64, depth=2, heads=2, dim_head=32, max_text_len=L)
    args.update(kw)
    return PriorNetwork(**args)


def make_diffusion(objective: str = "x0", T: int = 100) -> GaussianDiffusion:
    return GaussianDiffusion(schedule=Schedule.make("cosine", T), objective=objective)


def make_text(b: int = B):
    te = torch.randn(b, D)
    tok = torch.randn(b, L, DT)
    mask = torch.ones(b, L, dtype=torch.bool)
    mask[0, 3:] = False
    return te, tok, mask


class Counting(torch.nn.Module):
    """Wraps a network and records the batch size of every call."""

    def __init__(self, net):
        super().__init__()
        self.net, self.batches = net, []

    def forward(self, x, t, **kw):
        self.batches.append(x.shape[0])
        return self.net(x, t, **kw)


def test_rerank_picks_argmax():
    text = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    cands = torch.tensor(
        [
            [[0.0, 1.0], [0.9, 0.1], [-1.0, 0.0]],  # prompt 0: best is index 1
            [[1.0, 0.0], [0.6, 0.8], [0.0, 0.5]],  # prompt 1: best is index 1 (0.8 > 0.5)
        ]
    )
    best, idx = rerank_by_similarity(cands, text)
    assert idx.tolist() == [1, 1]
    torch.testing.assert_close(best, cands[[0, 1], [1, 1]])
    # random: matches a brute-force per-prompt argmax
    cands, text = torch.randn(5, 4, 8), torch.randn(5, 8)
    best, idx = rerank_by_similarity(cands, text)
    for i in range(5):
        j = int(torch.argmax(cands[i] @ F.normalize(text[i], dim=0)))
        assert idx[i] == j and torch.equal(best[i], cands[i, j])
    with pytest.raises(ValueError, match="rerank expects"):
        rerank_by_similarity(torch.randn(2, 8), text)


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_sample_prior_batched_and_deterministic(guidance_scale):
    net = Counting(make_net().eval())
    diffusion, scaler = make_diffusion(), EmbeddingScaler.for_dim(D)
    te, tok, mask = make_text()
    kw = dict(
        text_embed=te,
        text_tokens=tok,
        text_mask=mask,
        n_samples_per_prompt=4,
        steps=5,
        guidance_scale=guidance_scale,
        scaler=scaler,
    )
    a = sample_prior(net, diffusion, generator=torch.Generator().manual_seed(7), **kw)
    assert a.shape == (B, D) and torch.isfinite(a).all()
    torch.testing.assert_close(a.norm(dim=-1), torch.ones(B))
    # one model call per step over all B * k candidates (x2 for the CFG [cond; uncond] batch)
    assert net.batches == [B * 4 * (2 if guidance_scale != 1.0 else 1)] * 5
    b = sample_prior(net, diffusion, generator=torch.Generator().manual_seed(7), **kw)
    assert torch.equal(a, b)
    c = sample_prior(net, diffusion, generator=torch.Generator().manual_seed(8), **kw)
    assert not torch.allclose(a, c)
    # the returned sample is the best-scoring candidate of the same draw
    cands = sample_prior_candidates(net, diffusion, generator=torch.Generator().manual_seed(7), **kw)
    assert cands.shape == (B, 4, D)
    best, _ = rerank_by_similarity(cands, te)
    torch.testing.assert_close(best, a)


def test_sample_prior_guidance_and_samplers():
    net = make_net().eval()
    diffusion, scaler = make_diffusion(), EmbeddingScaler.for_dim(D)
    te, tok, mask = make_text()
    kw = dict(text_embed=te, n_samples_per_prompt=2, steps=4, scaler=scaler)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    plain = sample_prior(net, diffusion, generator=g(), **kw)
    guided = sample_prior(net, diffusion, generator=g(), guidance_scale=4.0, **kw)
    assert not torch.allclose(plain, guided)
    for sampler, eta in [("ddim", 1.0), ("ddpm", 0.0), ("dpmpp_2m", 0.0)]:
        out = sample_prior(net, diffusion, generator=g(), sampler=sampler, eta=eta, **kw)
        assert out.shape == (B, D) and torch.isfinite(out).all()
    raw = sample_prior_candidates(net, diffusion, generator=g(), renormalize=False, **kw)
    assert raw.shape == (B, 2, D)
    with pytest.raises(ValueError, match="n_samples_per_prompt"):
        sample_prior(net, diffusion, **(kw | {"n_samples_per_prompt": 0}))


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one intra-op thread (and do not fight other processes for cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_tiny_overfit_then_sample(one_thread):
    """Network + GaussianDiffusion(objective='x0') memorise 8 (text -> image embedding) pairs; sampling with
    the trained network recovers the paired image embeddings."""
    torch.manual_seed(0)
    n = 8
    net = make_net()
    diffusion, scaler = make_diffusion(), EmbeddingScaler.for_dim(D)
    te, tok = torch.randn(n, D), torch.randn(n, L, DT)
    target = F.normalize(torch.randn(n, D), dim=-1)
    img = scaler.scale_embed(target)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(150):
        drop = torch.rand(n, generator=g) < 0.1
        out = diffusion.training_losses(
            net, img, generator=g, model_kwargs=dict(text_embed=te, text_tokens=tok, drop_text=drop)
        )
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.1 * first, (first, last)
    net.eval()
    samples = sample_prior(
        net,
        diffusion,
        text_embed=te,
        text_tokens=tok,
        n_samples_per_prompt=2,
        steps=10,
        guidance_scale=2.0,
        generator=torch.Generator().manual_seed(0),
        scaler=scaler,
    )
    cos = (samples * target).sum(-1)
    assert cos.min() > 0.9, cos
