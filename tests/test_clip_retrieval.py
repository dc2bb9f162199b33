"""Retrieval metrics (Recall@K, mean rank) and the whole-set contrastive loss against a brute-force numpy reference
and the former full N x N computation: in chunks, with rows split over ranks, with ties; memory bounded by the chunk."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dalle2.clip.retrieval import contrastive_loss, metrics_from_ranks, pair_losses, pair_ranks, retrieval_metrics


def _brute_force(img: np.ndarray, txt: np.ndarray) -> dict[str, float]:
    img = img / np.linalg.norm(img, axis=1, keepdims=True)
    txt = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    sims = img @ txt.T
    out = {}
    for name, s in (("image_to_text", sims), ("text_to_image", sims.T)):
        ranks = np.array([1 + int(np.sum(s[i] > s[i, i])) for i in range(len(s))])
        for k in (1, 5, 10):
            out[f"{name}_R@{k}"] = float(np.mean(ranks <= k))
        out[f"{name}_mean_rank"] = float(ranks.mean())
    out["num_samples"] = len(img)
    return out


def test_retrieval_matches_brute_force_in_chunks():
    g = torch.Generator().manual_seed(0)
    txt = torch.randn(37, 6, generator=g)
    img = txt + 1.2 * torch.randn(37, 6, generator=g)  # noisy pairs: ranks spread over 1..37
    ref = _brute_force(img.double().numpy(), txt.double().numpy())
    for chunk in (5, 37, 1000):
        got = retrieval_metrics(img, txt, chunk_size=chunk)
        assert set(got) == set(ref)
        for k, v in ref.items():
            assert got[k] == pytest.approx(v, abs=1e-6), (chunk, k)
    assert 0 < ref["image_to_text_R@1"] < 1 and ref["text_to_image_mean_rank"] > 1


def test_retrieval_identity_is_perfect():
    eye = torch.eye(12)
    got = retrieval_metrics(eye, 3.0 * eye, chunk_size=5)
    assert got["image_to_text_R@1"] == 1.0 and got["text_to_image_R@1"] == 1.0
    assert got["image_to_text_mean_rank"] == 1.0 and got["num_samples"] == 12
    rev = retrieval_metrics(eye, eye.flip(0))  # nothing matches: every correct pair ties at 0 with 10 others
    assert rev["image_to_text_R@1"] < 1.0


def _full_matrix(img: torch.Tensor, txt: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The former validation: the whole N x N similarity matrix at once (ranks with ties in the query's favour)."""
    sims = img @ txt.t()
    diag = sims.diag()
    i2t = (sims > diag[:, None]).sum(1) + 1
    t2i = (sims.t() > diag[:, None]).sum(1) + 1
    labels = torch.arange(len(img))
    loss = 0.5 * (F.cross_entropy(scale * sims, labels) + F.cross_entropy(scale * sims.t(), labels))
    return i2t, t2i, loss


@pytest.mark.parametrize("quantised", [False, True])
def test_chunked_and_sharded_rows_equal_the_full_matrix(quantised):
    g = torch.Generator().manual_seed(1)
    txt = torch.randn(53, 5, generator=g)
    img = txt + torch.randn(53, 5, generator=g)
    if quantised:  # few distinct +-1 vectors: exact (integer) dot products, many exact ties ranked the same way
        txt, img = txt.sign(), img.sign()
    else:
        img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    i2t, t2i, loss = _full_matrix(img, txt, 30.0)
    assert not quantised or (i2t > 1).any() and len({tuple(r) for r in img.tolist()}) < 53
    for chunk in (1, 8, 53, 500):
        assert torch.equal(pair_ranks(img, txt, chunk_size=chunk), i2t)
        assert torch.equal(pair_ranks(txt, img, chunk_size=chunk), t2i)
        torch.testing.assert_close(contrastive_loss(img, txt, 30.0, chunk_size=chunk), loss)
    # rows split over 3 "ranks" (rank::3), per-row values concatenated: the same metrics and loss
    world = 3
    parts = [torch.arange(r, 53, world) for r in range(world)]
    got_i2t = torch.cat([pair_ranks(img, txt, rows=p, chunk_size=4) for p in parts])
    got_t2i = torch.cat([pair_ranks(txt, img, rows=p, chunk_size=4) for p in parts])
    order = torch.cat(parts)
    assert torch.equal(got_i2t, i2t[order]) and torch.equal(got_t2i, t2i[order])
    assert metrics_from_ranks(got_i2t, got_t2i) == metrics_from_ranks(i2t, t2i)
    if not quantised:  # (retrieval_metrics normalises: +-1 / sqrt5 products are no longer exact)
        assert retrieval_metrics(img, txt) == metrics_from_ranks(i2t, t2i)
    terms = torch.cat(
        [torch.cat([pair_losses(img, txt, 30.0, rows=p), pair_losses(txt, img, 30.0, rows=p)]) for p in parts]
    )
    torch.testing.assert_close(terms.mean(), loss)


def test_memory_is_bounded_by_the_chunk_size():
    """No operation allocates anything near an N x N matrix: the largest single allocation stays at chunk x N."""
    from torch.profiler import ProfilerActivity, profile

    n, chunk = 2048, 64
    feats = F.normalize(torch.randn(n, 8), dim=-1)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        retrieval_metrics(feats, feats.flip(0), chunk_size=chunk)
        contrastive_loss(feats, feats.flip(0), 10.0, chunk_size=chunk)
    biggest = max(e.self_cpu_memory_usage for e in prof.events())
    assert 0 < biggest <= 2 * chunk * n * 4  # float32 (chunk, N) blocks; N x N would be 16 MiB
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _full_matrix(feats, feats.flip(0), 10.0)
    assert max(e.self_cpu_memory_usage for e in prof.events()) >= n * n * 4  # the check sees a full matrix
