"""Ideal shapes of the built-in data and the fit of one to a picture's object matte (the strict checker's core).

The shapes are those ``dalle2.data.synthetic.render`` draws (bbox centre, half extent ``r``, y down, triangle apex up).
:func:`fit_all` finds, per picture, the centroid, size and angle at which the ideal shape's coverage best matches the
object's matte: a coordinate search on cheap analytic coverage (:func:`ideal` with ``soft=True``) from the
matte's moments, then the soft IoU of the winner with exact 4 x 4 supersampled coverage, as ``render`` draws.
Batched in torch over pictures and candidates, on a window around each object.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["CROSS_BAR", "SUPERSAMPLE", "AREA", "ideal", "ideal_coverage", "soft_iou", "fit", "fit_all", "matte"]

CROSS_BAR = 0.35  # half bar width of the cross, as a fraction of the half extent
SUPERSAMPLE = 4  # render's (and the exact coverage's) samples per pixel side
MATTE = (0.15, 0.85)  # both mattes go through clip((x - lo) / (hi - lo), 0, 1): faint noise and soft rims ignored
# area / r^2 of each ideal shape (r: half extent) and its centroid's offset below the bbox centre, in units of r
AREA = {"circle": float(np.pi), "square": 4.0, "triangle": 2.0, "cross": 8 * CROSS_BAR - 4 * CROSS_BAR**2}
CENTROID_DY = {"circle": 0.0, "square": 0.0, "triangle": 1.0 / 3.0, "cross": 0.0}
# the coarse angles (degrees) the search starts from; two finer rounds add up to +-6
ANGLES = {
    "circle": (0.0,),
    "square": (-12.0, -6.0, 0.0, 6.0, 12.0),
    "triangle": (-12.0, -6.0, 0.0, 6.0, 12.0),
    "cross": (-12.0, -6.0, 0.0, 6.0, 12.0),
}


def matte(x: torch.Tensor) -> torch.Tensor:
    """The contrast curve both the picture's matte and the ideal coverage pass through before the IoU."""
    lo, hi = MATTE
    return ((x - lo) / (hi - lo)).clamp(0.0, 1.0)


def _ramp(d):
    return (0.5 - d).clamp(0.0, 1.0)


def ideal(shape: str, x, y, r, soft: bool):
    """The ideal ``shape`` of half extent ``r`` in its own frame (origin at the bbox centre, y down, triangle apex up),
    as ``synthetic.render`` draws it: ``soft`` -> pixel coverage from signed edge distances d (px), clip(0.5 - d)
    per edge, multiplied over the edges that meet at a corner (exact for a pixel crossed by one edge, or by two at
    right angles); else the inside test (bool) at points ``(x, y)``."""
    ax, ay = x.abs(), y.abs()
    if shape == "circle":
        d = (x * x + y * y).sqrt() - r
        return _ramp(d) if soft else d <= 0
    if shape == "square":
        return _ramp(ax - r) * _ramp(ay - r) if soft else (ax <= r) & (ay <= r)
    if shape == "triangle":
        base, side_l, side_r = y - r, (2 * x - y - r) / 5**0.5, (-2 * x - y - r) / 5**0.5
        return _ramp(base) * _ramp(side_l) * _ramp(side_r) if soft else (base <= 0) & (side_l <= 0) & (side_r <= 0)
    w = CROSS_BAR * r
    if not soft:
        return ((ax <= w) & (ay <= r)) | ((ay <= w) & (ax <= r))
    cw_x, cw_y, cr_x, cr_y = _ramp(ax - w), _ramp(ay - w), _ramp(ax - r), _ramp(ay - r)
    return cw_x * cr_y + cr_x * cw_y - cw_x * cw_y


def ideal_coverage(shape: str, cx, cy, r, angle, y0, x0, h: int, w: int, ss: int):
    """(n, C, h, w) coverage, over the h x w window at top-left pixel (y0, x0) (each (n,)), by the ideal ``shape``
    at C candidates: centroid (cx, cy), half extent r, angle (degrees), each (n, C).  ``ss == 1``: the analytic
    coverage (cheap, for the search); ``ss > 1``: the mean of ss x ss inside tests per pixel, as ``render`` draws."""
    oy = ((torch.arange(h * ss, dtype=torch.float32) + 0.5) / ss).view(1, 1, -1, 1)
    ox = ((torch.arange(w * ss, dtype=torch.float32) + 0.5) / ss).view(1, 1, 1, -1)
    dx = x0.view(-1, 1, 1, 1) + ox - cx[..., None, None]
    dy = y0.view(-1, 1, 1, 1) + oy - cy[..., None, None]
    th = torch.deg2rad(angle)[..., None, None]
    c, s = torch.cos(th), torch.sin(th)
    rr = r[..., None, None]
    cov = ideal(shape, c * dx + s * dy, -s * dx + c * dy + CENTROID_DY[shape] * rr, rr, soft=ss == 1)
    if ss == 1:
        return cov
    n, k = r.shape
    return cov.float().view(n, k, h, ss, w, ss).mean((3, 5))


def soft_iou(shape: str, win, outside, y0, x0, cx, cy, r, angle, ss: int = 1):
    """Soft IoU (n, C) of the matte windows ``win`` (n, h, w) (``outside``: (n,) matte mass outside them, which no
    candidate reaches) with the ideal shape at C candidates (:func:`ideal_coverage`)."""
    ideal = matte(ideal_coverage(shape, cx, cy, r, angle, y0, x0, win.shape[-2], win.shape[-1], ss))
    m = win[:, None]
    inter = torch.minimum(m, ideal).sum((-2, -1))
    union = torch.maximum(m, ideal).sum((-2, -1)) + outside[:, None]
    return inter / union.clamp(min=1e-6)


def fit(shape: str, win, outside, y0, x0, cx, cy, r) -> tuple[torch.Tensor, torch.Tensor]:
    """Coordinate search from the moments' estimate with the cheap coverage: (size x angle), centre, finer
    (size x angle), finer centre; then the IoU of the best candidate with exact (4 x 4 supersampled) coverage.
    Returns that IoU (n,) and the candidate (n, 4): centroid x, y, half extent, angle."""
    best = torch.stack([cx, cy, r, torch.zeros_like(r)], dim=1)
    best_iou = torch.full_like(r, -1.0)
    angles = ANGLES[shape]
    fine = (-3.0, 0.0, 3.0) if len(angles) > 1 else (0.0,)
    centre = lambda step: [(dx, dy, 1.0, 0.0) for dx in (-step, 0.0, step) for dy in (-step, 0.0, step)]  # noqa: E731
    size_angle = lambda sizes, angles: [(0.0, 0.0, sc, a) for sc in sizes for a in angles]  # noqa: E731
    for cands in (
        size_angle((0.94, 0.97, 1.0, 1.03, 1.06), angles),
        centre(0.5),
        size_angle((0.98, 0.99, 1.0, 1.01, 1.02), fine),
        centre(0.25),
        size_angle((0.99, 1.0, 1.01), fine),
        centre(0.125),
    ):
        d = torch.tensor(cands, dtype=torch.float32)  # (C, 4): dx, dy, scale, d_angle
        new = torch.stack(
            [
                best[:, None, 0] + d[:, 0],
                best[:, None, 1] + d[:, 1],
                best[:, None, 2] * d[:, 2],
                best[:, None, 3] + d[:, 3],
            ],
            dim=-1,
        )  # (n, C, 4)
        iou = soft_iou(shape, win, outside, y0, x0, *new.unbind(-1))
        got, j = iou.max(dim=1)
        better = got > best_iou
        best = torch.where(better[:, None], new[torch.arange(len(j)), j], best)
        best_iou = torch.where(better, got, best_iou)
    exact = soft_iou(shape, win, outside, y0, x0, *best[:, None, :].unbind(-1), ss=SUPERSAMPLE)[:, 0]
    return exact, best


def fit_all(shape: str, mattes, cx, cy, r, chunk: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """:func:`fit` for each picture, on a window around its object whose side follows from its own size estimate
    (a multiple of 4 px): the search costs in proportion to the window's area, and a picture's result does not
    depend on the other pictures of the call.  ``mattes`` (n, H, W), ``cx, cy, r`` (n,) the starting estimates."""
    n, h, w = mattes.shape
    iou, params = torch.zeros(n), torch.zeros(n, 4)
    sides = (4 * torch.ceil((2 * (1.65 * 1.12 * r + 2.5)) / 4)).long()
    for side in sides.unique().tolist():
        for part in (sides == side).nonzero().flatten().split(chunk):
            sh, sw = min(h, side), min(w, side)
            y0 = (cy[part] - sh / 2).round().clamp(0, h - sh).long()
            x0 = (cx[part] - sw / 2).round().clamp(0, w - sw).long()
            rows = y0[:, None] + torch.arange(sh)
            cols = x0[:, None] + torch.arange(sw)
            win = mattes[part[:, None, None], rows[:, :, None], cols[:, None, :]]
            outside = mattes[part].sum((1, 2)) - win.sum((1, 2))
            iou[part], params[part] = fit(shape, win, outside, y0.float(), x0.float(), cx[part], cy[part], r[part])
    return iou.numpy(), params.numpy()
