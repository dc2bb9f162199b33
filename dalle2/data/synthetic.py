"""Built-in captioned data: pictures whose caption fully determines them.

Each picture shows one shape on a plain background. Five attributes (the palette, geometry and jitter:
:mod:`dalle2.data.scene`), each read back from the pixels, so a checker scores whether a generated image follows
its prompt:

    shape      circle | square | triangle | cross
    color      red | green | blue | yellow | purple
    background black | white | gray
    size       small | large
    position   left | center | right

Two checkers read pictures back (:mod:`dalle2.data.checker`, re-exported here): :func:`check_images` (lenient:
per-attribute reads, the shape is whichever template correlates best) and, with ``strict=True`` /
:func:`strict_verdicts`, the strict one (:mod:`dalle2.data.strict_checker`; docs/checker.md).

Three splits: ``train``, ``val`` (held out, for choosing: checkpoints, guidance, thresholds) and ``test`` (held
out, for reporting), each its own random stream (:func:`write_shards`).

Small random jitter (position, size, colours) keeps images distinct. Shards follow the img2dataset
layout: ``{key}.jpg`` + ``{key}.txt`` (caption) + ``{key}.json`` (attributes and img2dataset-like fields),
keys are 9-digit zero-padded strings (``"000000012"``).

CLI::

    python -m dalle2.data.synthetic --out data_builtin --num-train 4096 --num-val 512 --num-test 512 --image-size 256

(256 px: every stage reads the size it needs, the base decoder 64 px, the upsampler 256 px; ``--reuse`` keeps shards
already written at that size.)
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import tarfile
from typing import Any

import numpy as np
from PIL import Image

# the checkers live in their own modules; re-exported here, where callers have always found them
from dalle2.data.checker import check_images, read_attributes, strict_summary, strict_verdicts
from dalle2.data.scene import (
    ATTRIBUTES,
    BACKGROUNDS,
    CENTER_X,
    CENTER_Y,
    COLOR_JITTER,
    COLORS,
    HALF_EXTENT,
    POS_JITTER,
    SIZE_JITTER,
    coverage,
)
from dalle2.data.strict_checker import STRICT_IOU_THRESHOLD

__all__ = [
    "ATTRIBUTES",
    "BACKGROUNDS",
    "COLORS",
    "STRICT_IOU_THRESHOLD",
    "check_images",
    "make_caption",
    "parse_caption",
    "random_captions",
    "read_attributes",
    "render",
    "sample_attributes",
    "strict_summary",
    "strict_verdicts",
    "write_shards",
]

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
        pj, sj, cj = POS_JITTER * jitter, SIZE_JITTER * jitter, COLOR_JITTER * jitter
        jx, jy = rng.uniform(-pj, pj, size=2)
        scale = 1.0 + rng.uniform(-sj, sj)
        fg = fg + rng.uniform(-cj, cj, size=3)
        bg = bg + rng.uniform(-cj, cj, size=3)
    cx = (CENTER_X[attrs["position"]] + jx) * s
    cy = (CENTER_Y + jy) * s
    r = HALF_EXTENT[attrs["size"]] * scale * s
    alpha = coverage(attrs["shape"], cx, cy, r, image_size, image_size)[..., None]
    img = bg * (1.0 - alpha) + fg * alpha
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


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


SPLITS = {"train": 0, "val": 1, "test": 2}  # split name -> its stream id: sample i of split s draws from [seed, id, i]


def write_shards(
    out_dir: str | os.PathLike,
    *,
    num_train: int,
    num_val: int,
    num_test: int | None = None,
    image_size: int = 64,
    samples_per_shard: int = 256,
    seed: int = 0,
    image_format: str = "jpg",
    jitter: float = 1.0,
) -> dict[str, str]:
    """Write built-in train/val/test shards; returns ``{"train": "DIR/train/{00000..0000N}.tar", "val": ...,
    "test": ...}`` (a split of 0 samples is not written).

    ``val`` is for choosing (checkpoints, guidance, thresholds), ``test`` for reporting: both held out from
    training, disjoint from each other.  ``num_test`` defaults to ``num_val``.
    Deterministic in ``seed``: sample ``i`` of a split is drawn from ``default_rng([seed, SPLITS[split], i])``, so
    each split is its own random stream (test's draws are those of no other split, and adding a test split leaves
    train and val byte for byte as they were); ``jitter`` scales the pictures' random variation (:func:`render`).
    Train keys start at 0, val keys at ``num_train``, test keys at ``num_train + num_val`` (unique across splits).
    """
    num_test = num_val if num_test is None else num_test
    if num_train < 1 or num_val < 0 or num_test < 0:
        raise ValueError(
            f"num_train must be >= 1, num_val and num_test >= 0, got {num_train}, {num_val} and {num_test}"
        )
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if image_format not in ("jpg", "png"):
        raise ValueError(f"image_format must be 'jpg' or 'png', got {image_format!r}")
    out_dir = os.fspath(out_dir)
    common = dict(
        image_size=image_size, samples_per_shard=samples_per_shard, seed=seed, image_format=image_format, jitter=jitter
    )
    urls = {}
    offset = 0
    for split, num in (("train", num_train), ("val", num_val), ("test", num_test)):
        if num > 0:
            urls[split] = _write_split(
                os.path.join(out_dir, split), split_id=SPLITS[split], num=num, key_offset=offset, **common
            )
        offset += num
    return urls


def existing_shards(
    out_dir: str | os.PathLike,
    image_size: int,
    *,
    num_train: int,
    num_val: int,
    num_test: int | None = None,
    samples_per_shard: int = 256,
) -> dict[str, str] | None:
    """``{split: urls}`` of the shards :func:`write_shards` would write in ``out_dir`` when they are all there and
    their first pictures are ``image_size`` px; otherwise None."""
    from dalle2.data.resolution import probe_image_sizes

    num_test = num_val if num_test is None else num_test
    urls = {}
    for split, num in (("train", num_train), ("val", num_val), ("test", num_test)):
        if num <= 0:
            continue
        last = max(1, -(-num // samples_per_shard)) - 1
        paths = [os.path.join(os.fspath(out_dir), split, f"{i:05d}.tar") for i in range(last + 1)]
        if not all(os.path.isfile(x) for x in paths):
            return None
        _, sizes = probe_image_sizes(paths[0], max_samples=4)
        if not sizes or any(s != (image_size, image_size) for s in sizes):
            return None
        urls[split] = os.path.join(os.fspath(out_dir), split, f"{{00000..{last:05d}}}.tar")
    return urls


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Write the built-in synthetic captioned shards (img2dataset layout).")
    p.add_argument("--out", required=True, help="output directory (gets train/, val/ and test/)")
    p.add_argument("--num-train", type=int, required=True)
    p.add_argument("--num-val", type=int, required=True, help="held-out samples for choosing (val/)")
    p.add_argument(
        "--num-test", type=int, default=None, help="held-out samples for reporting (test/; default: --num-val)"
    )
    p.add_argument("--image-size", type=int, default=256, help="side of the pictures (stages read the size they need)")
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
    p.add_argument(
        "--reuse",
        action="store_true",
        help="keep shards already in --out when every split's are there with pictures of --image-size px "
        "(otherwise write them: shards of another size, e.g. from an older version, are rewritten)",
    )
    a = p.parse_args(argv)
    if a.reuse:
        found = existing_shards(
            a.out,
            a.image_size,
            num_train=a.num_train,
            num_val=a.num_val,
            num_test=a.num_test,
            samples_per_shard=a.samples_per_shard,
        )
        if found is not None:
            for split, url in found.items():
                print(f"{split}: {url} (kept: {a.image_size} px pictures)")
            return
    urls = write_shards(
        a.out,
        num_train=a.num_train,
        num_val=a.num_val,
        num_test=a.num_test,
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
