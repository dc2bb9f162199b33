"""Calibration sets for the attribute checkers (:mod:`dalle2.data.checker`, :mod:`dalle2.data.strict_checker`): clean
renders and deliberately spoilt ones, with the attributes their prompts name, drawn from a ``val`` stream (to choose
the strict thresholds on) or a ``test`` stream (to report the acceptance table on).

:func:`calibration_images(case, n, image_size, seed, stream)` returns ``(images (n, S, S, 3) uint8, attributes)``.
``expect``: what the strict checker should do (``accept``: ~100 %; ``reject``: ~0 %, for the verdict named;
``chance``: the fraction of prompts that happen to name what is drawn; ``measured``: reported, no target):

==================  ============================================================================  ============
case                what                                                                           expect
==================  ============================================================================  ============
``clean``           :func:`~dalle2.data.synthetic.render` (the built-in data's pictures)           accept
``jpeg95``          the same through JPEG quality 95, 4:4:4 chroma (as the built-in shards are)     accept
``jpeg95_420``      JPEG quality 95, 4:2:0 chroma (PIL's / img2dataset's default)                  measured
``jpeg75``          JPEG quality 75, 4:2:0 chroma                                                  measured
``noise``           + Gaussian noise, std 6 levels                                                 measured
``rotated``         the object turned by 10 degrees                                                measured
``shuffled``        the ``clean`` pictures, prompts of other pictures (a derangement)              chance
``superellipse25``  ``|x|^p + |y|^p <= r^p``, p = 2.5, prompted as a circle or a square            reject shape
``superellipse3``   p = 3                                                                          reject shape
``superellipse4``   p = 4                                                                          reject shape
``skew``            sheared (x += 0.35 y): squares -> parallelograms, circles -> ellipses          reject shape
``size_off``        half extent x 0.7 or x 1.3 (the jitter is ± 8 %)                               reject size
``position_off``    moved by 0.07 of the side along x or y (the jitter is ± 0.02)                  reject position
``hue_off``         the object's CIELAB hue turned by 30 degrees (L* and chroma kept; the way the   reject color
                    sRGB gamut allows: turned the other way, blue clips to a mere ΔE 17)
``blur1``           Gaussian blur, std 1 px                                                        reject sharp
``blur2``           std 2 px                                                                       reject sharp
``blur3``           std 3 px                                                                       reject sharp
``bicubic_x2``      rendered at S/2, bicubic-upsampled to S                                        measured
``bicubic_x4``      rendered at S/4, bicubic-upsampled to S (the upsampler's baseline)             reject sharp
``two_objects``     a second small object of the same colour in a corner                           reject one_object
``cut_by_border``   moved so that 40 % of its half extent lies beyond the left/right edge          reject inside
==================  ============================================================================  ============

:func:`calibration_table` scores every case with ``check_images(..., strict=True)`` and the per-image verdicts'
bootstrap intervals; :func:`measurements` gives the per-image strict measurements the thresholds are chosen from
(``dalle2.data.checker_thresholds``).  Deterministic in ``seed`` and ``stream``.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from dalle2.data import scene
from dalle2.data import synthetic as syn
from dalle2.data.cielab import delta_e, lab_to_srgb, srgb_to_lab
from dalle2.data.shape_fit import ideal

__all__ = ["CASES", "EXPECT", "STREAMS", "available", "calibration_images", "draw_scene", "chance_levels"]

# case -> (expectation, the verdict a rejected case must fail)
EXPECT: dict[str, tuple[str, str | None]] = {
    "clean": ("accept", None),
    "jpeg95": ("accept", None),
    "jpeg95_420": ("measured", None),
    "jpeg75": ("measured", None),
    "noise": ("measured", None),
    "rotated": ("measured", None),
    "shuffled": ("chance", None),
    "superellipse25": ("reject", "shape"),
    "superellipse3": ("reject", "shape"),
    "superellipse4": ("reject", "shape"),
    "skew": ("reject", "shape"),
    "size_off": ("reject", "size"),
    "position_off": ("reject", "position"),
    "hue_off": ("reject", "color"),
    "blur1": ("reject", "sharp"),
    "blur2": ("reject", "sharp"),
    "blur3": ("reject", "sharp"),
    "bicubic_x2": ("measured", None),
    "bicubic_x4": ("reject", "sharp"),
    "two_objects": ("reject", "one_object"),
    "cut_by_border": ("reject", "inside"),
}
CASES = tuple(EXPECT)
STREAMS = {"val": 1, "test": 2}  # the calibration pictures' random streams: choose on val, report on test


def available(case: str, image_size: int) -> bool:
    """Whether ``case`` can be drawn at ``image_size`` (a bicubic case needs its low-resolution render >= 16 px)."""
    return not case.startswith("bicubic_x") or image_size // int(case[-1]) >= 16


def draw_scene(image_size: int, background, objects: list[dict], ss: int = 4) -> np.ndarray:
    """uint8 (S, S, 3) picture: ``background`` RGB, then each object ``{"shape", "color" (RGB), "cx", "cy", "r"
    (px, bbox centre and half extent as render() uses them), "angle" (degrees), "shear"}`` drawn with ss x ss
    supersampling (x -> x + shear * y, then the rotation, about the object's centre).  Besides render()'s shapes,
    ``"superellipse"`` with exponent ``"p"``: ``|x|^p + |y|^p <= r^p`` (p = 2 a circle, p -> inf a square)."""
    img = np.broadcast_to(np.asarray(background, dtype=np.float32), (image_size, image_size, 3)).copy()
    grid = (torch.arange(image_size * ss, dtype=torch.float32) + 0.5) / ss
    for ob in objects:
        x, y = grid.view(1, -1) - ob["cx"], grid.view(-1, 1) - ob["cy"]
        th = np.deg2rad(ob.get("angle", 0.0))
        x, y = np.cos(th) * x + np.sin(th) * y, -np.sin(th) * x + np.cos(th) * y  # undo the rotation
        x = x - ob.get("shear", 0.0) * y  # undo the shear
        r = torch.tensor(float(ob["r"]))
        if ob["shape"] == "superellipse":
            inside = (x.abs() / r) ** ob["p"] + (y.abs() / r) ** ob["p"] <= 1.0
        else:
            inside = ideal(ob["shape"], x, y, r, soft=False)
        cov = inside.float().view(image_size, ss, image_size, ss).mean((1, 3)).numpy()[..., None]
        img = img * (1.0 - cov) + np.asarray(ob["color"], dtype=np.float32) * cov
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _geometry(attrs: dict, image_size: int, rng: np.random.Generator) -> dict:
    """The jittered object and background of :func:`render` for ``attrs`` (same draws, same order)."""
    s = float(image_size)
    jx, jy = rng.uniform(-scene.POS_JITTER, scene.POS_JITTER, size=2)
    scale = 1.0 + rng.uniform(-scene.SIZE_JITTER, scene.SIZE_JITTER)
    cj = scene.COLOR_JITTER
    fg = np.array(scene.COLORS[attrs["color"]], dtype=np.float32) + rng.uniform(-cj, cj, 3)
    bg = np.array(scene.BACKGROUNDS[attrs["background"]], dtype=np.float32) + rng.uniform(-cj, cj, 3)
    r = scene.HALF_EXTENT[attrs["size"]] * scale * s
    cx, cy = (scene.CENTER_X[attrs["position"]] + jx) * s, (scene.CENTER_Y + jy) * s
    return {"background": bg, "object": {"shape": attrs["shape"], "color": fg, "r": r, "cx": cx, "cy": cy}}


def _jpeg(img: np.ndarray, quality: int, subsampling: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality, subsampling=subsampling)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    from scipy import ndimage

    out = ndimage.gaussian_filter(img.astype(np.float32), sigma=(sigma, sigma, 0), mode="nearest")
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _hue_turned(rgb: np.ndarray, degrees: float) -> np.ndarray:
    """``rgb`` with its CIELAB hue angle turned by ``degrees`` (L* and chroma kept; clipped to the sRGB gamut)."""
    lab = srgb_to_lab(rgb)
    t = np.deg2rad(degrees)
    a, b = lab[1] * np.cos(t) - lab[2] * np.sin(t), lab[1] * np.sin(t) + lab[2] * np.cos(t)
    return np.clip(lab_to_srgb(np.array([lab[0], a, b])), 0, 255)


def _one(case: str, attrs: dict, size: int, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """One picture of ``case`` and the attributes its prompt names."""
    if case in ("clean", "shuffled", "noise") or case.startswith(("jpeg", "blur")):
        img = syn.render(attrs, size, rng)
        if case.startswith("jpeg"):
            quality = int(case[4:6])
            img = _jpeg(img, quality, 0 if case == "jpeg95" else 2)
        elif case == "noise":
            img = np.clip(np.rint(img + rng.normal(0.0, 6.0, img.shape)), 0, 255).astype(np.uint8)
        elif case.startswith("blur"):
            img = _blur(img, float(case[4:]))
        return img, attrs
    if case.startswith("bicubic_x"):
        f = int(case[-1])
        low = syn.render(attrs, size // f, rng)
        return np.asarray(Image.fromarray(low).resize((size, size), Image.BICUBIC)), attrs
    g = _geometry(attrs, size, rng)
    ob = dict(g["object"])
    objects = [ob]
    if case == "rotated":
        ob["angle"] = 10.0 * rng.choice([-1.0, 1.0])
    elif case == "skew":
        ob["shear"] = 0.35 * rng.choice([-1.0, 1.0])
    elif case.startswith("superellipse"):
        ob["shape"], ob["p"] = "superellipse", {"25": 2.5, "3": 3.0, "4": 4.0}[case[len("superellipse") :]]
        attrs = {**attrs, "shape": ("circle", "square")[int(rng.integers(2))]}
    elif case == "size_off":
        ob["r"] *= rng.choice([0.7, 1.3])
    elif case == "position_off":
        axis = ("cx", "cy")[int(rng.integers(2))]
        ob[axis] += 0.07 * size * rng.choice([-1.0, 1.0])
    elif case == "hue_off":  # of the two ways, the one that leaves the colour further away (less clipped)
        turned = [_hue_turned(ob["color"], d) for d in (30.0, -30.0)]
        ob["color"] = max(turned, key=lambda c: float(delta_e(c, ob["color"])))
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
    return draw_scene(size, g["background"], objects), attrs


def calibration_images(
    case: str, n: int, image_size: int, seed: int = 0, stream: str = "test"
) -> tuple[np.ndarray, list[dict]]:
    """``n`` pictures of ``case`` (see the module docstring) and the attributes their prompts name, from the
    ``stream`` (val: for choosing thresholds, test: for reporting) of ``seed``."""
    if case not in CASES:
        raise ValueError(f"unknown calibration case {case!r}; expected one of {CASES}")
    if not available(case, image_size):
        raise ValueError(f"calibration case {case!r} needs a larger picture than {image_size} px")
    if stream not in STREAMS:
        raise ValueError(f"unknown calibration stream {stream!r}; expected one of {list(STREAMS)}")
    base = CASES.index("clean" if case == "shuffled" else case)
    rng = np.random.default_rng([seed, STREAMS[stream], image_size, base])
    drawn = [syn.sample_attributes(rng) for _ in range(n)]
    pairs = [_one(case, a, image_size, rng) for a in drawn]
    images = np.stack([p[0] for p in pairs])
    attrs = [p[1] for p in pairs]
    if case == "shuffled":
        order = rng.permutation(n)
        attrs = [attrs[j] for j in np.roll(order, -1)[np.argsort(order)]]  # a derangement: no picture keeps its own
    return images, attrs


def chance_levels(n: int, image_size: int, seed: int = 0, stream: str = "test") -> dict[str, float]:
    """For the ``shuffled`` case: per attribute, the fraction of prompts that name what the picture shows anyway
    (``chance/<attr>``; uniform attributes: 1/4 shape, 1/5 colour, 1/3 background, 1/2 size, 1/3 position) and
    ``chance/all`` (every attribute; 1/360 for uniform attributes)."""
    drawn = calibration_images("clean", n, image_size, seed, stream)[1]
    given = calibration_images("shuffled", n, image_size, seed, stream)[1]
    same = {a: np.array([g[a] == d[a] for g, d in zip(given, drawn)]) for a in syn.ATTRIBUTES}
    out = {f"chance/{a}": float(v.mean()) for a, v in same.items()}
    out["chance/all"] = float(np.logical_and.reduce(list(same.values())).mean())
    return out
