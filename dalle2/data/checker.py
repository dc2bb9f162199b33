"""Reading the built-in data's pictures back: does a generated picture show what its prompt names?

:func:`read_attributes` is the LENIENT reader: each attribute read separately, the shape is whichever template
correlates best.  :func:`strict_verdicts` is the strict checker (:mod:`dalle2.data.strict_checker`).
:func:`check_images` scores a set of pictures against their attributes with either or both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from dalle2.data.scene import ATTRIBUTES, BACKGROUNDS, COLORS, coverage
from dalle2.data.strict_checker import STRICT, VERDICTS, StrictThresholds, judge, strict_summary
from dalle2.imaging import to_uint8

__all__ = [
    "CHECKER_COLUMNS",
    "as_uint8_images",
    "read_attributes",
    "check_images",
    "checker_rows",
    "summarize_rows",
    "strict_verdicts",
    "strict_summary",
]


def _nearest(color: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    names = list(palette)
    dist = [float(np.sum((color - np.array(palette[n], dtype=np.float32)) ** 2)) for n in names]
    return names[int(np.argmin(dist))]


def read_attributes(image: np.ndarray) -> dict[str, str]:
    """Attributes read back from one uint8 (H, W, 3) picture (the inverse of :func:`render`)."""
    from scipy import ndimage

    img = image.astype(np.float32)
    h, w, _ = img.shape
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]], axis=0)
    bg = np.median(border, axis=0)
    out = {"background": _nearest(bg, BACKGROUNDS)}
    dist = np.sqrt(np.sum((img - bg) ** 2, axis=-1))
    fg_pixels = img[dist > 60.0]
    if len(fg_pixels) == 0:  # nothing drawn: guess, every guess counts as wrong-ish but well defined
        fg = np.array(COLORS["red"], dtype=np.float32)
    else:
        fg = np.median(fg_pixels, axis=0)
    out["color"] = _nearest(fg, COLORS)
    d = fg - bg
    alpha = np.clip(((img - bg) @ d) / max(float(d @ d), 1e-6), 0.0, 1.0)
    labels, n = ndimage.label(alpha > 0.5)
    if n == 0:
        return {**out, "shape": "circle", "size": "small", "position": "center"}
    sizes = ndimage.sum(np.ones_like(alpha), labels, index=np.arange(1, n + 1))
    comp = labels == (1 + int(np.argmax(sizes)))
    rows, cols = np.nonzero(comp)
    y0, y1, x0, x1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    r = max(x1 - x0, y1 - y0) / 2.0
    out["position"] = "left" if cx < 0.385 * w else ("right" if cx > 0.615 * w else "center")
    out["size"] = "small" if r < 0.16 * w else "large"
    # Shape: correlation of the soft mask with each template (also blurred: generated images are soft),
    # in a window around the component, with a small search over the half extent.
    pad = 2
    wy0, wy1, wx0, wx1 = max(0, y0 - pad), min(h, y1 + pad), max(0, x0 - pad), min(w, x1 + pad)
    a = alpha[wy0:wy1, wx0:wx1]
    a = (a - a.mean()) / (a.std() + 1e-6)
    best, best_shape = -np.inf, "circle"
    for shape in ATTRIBUTES["shape"]:
        for dr in (-0.5, 0.0, 0.5):
            t0 = coverage(shape, cx - wx0, cy - wy0, r + dr, wy1 - wy0, wx1 - wx0, ss=4)
            for sigma in (0.0, 0.7, 1.2):
                t = ndimage.gaussian_filter(t0, sigma, mode="constant") if sigma else t0
                t = (t - t.mean()) / (t.std() + 1e-6)
                score = float((a * t).mean())
                if score > best:
                    best, best_shape = score, shape
    out["shape"] = best_shape
    return {a_: out[a_] for a_ in ATTRIBUTES}


def as_uint8_images(images: Any, value_range: tuple[float, float]) -> np.ndarray:
    """uint8 (N, H, W, 3) numpy pictures of uint8 (N, H, W, 3) or float (N, 3, H, W) arrays/tensors in ``value_range``."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu()
        images = images.numpy() if images.dtype == torch.uint8 else images.float()
    arr = images if isinstance(images, torch.Tensor) else np.asarray(images)
    if arr.ndim != 4:
        raise ValueError(f"images must be (N,H,W,3) uint8 or (N,3,H,W) float, got shape {tuple(arr.shape)}")
    if isinstance(arr, np.ndarray) and arr.dtype == np.uint8:
        if arr.shape[-1] != 3:
            raise ValueError(f"uint8 images must be (N,H,W,3), got shape {arr.shape}")
        return arr
    if arr.shape[1] != 3:
        raise ValueError(f"float images must be (N,3,H,W), got shape {tuple(arr.shape)}")
    return to_uint8(torch.as_tensor(arr, dtype=torch.float32), value_range).numpy()


# the per-image columns of :func:`checker_rows`: the lenient reader's attributes (1 right, 0 wrong, NaN not named),
# the strict verdicts (1 / 0) and two strict measurements
CHECKER_COLUMNS = (
    *ATTRIBUTES,
    *(f"strict/{v}" for v in VERDICTS),
    "strict/all",
    "strict/iou",
    "strict/edge_width",
)


def checker_rows(
    arr: np.ndarray,
    attributes_list: Sequence[dict[str, str]],
    *,
    strict: bool = True,
    thresholds: StrictThresholds = STRICT,
) -> np.ndarray:
    """(N, len(CHECKER_COLUMNS)) float64 per-image verdicts of uint8 (N, H, W, 3) pictures (strict columns NaN
    without ``strict``); :func:`summarize_rows` turns them, or rows gathered from several ranks, into fractions."""
    if len(arr) != len(attributes_list):
        raise ValueError(f"{len(arr)} images but {len(attributes_list)} attribute dicts")
    rows = np.full((len(arr), len(CHECKER_COLUMNS)), np.nan)
    for i, (img, want) in enumerate(zip(arr, attributes_list)):
        got = read_attributes(img)
        rows[i, : len(ATTRIBUTES)] = [float(got[a] == want[a]) if a in want else np.nan for a in ATTRIBUTES]
    if strict and len(arr):
        v = judge(arr, attributes_list, thresholds=thresholds)
        j = len(ATTRIBUTES)
        for k, name in enumerate((*VERDICTS, "all")):
            rows[:, j + k] = v[name]
        rows[:, -2], rows[:, -1] = v["iou"], v["edge_width"]
    return rows


def summarize_rows(rows: np.ndarray) -> dict[str, float]:
    """Fractions over pictures of :func:`checker_rows`' rows: the lenient ``accuracy/<attr>`` (over the pictures
    naming it), ``accuracy/all`` (every named attribute right), ``accuracy/mean``; when the strict columns are
    filled, :func:`~dalle2.data.strict_checker.strict_summary`'s ``strict/all`` (the headline), ``strict/<verdict>``,
    ``strict/iou_mean`` and ``strict/edge_width_median``."""
    rows = np.asarray(rows, dtype=np.float64)
    if rows.ndim != 2 or rows.shape[1] != len(CHECKER_COLUMNS) or len(rows) == 0:
        raise ValueError(f"expected (N >= 1, {len(CHECKER_COLUMNS)}) checker rows, got shape {rows.shape}")
    col = {c: rows[:, j] for j, c in enumerate(CHECKER_COLUMNS)}
    out = {f"accuracy/{a}": float(np.nanmean(col[a])) for a in ATTRIBUTES if not np.isnan(col[a]).all()}
    lenient = rows[:, : len(ATTRIBUTES)]
    out["accuracy/all"] = float(np.mean(np.all(np.isnan(lenient) | (lenient == 1.0), axis=1)))
    per_attr = [v for k, v in out.items() if k != "accuracy/all"]
    out["accuracy/mean"] = float(np.mean(per_attr)) if per_attr else 0.0
    if not np.isnan(col["strict/all"]).any():
        verdicts = {v: col[f"strict/{v}"] > 0.5 for v in (*VERDICTS, "all")}
        out.update(strict_summary({**verdicts, "iou": col["strict/iou"], "edge_width": col["strict/edge_width"]}))
    return out


def check_images(
    images: Any,
    attributes_list: Sequence[dict[str, str]],
    *,
    value_range: tuple[float, float] = (-1.0, 1.0),
    strict: bool = False,
    thresholds: StrictThresholds = STRICT,
    threshold: float | None = None,
) -> dict[str, float]:
    """Does each picture show what its attributes (or prompt, via :func:`parse_caption`) say?

    Args:
        images: uint8 (N, H, W, 3) array/tensor, or float (N, 3, H, W) array/tensor in ``value_range``
            (default [-1, 1]; pass ``(0, 1)`` for [0, 1] images).
        attributes_list: N dicts; an attribute a dict leaves out is not scored for that image.
        strict: also run the strict checker (:func:`strict_verdicts`) with ``thresholds`` (``threshold``: its IoU
            bar instead).

    Returns:
        the lenient reader's ``{"accuracy/<attr>": fraction correct, "accuracy/all": fraction with every given
        attribute right, "accuracy/mean": mean over attributes}``; with ``strict`` also ``strict/all`` (every strict
        verdict passes: THE headline figure), ``strict/<verdict>`` for each verdict
        (:data:`~dalle2.data.strict_checker.VERDICTS`), ``strict/iou_mean`` and ``strict/edge_width_median``.
    """
    arr = as_uint8_images(images, value_range)
    if len(arr) != len(attributes_list):
        raise ValueError(f"{len(arr)} images but {len(attributes_list)} attribute dicts")
    if len(arr) == 0:
        raise ValueError("check_images got no images")
    if threshold is not None:
        thresholds = dataclasses.replace(thresholds, iou=float(threshold))
    return summarize_rows(checker_rows(arr, attributes_list, strict=strict, thresholds=thresholds))


def strict_verdicts(
    images: Any,
    attributes_list: Sequence[dict[str, str]],
    *,
    value_range: tuple[float, float] = (-1.0, 1.0),
    thresholds: StrictThresholds = STRICT,
    threshold: float | None = None,
) -> dict[str, np.ndarray]:
    """Per-image strict verdicts and measurements (:func:`dalle2.data.strict_checker.judge`) of pictures given as
    to :func:`check_images`."""
    return judge(as_uint8_images(images, value_range), attributes_list, thresholds=thresholds, threshold=threshold)
