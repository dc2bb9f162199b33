"""One float -> 8-bit conversion for every image we write, score or serve (PNG files, sample grids, the attribute
checkers, the HTTP server), so that the same sample gives the same bytes on every path."""

from __future__ import annotations

import torch

__all__ = ["to_uint8"]


def to_uint8(images: torch.Tensor, value_range: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """``(B, 3, H, W)`` float in ``value_range`` -> ``(B, H, W, 3)`` uint8 on the CPU.

    Values are scaled to [0, 255], rounded half to even (``torch.round``) and clipped; ``value_range=(-1, 1)`` for
    the diffusion models' outputs, ``(0, 1)`` (default) for the pipeline's."""
    lo, hi = value_range
    x = (images.detach().float() - lo) * (255.0 / (hi - lo))
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()
