"""The data side of the COCO zero-shot FID protocol: captions drawn from ``captions_val2014.json``, the reference
image list, file hashes, and the reference-statistics cache.

``captions_val2014.json`` schema (the parts read): ``{"images": [{"id", "file_name", ...}], "annotations":
[{"image_id", "id", "caption"}, ...]}``.

**Drawing captions** (:func:`draw_captions`): image ids that have at least one caption are ordered by
``mix_seed(seed, image_id)`` (ties by id) and the first ``n`` are taken; each gets ONE caption, its annotation number
``mix_seed(seed, image_id, 1) % count`` among its captions sorted by annotation id.  The draw for ``n`` is a prefix of
the draw for any larger ``n`` with the same seed, and an image's caption does not depend on ``n``.

**Reference images** (:func:`reference_files`): every image of the json (or the first ``n_ref`` in the same seeded
order), as files under ``images_dir``, sorted by file name.

**Cache** (:class:`ReferenceCache`): the reference Inception features, their mean and covariance and their k-NN radii
(precision/recall) in ``<dir>/<key>.npz``, ``key`` = sha256 of the sorted file list (names and byte sizes), the
resize description and image size, the Inception weights' sha256 and ``k``; written atomically, read with
``allow_pickle=False``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np

from dalle2.io import atomic_write
from dalle2.seeding import mix_seed

__all__ = [
    "CocoCaptions",
    "draw_captions",
    "reference_files",
    "file_list_digest",
    "file_sha256",
    "ReferenceCache",
    "write_jsonl_atomic",
]


class CocoCaptions:
    """``captions_val2014.json`` read and checked: ``files[image_id]`` (file name), ``captions[image_id]`` (list of
    (annotation id, caption) sorted by annotation id)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"COCO captions file not found: {self.path}")
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ValueError(f"{self.path}: not JSON ({exc})") from None
        if (
            not isinstance(data, dict)
            or not isinstance(data.get("images"), list)
            or not isinstance(data.get("annotations"), list)
        ):
            raise ValueError(f"{self.path}: expected a COCO captions file with 'images' and 'annotations' lists")
        try:
            self.files = {int(im["id"]): str(im["file_name"]) for im in data["images"]}
            caps: dict[int, list[tuple[int, str]]] = {}
            for a in data["annotations"]:
                caps.setdefault(int(a["image_id"]), []).append((int(a["id"]), " ".join(str(a["caption"]).split())))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(
                f"{self.path}: an image needs 'id' and 'file_name', an annotation 'image_id', 'id' and "
                f"'caption' ({type(exc).__name__}: {exc})"
            ) from None
        unknown = sorted(set(caps) - set(self.files))
        if unknown:
            raise ValueError(f"{self.path}: {len(unknown)} annotations name images not in 'images' (e.g. {unknown[0]})")
        self.captions = {i: sorted(c) for i, c in caps.items()}

    def seeded_order(self, seed: int, ids=None) -> list[int]:
        ids = self.files if ids is None else ids
        return sorted(ids, key=lambda i: (mix_seed(seed, i), i))


def draw_captions(coco: CocoCaptions, *, n: int | None, seed: int) -> list[dict]:
    """``n`` rows (all captioned images when None) ``{"index", "image_id", "file_name", "caption_id", "caption"}``,
    one per image id, in draw order (see the module docstring)."""
    order = coco.seeded_order(seed, [i for i, c in coco.captions.items() if c])
    if n is not None and not 1 <= n <= len(order):
        raise ValueError(f"n={n}: {coco.path} has {len(order)} captioned images (n must be 1..{len(order)})")
    rows = []
    for j, image_id in enumerate(order[: n if n is not None else len(order)]):
        caps = coco.captions[image_id]
        cap_id, text = caps[mix_seed(seed, image_id, 1) % len(caps)]
        rows.append(
            {"index": j, "image_id": image_id, "file_name": coco.files[image_id], "caption_id": cap_id, "caption": text}
        )
    return rows


def reference_files(
    coco: CocoCaptions, images_dir: str | os.PathLike, *, n_ref: int | None = None, seed: int = 0
) -> list[tuple[int, Path]]:
    """(image_id, path) of the reference images, sorted by file name: all images of the json, or the first ``n_ref``
    in the seeded order.  A listed file that is missing is an error naming it (a wrong ``images_dir``)."""
    root = Path(images_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"COCO images directory not found: {root}")
    ids = coco.seeded_order(seed)
    if n_ref is not None:
        if not 2 <= n_ref <= len(ids):
            raise ValueError(f"n_ref={n_ref}: {coco.path} lists {len(ids)} images (n_ref must be 2..{len(ids)})")
        ids = ids[:n_ref]
    out = sorted(((i, root / coco.files[i]) for i in ids), key=lambda t: t[1].name)
    missing = [p for _, p in out if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(out)} reference images listed in {coco.path} are not under "
            f"{root} (first: {missing[0]})"
        )
    return out


def file_list_digest(paths) -> str:
    """sha256 over the sorted ``name<TAB>byte size`` lines of ``paths`` (a renamed, added, removed or resized file
    changes it; identical lists in two folders give the same digest)."""
    lines = sorted(f"{Path(p).name}\t{os.path.getsize(p)}" for p in paths)
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


def file_sha256(path: str | os.PathLike | None, *, chunk: int = 1 << 22) -> str | None:
    """The sha256 of a file's bytes (None for None).  A directory (a sharded checkpoint) is identified by the sha256
    of its files' relative paths and sizes and of the bytes of its small files (its index and metadata: they hold the
    step and the tensors' layout), without reading the shards."""
    if path is None:
        return None
    h = hashlib.sha256()
    if os.path.isdir(path):
        for f in sorted(p for p in Path(path).rglob("*") if p.is_file()):
            size = f.stat().st_size
            h.update(f"{f.relative_to(path).as_posix()}\0{size}\0".encode())
            if size <= chunk:
                h.update(f.read_bytes())
        return h.hexdigest()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_jsonl_atomic(path: str | os.PathLike, rows: list[dict]) -> Path:
    """One JSON object a line, written atomically; an identical existing file is left alone (its mtime too)."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    path = Path(path)
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return path
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


class ReferenceCache:
    """Reference statistics in ``directory/<key>.npz`` (see the module docstring); ``hits`` / ``misses`` count."""

    ARRAYS = ("ids", "features", "mu", "sigma", "radii")

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.hits = self.misses = 0

    @staticmethod
    def key(*, files_digest: str, identity: dict) -> str:
        blob = json.dumps({"files": files_digest, **identity}, sort_keys=True)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.npz"

    def load(self, key: str) -> dict | None:
        """The cached arrays (numpy) and ``meta`` (dict), or None when absent or unreadable (then recomputed)."""
        path = self.path(key)
        if not path.is_file():
            self.misses += 1
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                out = {k: z[k] for k in self.ARRAYS}
                out["meta"] = json.loads(str(z["meta"]))
        except Exception:  # a damaged cache file is recomputed and overwritten, never trusted
            self.misses += 1
            return None
        self.hits += 1
        return out

    def save(self, key: str, arrays: dict[str, np.ndarray], meta: dict) -> Path:
        buf = io.BytesIO()
        meta_json = np.array(json.dumps(meta, sort_keys=True))
        np.savez(buf, **{k: np.asarray(arrays[k]) for k in self.ARRAYS}, meta=meta_json)
        with atomic_write(self.path(key)) as f:
            f.write(buf.getvalue())
        return self.path(key)
