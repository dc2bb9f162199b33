"""Builders for tiny shards in tests: a picklable stand-in tokenizer, PNG bytes, tars from (name, bytes) members,
and a stand-in executable on PATH (for ``pipe:`` / object-store commands)."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

import torch
from PIL import Image


class StandInTokenizer:
    """Picklable word-hash tokenizer with the real tokenizer's call signature."""

    def __call__(self, texts, context_length=77):
        out = torch.zeros(len(texts), context_length, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = [sum(map(ord, w)) % 997 + 1 for w in t.split()][:context_length]
            out[i, : len(ids)] = torch.tensor(ids)
        return out


TOK = StandInTokenizer()


def png(color=(255, 0, 0), size=(40, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def write_tar(path, members) -> str:
    """A tar at ``path`` holding ``members``: (name, bytes) pairs, in order."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def tar_keys(path) -> set[str]:
    """The sample keys (member names up to the first dot) of a local tar."""
    with tarfile.open(path) as tar:
        return {os.path.basename(m.name).split(".", 1)[0] for m in tar if m.isfile()}


def fake_command(bin_dir, name: str, script: str) -> str:
    """Write an executable ``bin_dir/name`` running ``script`` (sh); put ``bin_dir`` first on PATH to use it."""
    Path(bin_dir).mkdir(parents=True, exist_ok=True)
    path = Path(bin_dir) / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return str(path)
