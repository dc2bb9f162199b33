"""Atomic file writes: a file is either its old content or its new content, never a partial one.

``with atomic_write(path) as f: f.write(...)`` writes to a temp file beside ``path`` (same filesystem), fsyncs
it, renames it over ``path`` and fsyncs the directory; if anything fails on the way, the temp file is removed
and ``path`` is untouched. Used for checkpoints, run markers, manifests and embedding shards.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write", "write_json_atomic", "temp_path"]


def temp_path(path: str | os.PathLike) -> str:
    """The temp file ``atomic_write`` uses for ``path``: hidden, beside it, unique per process."""
    path = os.fspath(path)
    head, name = os.path.split(path)
    return os.path.join(head, f".{name}.tmp-{os.getpid()}")


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", **open_kwargs: Any) -> Iterator[IO]:
    """Open a temp file for writing; on a clean exit it replaces ``path`` durably, on an exception it is removed."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _fsync_dir(directory)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """``json.dump(obj)`` (indented, newline-terminated) to ``path`` atomically."""
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(obj, indent=2) + "\n")
    return Path(path)
