"""Retrieval metrics (Recall@K, mean rank) and the whole-set contrastive loss against a brute-force numpy reference
and the former full N x N computation: in chunks, with rows split over ranks, with ties (a random tie-break in
expectation, checked against sampled tie-breaks); degenerate embeddings (NaN, constant, shuffled) score chance or
raise; the embedding-spread collapse detector; memory bounded by the chunk."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dalle2.clip.retrieval import (
    contrastive_loss,
    embedding_spread,
    metrics_from_ranks,
    pair_losses,
    pair_rank_counts,
    retrieval_metrics,
)


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
    """The former validation: the whole N x N similarity matrix at once -> (better, ties) counts per row."""
    sims = img @ txt.t()
    diag = sims.diag()

    def counts(s):
        return torch.stack([(s > diag[:, None]).sum(1), (s == diag[:, None]).sum(1) - 1], dim=1)

    i2t, t2i = counts(sims), counts(sims.t())
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
    assert not quantised or (i2t[:, 1] > 0).any() and len({tuple(r) for r in img.tolist()}) < 53
    for chunk in (1, 8, 53, 500):
        assert torch.equal(pair_rank_counts(img, txt, chunk_size=chunk), i2t)
        assert torch.equal(pair_rank_counts(txt, img, chunk_size=chunk), t2i)
        torch.testing.assert_close(contrastive_loss(img, txt, 30.0, chunk_size=chunk), loss)
    # rows split over 3 "ranks" (rank::3), per-row values concatenated: the same metrics and loss
    world = 3
    parts = [torch.arange(r, 53, world) for r in range(world)]
    got_i2t = torch.cat([pair_rank_counts(img, txt, rows=p, chunk_size=4) for p in parts])
    got_t2i = torch.cat([pair_rank_counts(txt, img, rows=p, chunk_size=4) for p in parts])
    order = torch.cat(parts)
    assert torch.equal(got_i2t, i2t[order]) and torch.equal(got_t2i, t2i[order])
    assert metrics_from_ranks(got_i2t, got_t2i) == metrics_from_ranks(i2t, t2i)
    if not quantised:  # (retrieval_metrics normalises: +-1 / sqrt5 products are no longer exact)
        assert retrieval_metrics(img, txt) == metrics_from_ranks(i2t, t2i)
    terms = torch.cat(
        [torch.cat([pair_losses(img, txt, 30.0, rows=p), pair_losses(txt, img, 30.0, rows=p)]) for p in parts]
    )
    torch.testing.assert_close(terms.mean(), loss)


N_DEGENERATE = 12


@pytest.mark.parametrize("case", ["constant", "zeros", "constant_text"])
def test_collapsed_embeddings_score_chance_not_perfect(case):
    """Every similarity equal: formerly R@1 = 1.0 (ties in the query's favour); now exactly chance."""
    n = N_DEGENERATE
    img = torch.ones(n, 8) if case != "zeros" else torch.zeros(n, 8)
    txt = img.clone() if case != "constant_text" else torch.arange(8.0).expand(n, 8).clone()
    got = retrieval_metrics(img, txt)
    for d in ("image_to_text", "text_to_image"):
        assert got[f"{d}_R@1"] == pytest.approx(1 / n) and got[f"{d}_R@5"] == pytest.approx(5 / n)
        assert got[f"{d}_R@10"] == pytest.approx(10 / n) and got[f"{d}_mean_rank"] == pytest.approx((n + 1) / 2)


@pytest.mark.parametrize("where", ["image", "text", "both"])
def test_nan_or_inf_embeddings_are_an_error_naming_the_metric_and_rows(where):
    img, txt = torch.randn(N_DEGENERATE, 8), torch.randn(N_DEGENERATE, 8)
    if where in ("image", "both"):
        img[:] = float("nan")
    if where in ("text", "both"):
        txt[[2, 5]] = float("inf")
    tower = "image" if where != "text" else "text"
    rows = N_DEGENERATE if tower == "image" else 2
    with pytest.raises(ValueError, match=rf"retrieval_metrics: {rows} of {N_DEGENERATE} {tower} embedding rows hold"):
        retrieval_metrics(img, txt)
    with pytest.raises(ValueError, match=rf"contrastive_loss: {rows} of {N_DEGENERATE} {tower} embedding rows"):
        contrastive_loss(img, txt, 10.0)


def test_shuffled_pairs_score_about_chance():
    g = torch.Generator().manual_seed(3)
    txt = torch.randn(200, 16, generator=g)
    img = txt + 0.3 * torch.randn(200, 16, generator=g)
    good = retrieval_metrics(img, txt)
    bad = retrieval_metrics(img, txt[torch.randperm(200, generator=g)])
    assert good["image_to_text_R@1"] > 0.9
    assert bad["image_to_text_R@1"] < 0.05 and bad["text_to_image_R@10"] < 0.15
    assert 70 < bad["image_to_text_mean_rank"] < 130  # chance: (N + 1) / 2 = 100.5


def test_expected_ties_equal_the_mean_of_sampled_tie_breaks():
    """Duplicate captions (the built-in data has many): the metric equals the average over random orders of the
    tied keys, here sampled by breaking each tie with a tiny random jitter."""
    g = torch.Generator().manual_seed(4)
    classes = torch.randn(5, 8, generator=g)
    label = torch.arange(20) % 5
    txt = classes[label]  # 4 identical captions per class
    img = classes[label] + 0.05 * torch.randn(20, 8, generator=g)
    want = retrieval_metrics(img, txt)
    assert want["image_to_text_R@1"] == pytest.approx(0.25) and want["image_to_text_R@5"] == 1.0
    draws = [retrieval_metrics(img, txt + 1e-4 * torch.randn(20, 8, generator=g)) for _ in range(400)]
    for key in ("image_to_text_R@1", "image_to_text_R@5", "image_to_text_mean_rank", "text_to_image_R@1"):
        assert np.mean([d[key] for d in draws]) == pytest.approx(want[key], abs=0.02 * max(1.0, want[key])), key


def test_embedding_spread_flags_a_collapse():
    g = torch.Generator().manual_seed(5)
    spread = embedding_spread(torch.randn(500, 32, generator=g))
    assert abs(spread["mean_cosine"]) < 0.01 and 0.9 < spread["std"] < 1.05
    collapsed = embedding_spread(torch.randn(1, 32, generator=g) + 1e-3 * torch.randn(500, 32, generator=g))
    assert collapsed["mean_cosine"] > 0.99 and collapsed["std"] < 0.05
    x = torch.randn(7, 4, generator=g)
    u = F.normalize(x, dim=-1)
    cos = u @ u.t()
    assert embedding_spread(x)["mean_cosine"] == pytest.approx(float((cos.sum() - cos.trace()) / 42), abs=1e-6)


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
