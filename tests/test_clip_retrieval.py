"""Retrieval metrics (Recall@K, mean rank) against a brute-force numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dalle2.clip.retrieval import retrieval_metrics


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
