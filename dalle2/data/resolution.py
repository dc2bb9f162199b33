"""Is there enough resolution in the shards for the stage that trains on them?

The data loader resizes every picture to the stage's ``image_size`` (shorter side, then a crop).  A stage whose
resolution is larger than the pictures — a 256 px upsampler on 64 px pictures — would then quietly learn to
reproduce an upsampled (blurred) copy of its own low-res input.  :func:`check_resolution` reads the headers of the
first pictures of the first local shard (no decoding) and stops, naming the sizes found, when none of them is large
enough; when only some are too small it warns with their count.

    check_resolution("data/{00000..00015}.tar", 256, what="the upsampler (module.image_size=256)")
"""

from __future__ import annotations

import io
import warnings
from collections import Counter

from PIL import Image

__all__ = ["ResolutionError", "check_config_resolution", "check_resolution", "probe_image_sizes"]

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


class ResolutionError(ValueError):
    """The shard pictures are smaller than the resolution the stage trains at."""


def _first_local_shard(urls) -> str | None:
    from dalle2.data.urls import expand_urls, is_remote

    try:
        expanded = expand_urls(urls)  # local paths come back existing, without file:
    except (FileNotFoundError, ValueError):
        return None  # missing shards are reported by the shard check (or the stage that writes them runs first)
    first = expanded[0]
    return None if is_remote(first) else first  # remote shards are not probed (reading them is the loader's job)


def probe_image_sizes(urls: str, *, max_samples: int = 16) -> tuple[str | None, list[tuple[int, int]]]:
    """``(shard, [(width, height), ...])`` of the first ``max_samples`` pictures of the first local shard of ``urls``
    (headers only); ``(None, [])`` when the shards are remote or hold no picture."""
    from dalle2.data.webdataset import iter_raw_samples

    shard = _first_local_shard(urls)
    if shard is None:
        return None, []
    sizes: list[tuple[int, int]] = []
    for sample in iter_raw_samples(shard):
        data = next((sample[ext] for ext in IMAGE_EXTENSIONS if isinstance(sample.get(ext), bytes)), None)
        if data is None:
            continue
        try:
            with Image.open(io.BytesIO(data)) as img:
                sizes.append(img.size)
        except (OSError, ValueError):
            continue  # a corrupt picture is the loader's to skip and count
        if len(sizes) >= max_samples:
            break
    return shard, sizes


def _describe(sizes: list[tuple[int, int]]) -> str:
    counts = Counter(sizes)
    return ", ".join(f"{w}x{h}" + (f" (x{n})" if n > 1 else "") for (w, h), n in counts.most_common(4)) + (
        ", ..." if len(counts) > 4 else ""
    )


def check_resolution(urls: str, image_size: int, *, what: str, max_samples: int = 16) -> list[tuple[int, int]]:
    """Raise :class:`ResolutionError` when no probed picture of ``urls`` has a shorter side of at least
    ``image_size`` (the stage ``what`` would train on upsampled pictures); warn when some are smaller.  Returns the
    sizes found (empty when the shards are remote or were not probed)."""
    shard, sizes = probe_image_sizes(urls, max_samples=max_samples)
    if not sizes:
        return sizes
    small = [s for s in sizes if min(s) < image_size]
    if len(small) == len(sizes):
        raise ResolutionError(
            f"{what} trains at {image_size} px, but the pictures in {shard} are {_describe(sizes)} (first "
            f"{len(sizes)} read): every one would be upsampled to {image_size} px, and the stage would learn blurred "
            f"targets. Give shards of pictures at least {image_size} px on the shorter side (the built-in data: "
            f"python -m dalle2.data.synthetic --image-size {image_size} ...), or train at a resolution they have."
        )
    if small:
        warnings.warn(
            f"{what} trains at {image_size} px; {len(small)} of the first {len(sizes)} pictures in {shard} are "
            f"smaller ({_describe(small)}) and will be upsampled",
            stacklevel=2,
        )
    return sizes


def check_config_resolution(cfg) -> list[tuple[int, int]]:
    """:func:`check_resolution` for a composed train/train.py config: the resolution is the larger of
    ``data.image_size`` and ``module.image_size`` (an upsampler's output side), the pictures those of
    ``data.train_urls``.  Nothing is checked for a run that loads no pictures (embedding shards)."""
    data, module = cfg.get("data") or {}, cfg.get("module") or {}
    if not data.get("load_image", True) or not data.get("train_urls"):
        return []
    sizes = {
        k: int(v)
        for k, v in (("data.image_size", data.get("image_size")), ("module.image_size", module.get("image_size")))
        if isinstance(v, int) and not isinstance(v, bool)
    }
    if not sizes:
        return []
    key = max(sizes, key=sizes.get)
    stage = cfg.get("stage_name") or "stage"
    urls = data.train_urls
    urls = urls if isinstance(urls, str) else [str(u) for u in urls]  # a list (or Hydra ListConfig) of urls
    return check_resolution(urls, sizes[key], what=f"the {stage} ({key}={sizes[key]})")
