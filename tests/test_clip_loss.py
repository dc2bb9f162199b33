"""ClipLoss: single process against the formula, 2-process gloo against the full-batch computation."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dalle2.clip.loss import ClipLoss
from dalle2.clip.model import CLIP

TINY = dict(
    embed_dim=8,
    image_size=8,
    vision_width=16,
    vision_layers=1,
    vision_heads=2,
    vision_patch_size=4,
    context_length=6,
    vocab_size=20,
    text_width=16,
    text_layers=1,
    text_heads=2,
)
# (local_loss, gather_with_grad) combinations run in the distributed test
MODES = [(True, True), (False, True), (False, False), (True, False)]


def test_single_process_loss_matches_formula():
    img = F.normalize(torch.randn(5, 8), dim=-1)
    txt = F.normalize(torch.randn(5, 8), dim=-1)
    scale = torch.tensor(14.0)
    out = ClipLoss()(img, txt, scale)
    assert set(out) == {"loss", "loss/image_to_text", "loss/text_to_image", "logit_scale"}
    logits = (scale * img @ txt.t()).numpy().astype(np.float64)

    def ce(lg):  # mean over rows of -log softmax at the diagonal
        lg = lg - lg.max(1, keepdims=True)
        return float(np.mean(np.log(np.exp(lg).sum(1)) - np.diag(lg)))

    assert out["loss/image_to_text"].item() == pytest.approx(ce(logits), rel=1e-5)
    assert out["loss/text_to_image"].item() == pytest.approx(ce(logits.T), rel=1e-5)
    assert out["loss"].item() == pytest.approx(0.5 * (ce(logits) + ce(logits.T)), rel=1e-5)
    perfect = ClipLoss()(img, img, torch.tensor(100.0))["loss"]
    assert perfect.item() < 0.5 * out["loss"].item()
    with pytest.raises(ValueError, match="must both be"):
        ClipLoss()(img, txt[:3], scale)


# -- distributed ----------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _loss_and_grads(model, images, tokens, loss_fn):
    model.zero_grad(set_to_none=True)
    out = model(images, tokens)
    loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])["loss"]
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _worker(rank: int, world: int, port: int, data_path: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        data = torch.load(data_path, weights_only=True)
        model = CLIP(**TINY).double()
        model.load_state_dict(data["state_dict"])
        b = data["images"].shape[0] // world
        images, tokens = data["images"][rank * b : (rank + 1) * b], data["tokens"][rank * b : (rank + 1) * b]
        results = {}
        for local_loss, with_grad in MODES:
            loss_fn = ClipLoss(local_loss=local_loss, gather_with_grad=with_grad)
            results[f"{local_loss}-{with_grad}"] = _loss_and_grads(model, images, tokens, loss_fn)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_distributed_loss_and_gradients_match_full_batch(tmp_path):
    """2 ranks x 3 pairs vs 1 process x 6 pairs.  Under DDP (gradients *averaged* over ranks):

    - gather_with_grad=True (local or not): the rank-averaged gradient equals the full-batch gradient;
    - local_loss=False, gather_with_grad=False: the rank-*summed* tower gradients equal it (DDP's average is 1/W of
      it) but logit_scale's averaged gradient does;
    - local_loss=True, gather_with_grad=False: the loss is right, the gradient is not (missing cross-rank terms).
    """
    world, batch = 2, 6
    torch.manual_seed(0)
    model = CLIP(**TINY).double()
    images = torch.randn(batch, 3, 8, 8, dtype=torch.float64)
    tokens = torch.randint(1, 19, (batch, 6))
    tokens[torch.arange(batch), torch.tensor([2, 5, 3, 1, 4, 5])] = 19  # eot at varied positions
    data_path = str(tmp_path / "data.pt")
    torch.save({"state_dict": model.state_dict(), "images": images, "tokens": tokens}, data_path)

    torch.multiprocessing.spawn(_worker, args=(world, _free_port(), data_path, str(tmp_path)), nprocs=world)

    full_loss, full_grads = _loss_and_grads(model, images, tokens, ClipLoss())
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    for local_loss, with_grad in MODES:
        key = f"{local_loss}-{with_grad}"
        losses = [ranks[r][key][0] for r in range(world)]
        torch.testing.assert_close(torch.stack(losses).mean(), full_loss, atol=1e-5, rtol=1e-5)
        summed = {n: sum(ranks[r][key][1][n] for r in range(world)) for n in full_grads}
        # what DDP's all-reduce average gives; without gather_with_grad only the rank-*sum* of the tower gradients
        # is right (logit_scale, seen whole by every rank, is right after averaging)
        combined = {n: g / world if with_grad or n == "logit_scale" else g for n, g in summed.items()}
        close = [torch.allclose(combined[n], full_grads[n], atol=1e-5, rtol=1e-5) for n in full_grads]
        if local_loss and not with_grad:
            assert not all(close), "local loss without gather_with_grad unexpectedly gave the full-batch gradient"
        else:
            for n in full_grads:
                torch.testing.assert_close(combined[n], full_grads[n], atol=1e-5, rtol=1e-5, msg=f"{key} {n}")
