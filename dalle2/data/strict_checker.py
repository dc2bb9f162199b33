"""The strict checker of the built-in data's pictures: does a picture show exactly what its prompt names?

:func:`judge` asks of a picture exactly one object, not cut by the border, whose soft mask matches the best-fitting
ideal shape of the PROMPTED kind (IoU >= ``STRICT_IOU_THRESHOLD``).  The lenient reader
(:mod:`dalle2.data.checker`) names whichever template correlates best, so a lumpy blob still reads as a circle.
Inputs of other types and the fractions over a set: :func:`dalle2.data.checker.strict_verdicts` /
:func:`dalle2.data.checker.check_images`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from dalle2.data.scene import ATTRIBUTES
from dalle2.data.shape_fit import AREA, fit_all, matte

__all__ = ["STRICT_IOU_THRESHOLD", "judge", "strict_summary"]

STRICT_IOU_THRESHOLD = 0.88  # the strict checker's IoU bar (calibration: docs/checker.md)
# the lenient shape reader: it names whichever template correlates best, so a lumpy blob still
# reads as a circle.  The strict checker asks more of a picture: exactly one object, not cut by the border, whose
# soft mask matches the best-fitting ideal shape of the PROMPTED kind (IoU >= STRICT_IOU_THRESHOLD).  Calibration
# (clean, JPEG, shuffled prompts, skewed / blurred / two objects / cut by the border): README, section Data.

_MIN_OBJECT_FRAC = 0.003  # a connected part smaller than this fraction of the image is a speck, not an object
# RGB -> YCbCr (BT.601) with the chroma rows scaled by 0.5 (= weight 0.25 in squared distances)
_YCC = np.array([[0.299, 0.587, 0.114], [-0.0844, -0.1656, 0.25], [0.25, -0.2093, -0.0407]], dtype=np.float32)


def _object_alpha(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two (N, H, W) float32 mattes in [0, 1] of uint8 (N, H, W, 3) pictures, 0 where nothing is drawn: each pixel's
    projection onto the background -> object colour line, and its distance from the background (any colour counts),
    both in units of that line's length.  Background: the median of the border; object colour: the median of the
    largest connected part of the pixels far from it (> 60 levels), where it is near full strength.  Colours are compared in YCbCr with luma counting 4x:
    JPEG keeps luma at full resolution, chroma at half, so edges stay where the luma puts them."""
    n = len(arr)
    img = arr.astype(np.float32)
    border = np.concatenate([img[:, 0], img[:, -1], img[:, :, 0], img[:, :, -1]], axis=1)  # (N, 4S, 3)
    bg = np.median(border, axis=1)  # (N, 3)
    diff = img - bg[:, None, None]
    dist = np.sqrt((diff**2).sum(-1))
    far = dist > 60.0
    proj, away = np.zeros_like(dist), np.zeros_like(dist)
    has = far.reshape(n, -1).any(1)
    if not has.any():
        return proj, away
    from scipy import ndimage

    fg = np.zeros((n, 3), dtype=np.float32)
    for i in np.nonzero(has)[0]:  # the object colour: of the largest far part, where it is near full strength
        labels, _ = ndimage.label(far[i], structure=np.ones((3, 3), dtype=bool))
        part = labels == 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))
        core = part & (dist[i] >= 0.85 * np.quantile(dist[i][part], 0.9))
        fg[i] = np.median(img[i][core], axis=0)
    line = (fg[has] - bg[has]) @ _YCC.T  # (n', 3) in weighted YCbCr
    pix = diff[has] @ _YCC.T
    den = np.maximum((line**2).sum(-1), 1e-3)[:, None, None]
    proj[has] = np.clip((pix * line[:, None, None]).sum(-1) / den, 0.0, 1.0)
    away[has] = np.clip(np.sqrt((pix**2).sum(-1) / den), 0.0, 1.0)
    return proj, away


def judge(
    arr: np.ndarray, attributes_list: Sequence[dict[str, str]], *, threshold: float = STRICT_IOU_THRESHOLD
) -> dict[str, np.ndarray]:
    """Per-image strict verdicts of uint8 (N, H, W, 3) pictures, each an (N,) array:

    ``num_objects`` connected parts of the object mask (alpha > 0.5, 8-connected) larger than 0.3 % of the image;
    ``touches_border`` whether one of those objects reaches the outermost pixels (no built-in prompt puts an object
    there; a speck on the border is not an object);
    ``iou`` the soft IoU of the object matte (smaller specks included) with the best-fitting ideal shape of the
    prompted kind (an image whose attributes leave the shape out: the best over all shapes), searched over centroid,
    size and, for squares, triangles and crosses, about +-15 degrees of rotation; ``fit`` (N, 4) its centroid x, y (px),
    half extent (px) and angle; ``ok`` = one object, not touching the border, ``iou >= threshold``.
    """
    from scipy import ndimage

    if len(arr) != len(attributes_list):
        raise ValueError(f"{len(arr)} images but {len(attributes_list)} attribute dicts")
    n, h, w = arr.shape[:3]
    alpha, away = _object_alpha(arr)
    mask = away > 0.5  # anything off the background, whatever its colour
    num = np.zeros(n, dtype=np.int64)
    edge = np.zeros(n, dtype=bool)
    main = np.zeros_like(mask)
    for i in range(n):
        labels, k = ndimage.label(mask[i], structure=np.ones((3, 3), dtype=bool))
        if k:
            sizes = np.bincount(labels.ravel())[1:]
            objects = 1 + np.nonzero(sizes >= max(2.0, _MIN_OBJECT_FRAC * h * w))[0]  # labels of the objects
            num[i] = len(objects)
            border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
            edge[i] = bool(np.isin(objects, border).any())  # an object reaches the border (a speck does not count)
            main[i] = labels == 1 + int(np.argmax(sizes))
    mattes = matte(torch.from_numpy(alpha))
    main_rim = torch.nn.functional.max_pool2d(torch.from_numpy(main).float()[:, None], 3, 1, 1)[:, 0]
    weights = main_rim * mattes  # the largest object (and its 1-px rim): where the fit starts
    mass = weights.sum((1, 2))
    ys = (torch.arange(h, dtype=torch.float32) + 0.5).view(1, h, 1)
    xs = (torch.arange(w, dtype=torch.float32) + 0.5).view(1, 1, w)
    cx = (weights * xs).sum((1, 2)) / mass.clamp(min=1e-6)
    cy = (weights * ys).sum((1, 2)) / mass.clamp(min=1e-6)
    iou, fit = np.zeros(n, dtype=np.float32), np.zeros((n, 4), dtype=np.float32)
    wanted = [a.get("shape") for a in attributes_list]
    for shape in ATTRIBUTES["shape"]:
        idx = [i for i, s in enumerate(wanted) if (s == shape or s is None) and mass[i] > 0]
        if not idx:
            continue
        t = torch.tensor(idx)
        got, params = fit_all(shape, mattes[t], cx[t], cy[t], (mass[t] / AREA[shape]).sqrt())
        for i, g, p in zip(idx, got, params):
            if g > iou[i]:
                iou[i], fit[i] = g, p
    ok = (num == 1) & ~edge & (iou >= threshold)
    return {"ok": ok, "iou": iou, "num_objects": num, "touches_border": edge, "fit": fit}


def strict_summary(verdicts: dict[str, np.ndarray], lenient_all: np.ndarray | None = None) -> dict[str, float]:
    """``strict/*`` fractions from :func:`strict_verdicts`' arrays (``strict/all`` when the lenient per-image
    all-attributes-right verdicts are given)."""
    ok = np.asarray(verdicts["ok"], dtype=bool)
    out = {
        "strict/accuracy": float(ok.mean()),
        "strict/one_object": float((np.asarray(verdicts["num_objects"]) == 1).mean()),
        "strict/inside": float((~np.asarray(verdicts["touches_border"], dtype=bool)).mean()),
        "strict/iou_mean": float(np.mean(verdicts["iou"])),
    }
    if lenient_all is not None:
        out["strict/all"] = float((ok & np.asarray(lenient_all, dtype=bool)).mean())
    return out
