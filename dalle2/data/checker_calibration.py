"""Calibration sets for the attribute checkers of :mod:`dalle2.data.synthetic`: clean renders and deliberately
spoilt ones, with the attributes their prompts name.

:func:`calibration_images(case, n, image_size, seed)` returns ``(images (n, S, S, 3) uint8, attributes)``:

======================  ===============================================================================  ==========
case                    what                                                                             strict
======================  ===============================================================================  ==========
``clean``               :func:`~dalle2.data.synthetic.render` (the built-in data's pictures)              accept
``jpeg95``              the same, JPEG quality 95 (img2dataset's default), 4:2:0 chroma (PIL's default)    accept
``jpeg75``              the same, JPEG quality 75, 4:2:0 chroma                                           (measured)
``noise``               the same + Gaussian noise, std 6 levels                                           accept
``rotated``             the object turned by 10 degrees                                                   accept
``bicubic_x2``          rendered at S/2, bicubic-upsampled to S (the upsampler's baseline)                (measured)
``shuffled``            the ``clean`` pictures, prompts of other pictures (a derangement)                 ~chance
``skew``                the object sheared (x += 0.35 y): squares -> parallelograms, circles -> ellipses   reject
``blur``                Gaussian blur, std 0.05 S                                                         reject
``two_objects``         a second small object of the same colour in a corner                              reject
``cut_by_border``       the object moved so that 40 % of its half extent lies beyond the left/right edge  reject
======================  ===============================================================================  ==========

:func:`calibration_table` scores every case with ``check_images(..., strict=True)``; ``eval/fidelity_ablation.py
calibrate`` prints it (README, section Data, holds the figures).  Deterministic in ``seed``.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from dalle2.data import synthetic as syn
from dalle2.data.shape_fit import ideal

__all__ = ["CASES", "calibration_images", "calibration_table", "draw_scene"]

CASES = (
    "clean",
    "jpeg95",
    "jpeg75",
    "noise",
    "rotated",
    "bicubic_x2",
    "shuffled",
    "skew",
    "blur",
    "two_objects",
    "cut_by_border",
)


def draw_scene(image_size: int, background, objects: list[dict], ss: int = 4) -> np.ndarray:
    """uint8 (S, S, 3) picture: ``background`` RGB, then each object ``{"shape", "color" (RGB), "cx", "cy", "r"
    (px, bbox centre and half extent as render() uses them), "angle" (degrees), "shear"}`` drawn with ss x ss
    supersampling (x -> x + shear * y, then the rotation, about the object's centre)."""
    img = np.broadcast_to(np.asarray(background, dtype=np.float32), (image_size, image_size, 3)).copy()
    grid = (torch.arange(image_size * ss, dtype=torch.float32) + 0.5) / ss
    for ob in objects:
        x, y = grid.view(1, -1) - ob["cx"], grid.view(-1, 1) - ob["cy"]
        th = np.deg2rad(ob.get("angle", 0.0))
        x, y = np.cos(th) * x + np.sin(th) * y, -np.sin(th) * x + np.cos(th) * y  # undo the rotation
        x = x - ob.get("shear", 0.0) * y  # undo the shear
        inside = ideal(ob["shape"], x, y, torch.tensor(float(ob["r"])), soft=False)
        cov = inside.float().view(image_size, ss, image_size, ss).mean((1, 3)).numpy()[..., None]
        img = img * (1.0 - cov) + np.asarray(ob["color"], dtype=np.float32) * cov
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _geometry(attrs: dict, image_size: int, rng: np.random.Generator) -> dict:
    """The jittered object and background of :func:`render` for ``attrs`` (same draws, same order)."""
    s = float(image_size)
    jx, jy = rng.uniform(-syn.POS_JITTER, syn.POS_JITTER, size=2)
    scale = 1.0 + rng.uniform(-syn.SIZE_JITTER, syn.SIZE_JITTER)
    fg = np.array(syn.COLORS[attrs["color"]], dtype=np.float32) + rng.uniform(-syn.COLOR_JITTER, syn.COLOR_JITTER, 3)
    bg = np.array(syn.BACKGROUNDS[attrs["background"]], dtype=np.float32) + rng.uniform(
        -syn.COLOR_JITTER, syn.COLOR_JITTER, 3
    )
    r = syn.HALF_EXTENT[attrs["size"]] * scale * s
    cx, cy = (syn.CENTER_X[attrs["position"]] + jx) * s, (0.5 + jy) * s
    return {"background": bg, "object": {"shape": attrs["shape"], "color": fg, "r": r, "cx": cx, "cy": cy}}


def _one(case: str, attrs: dict, size: int, rng: np.random.Generator) -> np.ndarray:
    if case in ("clean", "jpeg95", "jpeg75", "noise", "shuffled", "blur"):
        img = syn.render(attrs, size, rng)
        if case.startswith("jpeg"):
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="JPEG", quality=int(case[4:]), subsampling=2)
            img = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
        elif case == "noise":
            img = np.clip(np.rint(img + rng.normal(0.0, 6.0, img.shape)), 0, 255).astype(np.uint8)
        elif case == "blur":
            from scipy import ndimage

            img = ndimage.gaussian_filter(img.astype(np.float32), sigma=(0.05 * size, 0.05 * size, 0), mode="nearest")
            img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
        return img
    if case == "bicubic_x2":
        low = syn.render(attrs, size // 2, rng)
        return np.asarray(Image.fromarray(low).resize((size, size), Image.BICUBIC))
    g = _geometry(attrs, size, rng)
    ob = dict(g["object"])
    objects = [ob]
    if case == "rotated":
        ob["angle"] = 10.0 * rng.choice([-1.0, 1.0])
    elif case == "skew":
        ob["shear"] = 0.35 * rng.choice([-1.0, 1.0])
    elif case == "cut_by_border":
        ob["cx"] = 0.6 * ob["r"] if attrs["position"] != "right" else size - 0.6 * ob["r"]
    elif case == "two_objects":
        corner = rng.choice([0.15, 0.85], size=2)
        objects.append(
            {
                **ob,
                "shape": syn.ATTRIBUTES["shape"][int(rng.integers(4))],
                "r": 0.08 * size,
                "cx": corner[0] * size,
                "cy": corner[1] * size,
            }
        )
    else:
        raise ValueError(f"unknown calibration case {case!r}; expected one of {CASES}")
    return draw_scene(size, g["background"], objects)


def calibration_images(case: str, n: int, image_size: int, seed: int = 0) -> tuple[np.ndarray, list[dict]]:
    """``n`` pictures of ``case`` (see the module docstring) and the attributes their prompts name."""
    if case not in CASES:
        raise ValueError(f"unknown calibration case {case!r}; expected one of {CASES}")
    rng = np.random.default_rng([seed, image_size, CASES.index("clean" if case == "shuffled" else case)])
    attrs = [syn.sample_attributes(rng) for _ in range(n)]
    images = np.stack([_one(case, a, image_size, rng) for a in attrs])
    if case == "shuffled":
        order = rng.permutation(n)
        attrs = [attrs[j] for j in np.roll(order, -1)[np.argsort(order)]]  # a derangement: no picture keeps its own
    return images, attrs


def calibration_table(
    sizes=(32, 64), n: int = 256, seed: int = 0, cases=CASES, threshold: float = syn.STRICT_IOU_THRESHOLD
) -> list[dict]:
    """One row per (case, size): the strict and lenient figures of ``check_images(..., strict=True)`` plus the
    IoU's 1st / 50th percentile (and, for ``shuffled``, ``chance/shape``: how many prompts name the drawn shape)."""
    rows = []
    for case in cases:
        for size in sizes:
            images, attrs = calibration_images(case, n, size, seed)
            res = syn.check_images(images, attrs, strict=True, threshold=threshold)
            iou = syn.strict_verdicts(images, attrs, threshold=threshold)["iou"]
            row = {
                "case": case,
                "image_size": size,
                "n": n,
                **res,
                "strict/iou_p01": float(np.quantile(iou, 0.01)),
                "strict/iou_p50": float(np.median(iou)),
            }
            if case == "shuffled":  # chance: the prompts that name the drawn shape anyway
                drawn = calibration_images("clean", n, size, seed)[1]
                row["chance/shape"] = float(np.mean([a["shape"] == d["shape"] for a, d in zip(attrs, drawn)]))
            rows.append(row)
    return rows
