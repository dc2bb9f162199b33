"""Symmetric InfoNCE over the global batch, with features all-gathered across ranks.

Gradient bookkeeping under DDP (which *averages* gradients over the W ranks), for the full-batch mean loss L:

- ``gather_with_grad=True`` (either ``local_loss``): the all-gather's backward sums every rank's gradient into the
  owner of each feature, so the DDP-averaged gradient equals dL/dθ exactly.  ``local_loss=True`` computes only the
  local rows (B x WB logits instead of WB x WB), so it is the cheap exact choice — the default.
- ``gather_with_grad=False, local_loss=False``: every rank computes L, gradients reach local features only; for
  the towers the *sum* over ranks equals dL/dθ (DDP's average is 1/W of it) while ``logit_scale``, which every
  rank sees whole, gets the right gradient — an inconsistent scaling, avoid.
- ``gather_with_grad=False, local_loss=True``: the loss value is right but the gradient misses the terms of other
  ranks' rows through this rank's columns — it is not the full-batch gradient (open_clip's cheap approximation).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sums every rank's gradient and returns this rank's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        rank, world = _world()
        ctx.rows = (rank * x.shape[0], (rank + 1) * x.shape[0])
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rows[0] : ctx.rows[1]]


def gather_features(x: torch.Tensor, *, with_grad: bool) -> torch.Tensor:
    """x: (B, D) on every rank (same B) -> (W*B, D) in rank order.  Identity when not distributed.

    With ``with_grad`` the gather is differentiable (its backward sums the gradients of every rank); otherwise
    the other ranks' rows are constants and this rank's rows keep their graph.
    """
    rank, world = _world()
    if world == 1:
        return x
    if with_grad:
        return _AllGatherWithGrad.apply(x)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[rank] = x
    return torch.cat(parts, dim=0)


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class ClipLoss(nn.Module):
    """``(CE(image -> text) + CE(text -> image)) / 2`` over the global batch.

    forward(image_features: (B, D), text_features: (B, D), logit_scale: () already exp'd and clamped) ->
    ``{"loss", "loss/image_to_text", "loss/text_to_image", "logit_scale"}`` (scalars; logit_scale detached).
    Features are expected L2-normalised (``CLIP.forward`` returns them so); pair i matches pair i.
    """

    def __init__(self, *, local_loss: bool = True, gather_with_grad: bool = True):
        super().__init__()
        self.local_loss, self.gather_with_grad = local_loss, gather_with_grad

    def forward(
        self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        if image_features.shape != text_features.shape or image_features.dim() != 2:
            raise ValueError(
                f"image/text features must both be (B, D); got {tuple(image_features.shape)} "
                f"and {tuple(text_features.shape)}"
            )
        rank, world = _world()
        b = image_features.shape[0]
        all_image = gather_features(image_features, with_grad=self.gather_with_grad)
        all_text = gather_features(text_features, with_grad=self.gather_with_grad)
        if self.local_loss or world == 1:
            logits_per_image = logit_scale * image_features @ all_text.t()  # (B, W*B)
            logits_per_text = logit_scale * text_features @ all_image.t()
            labels = torch.arange(b, device=image_features.device) + rank * b
        else:
            logits_per_image = logit_scale * all_image @ all_text.t()  # (W*B, W*B)
            logits_per_text = logits_per_image.t()
            labels = torch.arange(world * b, device=image_features.device)
        i2t = F.cross_entropy(_at_least_fp32(logits_per_image), labels)
        t2i = F.cross_entropy(_at_least_fp32(logits_per_text), labels)
        return {
            "loss": 0.5 * (i2t + t2i),
            "loss/image_to_text": i2t.detach(),
            "loss/text_to_image": t2i.detach(),
            "logit_scale": logit_scale.detach(),
        }
