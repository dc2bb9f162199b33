"""The strict checker of the built-in data's pictures: does a picture show exactly what its prompt names, attribute by
attribute?  Each verdict is measured on its own, and ``all`` is their conjunction (docs/checker.md):

==============  ==========================================================================================
verdict         the picture passes when
==============  ==========================================================================================
``one_object``  exactly one object: one connected part off the background larger than 0.3 % of the picture
``inside``      no object reaches the outermost pixels (no built-in prompt puts one there)
``shape``       the soft IoU of the object's matte with the best-fitting ideal shape of the prompted kind is
                >= ``iou`` AND beats the best fit of every other kind by >= ``margin`` (a superellipse between a
                circle and a square fits both about equally: corners vs curvature)
``color``       the object's colour is within ``color_de`` (CIELAB ΔE76) of the prompted palette colour, and
                nearer to it than to any other palette colour
``background``  the background (median of the border) is within ``background_de`` of the prompted one, and
                nearer to it than to the other backgrounds
``size``        the half extent of the best-fitting shape lies in the data's jitter range for the prompted
                size (``scene``: ``HALF_EXTENT * (1 ± SIZE_JITTER)``), give or take ``size_tol`` px of the
                fit's resolution
``position``    its bbox centre lies in the data's jitter box for the prompted position (``CENTER_X``,
                ``CENTER_Y`` ± ``POS_JITTER``), give or take ``position_tol`` px of the fit's resolution
``sharp``       the edge blend width (:mod:`dalle2.data.sharpness`) is <= ``edge_width`` px
==============  ==========================================================================================

An attribute the prompt leaves out is not judged (its verdict passes; a missing shape: the best kind is fitted).
The shapes are fitted (:mod:`dalle2.data.shape_fit`) at no more than ``WORK_SIZE`` px: a larger picture's matte is
averaged down by an integer factor first (area averaging keeps coverage), so 256 px costs what 64 px costs; edge
width, colours, objects and the border are measured at full resolution.  The thresholds were chosen on calibration
pictures from the val stream and the acceptance table is reported on a test stream (``eval/fidelity_ablation.py
calibrate``; results/checker_calibration.json).  Inputs of other types and fractions over a set:
:func:`dalle2.data.checker.strict_verdicts` / :func:`dalle2.data.checker.check_images`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dalle2.data.cielab import delta_e
from dalle2.data.scene import (
    ATTRIBUTES,
    BACKGROUNDS,
    CENTER_X,
    CENTER_Y,
    COLORS,
    HALF_EXTENT,
    POS_JITTER,
    SIZE_JITTER,
)
from dalle2.data.shape_fit import AREA, CENTROID_DY, fit_all, matte
from dalle2.data.sharpness import edge_width

__all__ = [
    "StrictThresholds",
    "STRICT",
    "STRICT_IOU_THRESHOLD",
    "VERDICTS",
    "WORK_SIZE",
    "judge",
    "measure",
    "decide",
    "strict_summary",
]


@dataclasses.dataclass(frozen=True)
class StrictThresholds:
    """The strict verdicts' bars (module docstring); the defaults (:data:`STRICT`) are the calibrated ones."""

    # chosen on the val stream by eval/fidelity_ablation.py calibrate (results/checker_calibration.json)
    iou: float = 0.904  # shape: soft IoU with the prompted kind >=
    margin: float = 0.1  # shape: ... minus the best other kind's IoU >=
    color_de: float = 18.865  # CIELAB ΔE76 of the object's colour from the palette colour <=
    background_de: float = 24.848  # ... of the background's
    size_tol: float = 0.282  # px (at the fit's resolution) beyond the jitter range of the half extent
    position_tol: float = 0.53  # px (at the fit's resolution) beyond the jitter box of the bbox centre
    edge_width: float = 2.467  # px (full resolution), edge blend width <=
    min_object_frac: float = 0.003  # a part smaller than this fraction of the picture is a speck, not an object


STRICT = StrictThresholds()
STRICT_IOU_THRESHOLD = STRICT.iou  # kept for callers of the IoU-only checker
VERDICTS = ("one_object", "inside", "shape", "color", "background", "size", "position", "sharp")
WORK_SIZE = 64  # the shape fit's resolution cap (px)
# RGB -> YCbCr (BT.601) with the chroma rows scaled by 0.5 (= weight 0.25 in squared distances)
_YCC = np.array([[0.299, 0.587, 0.114], [-0.0844, -0.1656, 0.25], [0.25, -0.2093, -0.0407]], dtype=np.float32)


def _ycc(x: torch.Tensor) -> torch.Tensor:
    """(..., 3) RGB differences -> weighted YCbCr (:data:`_YCC`), channel by channel: elementwise arithmetic gives
    each picture the same bits whatever else is in the batch (a matmul's blocking would not)."""
    y = [x[..., 0] * float(r[0]) + x[..., 1] * float(r[1]) + x[..., 2] * float(r[2]) for r in _YCC]
    return torch.stack(y, dim=-1)


def _object_alpha(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Two (N, H, W) float32 mattes in [0, 1] of uint8 (N, H, W, 3) pictures, 0 where nothing is drawn: each pixel's
    projection onto the background -> object colour line, and its distance from the background (any colour counts),
    both in units of that line's length; and the background and object colours (N, 3) (NaN: no object).
    Background: the median of the border; object colour: the median of the largest connected part of the pixels far
    from it (> 60 levels), where it is near full strength.  Colours are compared in YCbCr with luma counting 4x:
    JPEG keeps luma at full resolution, chroma at half, so edges stay where the luma puts them."""
    from scipy import ndimage

    n = len(arr)
    img = torch.from_numpy(np.ascontiguousarray(arr)).float()  # (N, H, W, 3)
    border = torch.cat([img[:, 0], img[:, -1], img[:, :, 0], img[:, :, -1]], dim=1)  # (N, 4S, 3)
    bg = border.median(dim=1).values  # (N, 3)  (torch: the lower of the two middle values)
    diff = img - bg[:, None, None]
    dist = diff.square().sum(-1).sqrt()
    far = (dist > 60.0).numpy()
    proj, away = torch.zeros_like(dist), torch.zeros_like(dist)
    fg = np.full((n, 3), np.nan, dtype=np.float32)
    has = far.reshape(n, -1).any(1)
    if not has.any():
        return proj.numpy(), away.numpy(), bg.numpy(), fg
    dist_np, img_np = dist.numpy(), img.numpy()
    for i in np.nonzero(has)[0]:  # the object colour: of the largest far part, where it is near full strength
        labels, _ = ndimage.label(far[i], structure=np.ones((3, 3), dtype=bool))
        part = labels == 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))
        d = dist_np[i][part]
        core = part & (dist_np[i] >= 0.85 * np.quantile(d, 0.9))
        fg[i] = np.median(img_np[i][core], axis=0)
    idx = torch.from_numpy(np.nonzero(has)[0])
    line = _ycc(torch.from_numpy(fg[has]) - bg[idx])  # (n', 3) in weighted YCbCr
    pix = _ycc(diff[idx])
    den = (line.square().sum(-1)).clamp(min=1e-3)[:, None, None]
    proj[idx] = ((pix * line[:, None, None]).sum(-1) / den).clamp(0.0, 1.0)
    away[idx] = (pix.square().sum(-1) / den).sqrt().clamp(0.0, 1.0)
    return proj.numpy(), away.numpy(), bg.numpy(), fg


def _objects(mask: np.ndarray, min_frac: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per picture of ``mask`` (N, H, W) bool: the number of objects (8-connected parts >= ``min_frac`` of the
    picture), whether one reaches the border (a speck on it does not count), and the largest part's mask."""
    from scipy import ndimage

    n, h, w = mask.shape
    num, edge, main = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=bool), np.zeros_like(mask)
    for i in range(n):
        labels, k = ndimage.label(mask[i], structure=np.ones((3, 3), dtype=bool))
        if k:
            sizes = np.bincount(labels.ravel())[1:]
            objects = 1 + np.nonzero(sizes >= max(2.0, min_frac * h * w))[0]
            num[i] = len(objects)
            border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
            edge[i] = bool(np.isin(objects, border).any())
            main[i] = labels == 1 + int(np.argmax(sizes))
    return num, edge, main


def fit_kinds(proj: np.ndarray, main: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """The best fit of every kind of shape to each picture's object: soft IoU (N, K) and parameters (N, K, 4)
    (centroid x, y and half extent in full-resolution px, angle in degrees), K = the shapes of ``ATTRIBUTES``, and
    the factor the pictures were averaged down by for the fit (:data:`WORK_SIZE`)."""
    n, h, w = proj.shape
    f = max(1, min(h, w) // WORK_SIZE)
    a = torch.from_numpy(proj)[:, None]
    core = torch.from_numpy(main).float()[:, None]
    if f > 1:
        a = F.avg_pool2d(a, f)
        hh, ww = a.shape[-2:]
        core = core[..., : hh * f, : ww * f].reshape(n, 1, hh, f, ww, f).amax((3, 5))  # any, per block
    mattes = matte(a[:, 0])
    hh, ww = mattes.shape[1:]
    rim = F.max_pool2d(core, 3, 1, 1)[:, 0]
    weights = rim * mattes  # the largest object (and its 1-px rim): where the fit starts
    mass = weights.sum((1, 2))
    ys = (torch.arange(hh, dtype=torch.float32) + 0.5).view(1, hh, 1)
    xs = (torch.arange(ww, dtype=torch.float32) + 0.5).view(1, 1, ww)
    cx = (weights * xs).sum((1, 2)) / mass.clamp(min=1e-6)
    cy = (weights * ys).sum((1, 2)) / mass.clamp(min=1e-6)
    kinds = ATTRIBUTES["shape"]
    iou = np.zeros((n, len(kinds)), dtype=np.float32)
    params = np.zeros((n, len(kinds), 4), dtype=np.float32)
    idx = torch.nonzero(mass > 0).flatten()
    if len(idx):
        for k, shape in enumerate(kinds):
            got, p = fit_all(shape, mattes[idx], cx[idx], cy[idx], (mass[idx] / AREA[shape]).sqrt())
            iou[idx.numpy(), k], params[idx.numpy(), k] = got, p
    params[..., :3] *= f
    return iou, params, f


def _palette_distance(rgb: np.ndarray, wanted: list, palette: dict) -> tuple[np.ndarray, np.ndarray]:
    """ΔE76 of each (N, 3) colour from its ``wanted`` palette entry (NaN: not named or no colour) and whether that
    entry is the nearest of the palette."""
    names = list(palette)
    de_all = delta_e(np.asarray(rgb, dtype=np.float64)[:, None], np.array([palette[k] for k in names])[None])
    de, nearest = np.full(len(wanted), np.nan), np.zeros(len(wanted), dtype=bool)
    for i, w in enumerate(wanted):
        if w is not None and np.isfinite(de_all[i]).all():
            de[i], nearest[i] = de_all[i, names.index(w)], int(np.argmin(de_all[i])) == names.index(w)
    return de, nearest


def _range_error(value: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """How far ``value`` lies outside [lo, hi] (0 inside)."""
    return np.maximum(np.maximum(lo - value, value - hi), 0.0)


def measure(arr: np.ndarray, attributes_list: Sequence[dict[str, str]], *, min_object_frac: float = 0.003) -> dict:
    """The strict checker's per-image measurements of uint8 (N, H, W, 3) pictures against the attributes their
    prompts name, each an (N,) array (thresholds are applied by :func:`decide`):

    ``num_objects``, ``touches_border``, ``iou`` (prompted kind; missing: the best kind), ``iou_other`` (the best
    other kind), ``margin`` (their difference), ``kind`` (index into ``ATTRIBUTES["shape"]`` of the best-fitting
    kind), ``color_de`` / ``background_de`` (ΔE76; NaN: not named or no object) and ``color_nearest`` /
    ``background_nearest`` (the prompted entry is the palette's nearest), ``half_extent`` and ``center_x`` /
    ``center_y`` (of the best-fitting kind, fractions of the side), ``size_error`` / ``position_error`` (px at the
    fit's resolution beyond the jitter range; 0 inside it), ``edge_width`` (px), ``fit`` (N, 4): the prompted kind's centroid x, y, half extent
    (px) and angle (degrees); ``named`` {attribute: (N,) bool}.
    """
    if len(arr) != len(attributes_list):
        raise ValueError(f"{len(arr)} images but {len(attributes_list)} attribute dicts")
    n, h, w = arr.shape[:3]
    attrs = list(attributes_list)
    proj, away, bg, fg = _object_alpha(arr)
    mask = away > 0.5  # anything off the background, whatever its colour
    num, edge, main = _objects(mask, min_object_frac)
    width = edge_width(torch.from_numpy(proj), torch.from_numpy(mask)).numpy()

    # shape: every kind fitted; the prompted one's IoU and its margin over the best other kind
    kinds = ATTRIBUTES["shape"]
    ious, params, f = fit_kinds(proj, main)
    best = ious.argmax(1)
    want = np.array([kinds.index(a["shape"]) if "shape" in a else best[i] for i, a in enumerate(attrs)], dtype=int)
    rows = np.arange(n)
    iou = ious[rows, want]
    others = np.where(np.arange(len(kinds))[None] == want[:, None], -np.inf, ious)
    iou_other = others.max(1)
    fit = params[rows, want]

    # size and position of the best-fitting kind's fit (= the prompted kind's when the shape is right, so that a
    # wrong shape does not also fail size and position), against the data's jitter (px of the fit's resolution)
    own = params[rows, best]
    r = own[:, 2]
    turn = np.deg2rad(own[:, 3])
    dy = np.array([CENTROID_DY[kinds[k]] for k in best]) * r
    bx, by = own[:, 0] + np.sin(turn) * dy, own[:, 1] - np.cos(turn) * dy  # the bbox centre
    side = float(min(h, w))
    size_err, pos_err = np.zeros(n), np.zeros(n)
    for i, a in enumerate(attrs):
        if "size" in a:
            half = HALF_EXTENT[a["size"]] * side
            size_err[i] = _range_error(r[i], half * (1 - SIZE_JITTER), half * (1 + SIZE_JITTER)) / f
        if "position" in a:
            ex, ey = CENTER_X[a["position"]] * w, CENTER_Y * h
            jx, jy = POS_JITTER * w, POS_JITTER * h
            pos_err[i] = max(_range_error(bx[i], ex - jx, ex + jx), _range_error(by[i], ey - jy, ey + jy)) / f
    named = {a: np.array([a in x for x in attrs], dtype=bool) for a in ATTRIBUTES}
    color_de, color_nearest = _palette_distance(fg, [a.get("color") for a in attrs], COLORS)
    bg_de, bg_nearest = _palette_distance(bg.astype(np.float64), [a.get("background") for a in attrs], BACKGROUNDS)
    return {
        "num_objects": num,
        "touches_border": edge,
        "iou": iou,
        "iou_other": iou_other,
        "margin": iou - iou_other,
        "kind": best,
        "color_de": color_de,
        "color_nearest": color_nearest,
        "background_de": bg_de,
        "background_nearest": bg_nearest,
        "half_extent": r / side,
        "center_x": bx / w,
        "center_y": by / h,
        "size_error": size_err,
        "position_error": pos_err,
        "edge_width": width,
        "fit": fit,
        "named": named,
    }


def decide(m: dict, thresholds: StrictThresholds = STRICT) -> dict[str, np.ndarray]:
    """The verdicts of :data:`VERDICTS` (bool (N,) arrays) and ``all`` (their conjunction; ``ok`` the same) from
    :func:`measure`'s measurements ``m`` (returned with them).  A verdict on an attribute the prompt leaves out
    passes; a NaN measurement (nothing drawn) fails."""
    th = thresholds
    drawn = m["num_objects"] > 0
    named = m["named"]
    with np.errstate(invalid="ignore"):
        out = {
            "one_object": m["num_objects"] == 1,
            "inside": ~m["touches_border"],
            "shape": drawn & (m["iou"] >= th.iou) & (m["margin"] >= th.margin),
            "color": ~named["color"] | (drawn & m["color_nearest"] & (m["color_de"] <= th.color_de)),
            "background": ~named["background"] | (m["background_nearest"] & (m["background_de"] <= th.background_de)),
            "size": ~named["size"] | (drawn & (m["size_error"] <= th.size_tol)),
            "position": ~named["position"] | (drawn & (m["position_error"] <= th.position_tol)),
            "sharp": m["edge_width"] <= th.edge_width,
        }
    out["all"] = np.logical_and.reduce([out[v] for v in VERDICTS])
    out["ok"] = out["all"]
    return {**out, **m}


def judge(
    arr: np.ndarray,
    attributes_list: Sequence[dict[str, str]],
    *,
    thresholds: StrictThresholds = STRICT,
    threshold: float | None = None,
) -> dict[str, np.ndarray]:
    """Per-image strict verdicts and measurements of uint8 (N, H, W, 3) pictures: :func:`decide` on
    :func:`measure` (``threshold``: the IoU bar instead of ``thresholds.iou``)."""
    th = thresholds if threshold is None else dataclasses.replace(thresholds, iou=float(threshold))
    return decide(measure(arr, attributes_list, min_object_frac=th.min_object_frac), th)


def strict_summary(verdicts: dict[str, np.ndarray]) -> dict[str, float]:
    """``strict/<verdict>`` fractions of :func:`judge`'s arrays: ``strict/all`` (the headline: every verdict passes),
    each of :data:`VERDICTS`, and ``strict/iou_mean`` / ``strict/edge_width_median`` (px)."""
    out = {"strict/all": float(np.mean(verdicts["all"]))}
    out.update({f"strict/{v}": float(np.mean(verdicts[v])) for v in VERDICTS})
    out["strict/iou_mean"] = float(np.mean(verdicts["iou"]))
    width = np.asarray(verdicts["edge_width"], dtype=np.float64)
    out["strict/edge_width_median"] = float(np.median(width)) if len(width) else float("nan")
    return out
