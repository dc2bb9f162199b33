"""Built-in captioned data: pictures whose caption fully determines them, plus a pixel-level checker.

Each picture shows one shape on a plain background. Five attributes, each read back from the pixels with
~100% accuracy on clean renders (and still high with mild noise/blur), so the checker scores whether a
generated image follows its prompt:

    shape      circle | square | triangle | cross
    color      red | green | blue | yellow | purple
    background black | white | gray
    size       small | large
    position   left | center | right

Two checkers read pictures back: :func:`check_images` (lenient: per-attribute reads, the shape is whichever template
correlates best) and, with ``strict=True`` / :func:`strict_verdicts`, the strict one (exactly one object, inside the
frame, soft-mask IoU >= ``STRICT_IOU_THRESHOLD`` with the best-fitting ideal shape of the prompted kind).

Small random jitter (position, size, colours) keeps images distinct. Shards follow the img2dataset
layout: ``{key}.jpg`` + ``{key}.txt`` (caption) + ``{key}.json`` (attributes and img2dataset-like fields),
keys are 9-digit zero-padded strings (``"000000012"``).

CLI::

    python -m dalle2.data.synthetic --out data_builtin --num-train 4096 --num-val 512 --image-size 64
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import tarfile
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from dalle2.data.shape_fit import AREA, fit_all, matte
from dalle2.data.shape_fit import CROSS_BAR as _CROSS_BAR
from dalle2.data.shape_fit import SUPERSAMPLE as _SUPERSAMPLE
from dalle2.imaging import to_uint8

ATTRIBUTES: dict[str, list[str]] = {
    "shape": ["circle", "square", "triangle", "cross"],
    "color": ["red", "green", "blue", "yellow", "purple"],
    "background": ["black", "white", "gray"],
    "size": ["small", "large"],
    "position": ["left", "center", "right"],
}

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "green": (35, 185, 55),
    "blue": (40, 75, 230),
    "yellow": (240, 215, 35),
    "purple": (150, 45, 200),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (12, 12, 12),
    "white": (242, 242, 242),
    "gray": (128, 128, 128),
}
# Geometry, in units of the image side: shape centre x per position, half-extent per size.
_CENTER_X = {"left": 0.27, "center": 0.5, "right": 0.73}
_HALF_EXTENT = {"small": 0.11, "large": 0.21}
_POS_JITTER = 0.02
_SIZE_JITTER = 0.08
_COLOR_JITTER = 8
STRICT_IOU_THRESHOLD = 0.88  # the strict checker's IoU bar (calibration: README, section Data)

_POSITION_PHRASE = {"left": "on the left", "center": "in the center", "right": "on the right"}
_TEMPLATES = [
    "a {size} {color} {shape} {pos_phrase} of a {background} background",
    "a {background} picture with a {color} {shape}, {size}, {position}",
    "{size} {color} {shape}, {position}, {background} background",
    "a {color} {shape} that is {size}, placed {pos_phrase}, over {background}",
    "an image of a {size} {color} {shape} {pos_phrase} on {background}",
    "{background} background, {color} {shape} {pos_phrase}, {size}",
]
# Words accepted by parse_caption beyond the canonical values.
_SYNONYMS = {"grey": "gray", "big": "large", "middle": "center", "centre": "center", "violet": "purple"}
_WORD_TO_ATTR: dict[str, tuple[str, str]] = {}
for _attr, _values in ATTRIBUTES.items():
    for _v in _values:
        _WORD_TO_ATTR[_v] = (_attr, _v)
for _w, _v in _SYNONYMS.items():
    _WORD_TO_ATTR[_w] = next((a, _v) for a, vs in ATTRIBUTES.items() if _v in vs)


# --------------------------------------------------------------------------------------------- attributes


def sample_attributes(rng: np.random.Generator) -> dict[str, str]:
    """One uniformly random value per attribute, e.g. ``{"shape": "circle", "color": "red", ...}``."""
    return {name: values[int(rng.integers(len(values)))] for name, values in ATTRIBUTES.items()}


def _validate_attrs(attrs: dict[str, Any]) -> None:
    for name, values in ATTRIBUTES.items():
        if name not in attrs:
            raise ValueError(f"attributes {attrs!r} miss {name!r} (one of {values})")
        if attrs[name] not in values:
            raise ValueError(f"attribute {name}={attrs[name]!r} is not one of {values}")


def make_caption(attrs: dict[str, str], rng: np.random.Generator) -> str:
    """A caption for ``attrs`` from a random template; :func:`parse_caption` reads it back."""
    _validate_attrs(attrs)
    template = _TEMPLATES[int(rng.integers(len(_TEMPLATES)))]
    return template.format(pos_phrase=_POSITION_PHRASE[attrs["position"]], **attrs)


def parse_caption(caption: str, *, strict: bool = True) -> dict[str, str]:
    """Attributes named in ``caption`` (any template, synonyms like grey/big/middle accepted).

    With ``strict`` a caption that leaves an attribute out raises ``ValueError``; otherwise only the
    attributes found are returned. Two different values for one attribute always raise.
    """
    found: dict[str, str] = {}
    for word in re.findall(r"[a-z]+", caption.lower()):
        if word not in _WORD_TO_ATTR:
            continue
        attr, value = _WORD_TO_ATTR[word]
        if attr in found and found[attr] != value:
            raise ValueError(f"caption {caption!r} names two values for {attr}: {found[attr]!r} and {value!r}")
        found[attr] = value
    if strict:
        missing = [a for a in ATTRIBUTES if a not in found]
        if missing:
            raise ValueError(f"caption {caption!r} does not name: {', '.join(missing)}")
    return {a: found[a] for a in ATTRIBUTES if a in found}


def random_captions(n: int, seed: int = 0) -> list[str]:
    """``n`` captions of random attributes and templates (e.g. to train a tokenizer vocabulary on)."""
    rng = np.random.default_rng(seed)
    return [make_caption(sample_attributes(rng), rng) for _ in range(n)]


# --------------------------------------------------------------------------------------------- rendering


def _coverage(
    shape: str, cx: float, cy: float, r: float, height: int, width: int, ss: int = _SUPERSAMPLE
) -> np.ndarray:
    """Anti-aliased coverage in [0, 1], (H, W), of ``shape`` with bbox centre (cx, cy), half extent ``r``.

    Coordinates are in pixels with pixel ``i`` spanning ``[i, i+1]``.
    """
    ys = (np.arange(height * ss, dtype=np.float32) + 0.5) / ss - cy
    xs = (np.arange(width * ss, dtype=np.float32) + 0.5) / ss - cx
    y, x = ys[:, None], xs[None, :]
    if shape == "circle":
        inside = x * x + y * y <= r * r
    elif shape == "square":
        inside = (np.abs(x) <= r) & (np.abs(y) <= r)
    elif shape == "triangle":  # apex up, base at the bottom
        inside = (y >= -r) & (y <= r) & (np.abs(x) <= (y + r) / 2)
    elif shape == "cross":
        w = _CROSS_BAR * r
        ax, ay = np.abs(x), np.abs(y)
        inside = ((ax <= w) & (ay <= r)) | ((ay <= w) & (ax <= r))
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {ATTRIBUTES['shape']}")
    return inside.reshape(height, ss, width, ss).mean(axis=(1, 3), dtype=np.float32)


def render(
    attrs: dict[str, str], image_size: int, rng: np.random.Generator | None = None, *, jitter: float = 1.0
) -> np.ndarray:
    """Draw ``attrs`` as a uint8 RGB image of shape (S, S, 3); ``rng=None`` gives the un-jittered picture.
    ``jitter`` scales the position, size and colour jitter (the same draws: 1 gives the built-in data's pictures;
    above ~1.2 a large shape on the left or right can reach the border of a 32 px picture)."""
    _validate_attrs(attrs)
    if image_size < 16:
        raise ValueError(f"image_size={image_size} is too small; use at least 16 px")
    s = float(image_size)
    jx = jy = 0.0
    scale = 1.0
    fg = np.array(COLORS[attrs["color"]], dtype=np.float32)
    bg = np.array(BACKGROUNDS[attrs["background"]], dtype=np.float32)
    if rng is not None:
        pj, sj, cj = _POS_JITTER * jitter, _SIZE_JITTER * jitter, _COLOR_JITTER * jitter
        jx, jy = rng.uniform(-pj, pj, size=2)
        scale = 1.0 + rng.uniform(-sj, sj)
        fg = fg + rng.uniform(-cj, cj, size=3)
        bg = bg + rng.uniform(-cj, cj, size=3)
    cx = (_CENTER_X[attrs["position"]] + jx) * s
    cy = (0.5 + jy) * s
    r = _HALF_EXTENT[attrs["size"]] * scale * s
    alpha = _coverage(attrs["shape"], cx, cy, r, image_size, image_size)[..., None]
    img = bg * (1.0 - alpha) + fg * alpha
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------- checker


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
            t0 = _coverage(shape, cx - wx0, cy - wy0, r + dr, wy1 - wy0, wx1 - wx0, ss=4)
            for sigma in (0.0, 0.7, 1.2):
                t = ndimage.gaussian_filter(t0, sigma, mode="constant") if sigma else t0
                t = (t - t.mean()) / (t.std() + 1e-6)
                score = float((a * t).mean())
                if score > best:
                    best, best_shape = score, shape
    out["shape"] = best_shape
    return {a_: out[a_] for a_ in ATTRIBUTES}


def _to_uint8_hwc(images: Any, value_range: tuple[float, float]) -> np.ndarray:
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


def check_images(
    images: Any,
    attributes_list: Sequence[dict[str, str]],
    *,
    value_range: tuple[float, float] = (-1.0, 1.0),
    strict: bool = False,
    threshold: float = STRICT_IOU_THRESHOLD,
) -> dict[str, float]:
    """Does each picture show what its attributes (or prompt, via :func:`parse_caption`) say?

    Args:
        images: uint8 (N, H, W, 3) array/tensor, or float (N, 3, H, W) array/tensor in ``value_range``
            (default [-1, 1]; pass ``(0, 1)`` for [0, 1] images).
        attributes_list: N dicts; an attribute a dict leaves out is not scored for that image.
        strict: also run the strict checker (:func:`strict_verdicts`, IoU ``threshold``).

    Returns:
        the lenient reader's ``{"accuracy/<attr>": fraction correct, "accuracy/all": fraction with every given
        attribute right, "accuracy/mean": mean over attributes}``; with ``strict`` also :func:`strict_summary`'s
        ``strict/accuracy`` (one object, inside the frame, IoU >= threshold with the prompted shape),
        ``strict/one_object``, ``strict/inside``, ``strict/iou_mean`` and ``strict/all`` (strict and every
        attribute right).
    """
    arr = _to_uint8_hwc(images, value_range)
    if len(arr) != len(attributes_list):
        raise ValueError(f"{len(arr)} images but {len(attributes_list)} attribute dicts")
    if len(arr) == 0:
        raise ValueError("check_images got no images")
    right = {a: 0 for a in ATTRIBUTES}
    total = {a: 0 for a in ATTRIBUTES}
    all_right = []
    for img, want in zip(arr, attributes_list):
        got = read_attributes(img)
        ok = True
        for a in ATTRIBUTES:
            if a in want:
                total[a] += 1
                hit = got[a] == want[a]
                right[a] += int(hit)
                ok &= hit
        all_right.append(ok)
    result = {f"accuracy/{a}": right[a] / total[a] for a in ATTRIBUTES if total[a]}
    result["accuracy/all"] = sum(all_right) / len(arr)
    per_attr = [v for k, v in result.items() if k != "accuracy/all"]
    result["accuracy/mean"] = float(np.mean(per_attr)) if per_attr else 0.0
    if strict:
        result.update(strict_summary(strict_verdicts(arr, attributes_list, threshold=threshold), np.array(all_right)))
    return result


# --------------------------------------------------------------------------------------------- strict checker
# check_images' shape reader above is LENIENT: it names whichever template correlates best, so a lumpy blob still
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


def strict_verdicts(
    images: Any,
    attributes_list: Sequence[dict[str, str]],
    *,
    value_range: tuple[float, float] = (-1.0, 1.0),
    threshold: float = STRICT_IOU_THRESHOLD,
) -> dict[str, np.ndarray]:
    """Per-image strict verdicts, each an (N,) array (inputs as :func:`check_images`):

    ``num_objects`` connected parts of the object mask (alpha > 0.5, 8-connected) larger than 0.3 % of the image;
    ``touches_border`` whether one of those objects reaches the outermost pixels (no built-in prompt puts an object
    there; a speck on the border is not an object);
    ``iou`` the soft IoU of the object matte (smaller specks included) with the best-fitting ideal shape of the
    prompted kind (an image whose attributes leave the shape out: the best over all shapes), searched over centroid,
    size and, for squares, triangles and crosses, about +-15 degrees of rotation; ``fit`` (N, 4) its centroid x, y (px),
    half extent (px) and angle; ``ok`` = one object, not touching the border, ``iou >= threshold``.
    """
    from scipy import ndimage

    arr = _to_uint8_hwc(images, value_range)
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


# --------------------------------------------------------------------------------------------- shards


def _encode(img: np.ndarray, image_format: str) -> bytes:
    buf = io.BytesIO()
    if image_format == "jpg":
        Image.fromarray(img).save(buf, format="JPEG", quality=95, subsampling=0)
    else:
        Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _write_split(
    split_dir: str,
    *,
    split_id: int,
    num: int,
    image_size: int,
    samples_per_shard: int,
    seed: int,
    image_format: str,
    key_offset: int,
    jitter: float = 1.0,
) -> str:
    os.makedirs(split_dir, exist_ok=True)
    num_shards = max(1, -(-num // samples_per_shard))
    for shard in range(num_shards):
        path = os.path.join(split_dir, f"{shard:05d}.tar")
        with tarfile.open(path + ".tmp", "w") as tar:
            for i in range(shard * samples_per_shard, min(num, (shard + 1) * samples_per_shard)):
                rng = np.random.default_rng([seed, split_id, i])
                attrs = sample_attributes(rng)
                caption = make_caption(attrs, rng)
                img = render(attrs, image_size, rng, jitter=jitter)
                key = f"{key_offset + i:09d}"
                meta = {
                    **attrs,
                    "key": key,
                    "caption": caption,
                    "url": f"synthetic://{key}",
                    "status": "success",
                    "error_message": None,
                    "width": image_size,
                    "height": image_size,
                    "original_width": image_size,
                    "original_height": image_size,
                }
                _add_member(tar, f"{key}.{image_format}", _encode(img, image_format))
                _add_member(tar, f"{key}.txt", caption.encode("utf-8"))
                _add_member(tar, f"{key}.json", json.dumps(meta).encode("utf-8"))
        os.replace(path + ".tmp", path)
    last = num_shards - 1
    return os.path.join(split_dir, f"{{00000..{last:05d}}}.tar")


def write_shards(
    out_dir: str | os.PathLike,
    *,
    num_train: int,
    num_val: int,
    image_size: int = 64,
    samples_per_shard: int = 256,
    seed: int = 0,
    image_format: str = "jpg",
    jitter: float = 1.0,
) -> dict[str, str]:
    """Write built-in train/val shards; returns ``{"train": "DIR/train/{00000..0000N}.tar", "val": ...}``.

    Deterministic in ``seed``: sample ``i`` of a split is drawn from ``default_rng([seed, split, i])``; ``jitter``
    scales the pictures' random variation (:func:`render`).
    Train keys start at 0, val keys at ``num_train`` (keys are unique across splits).
    """
    if num_train < 1 or num_val < 0:
        raise ValueError(f"num_train must be >= 1 and num_val >= 0, got {num_train} and {num_val}")
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if image_format not in ("jpg", "png"):
        raise ValueError(f"image_format must be 'jpg' or 'png', got {image_format!r}")
    out_dir = os.fspath(out_dir)
    common = dict(
        image_size=image_size, samples_per_shard=samples_per_shard, seed=seed, image_format=image_format, jitter=jitter
    )
    urls = {"train": _write_split(os.path.join(out_dir, "train"), split_id=0, num=num_train, key_offset=0, **common)}
    if num_val > 0:
        urls["val"] = _write_split(
            os.path.join(out_dir, "val"), split_id=1, num=num_val, key_offset=num_train, **common
        )
    return urls


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Write the built-in synthetic captioned shards (img2dataset layout).")
    p.add_argument("--out", required=True, help="output directory (gets train/ and val/)")
    p.add_argument("--num-train", type=int, required=True)
    p.add_argument("--num-val", type=int, required=True)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--samples-per-shard", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-format", choices=["jpg", "png"], default="jpg")
    p.add_argument(
        "--jitter",
        type=float,
        default=1.0,
        help="scale of the position/size/colour jitter (1: the "
        "built-in data's; <= 1.2 keeps every shape off the border at 32 px)",
    )
    a = p.parse_args(argv)
    urls = write_shards(
        a.out,
        num_train=a.num_train,
        num_val=a.num_val,
        image_size=a.image_size,
        samples_per_shard=a.samples_per_shard,
        seed=a.seed,
        image_format=a.image_format,
        jitter=a.jitter,
    )
    for split, url in urls.items():
        print(f"{split}: {url}")


if __name__ == "__main__":
    main()
