"""Comparing sampled images at 8 bits, as they are written."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from dalle2.imaging import to_uint8


def assert_same_8bit(a: torch.Tensor, b: torch.Tensor) -> None:
    """``(3, H, W)`` in [0, 1].  Float rounding of batched matmuls (~1e-6 per network call, amplified by the first
    x0 prediction and, with ddpm, by the random tiny networks) may move a rare value by a few 8-bit levels
    (measured: <= 4 levels in < 0.1 % of the values); a real dependence on the batch (shared noise) changes most
    values by far more."""
    torch.testing.assert_close(a, b, atol=8 / 255, rtol=0)
    diff = np.abs(to_uint8(a[None])[0].numpy().astype(int) - to_uint8(b[None])[0].numpy().astype(int))
    assert (diff > 0).mean() < 0.01, f"{(diff > 0).mean():.2%} of the 8-bit values differ"


def png_bytes(img: torch.Tensor) -> bytes:
    """``(3, H, W)`` in [0, 1] -> the PNG file our writers would produce."""
    buf = io.BytesIO()
    Image.fromarray(to_uint8(img[None])[0].numpy()).save(buf, format="PNG")
    return buf.getvalue()
