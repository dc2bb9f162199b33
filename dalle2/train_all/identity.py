"""What a stage's run is, to tell a resume from another experiment: its script and overrides (the interpreter, the
checkout and where out_dir lies left out), what it consumed and made (sha256 of checkpoints and outputs), and the
markers train_all leaves in a stage's dir (STARTED.json, DONE.json)."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from dalle2.results import sha256_file
from dalle2.sweep import override_pairs
from dalle2.train_all import TRAINED

# Overrides whose change a run can be resumed across (how long, how often to validate/save/log, on how many devices);
# any other difference means another experiment, which a resume would silently mix with the first.
RESUMABLE = re.compile(
    r"^(trainer\.(max_steps|max_epochs|max_time|val_check_interval|check_val_every_n_epoch|limit_val_batches"
    r"|log_every_n_steps|devices|num_nodes|accelerator|strategy(\..+)?|enable_progress_bar|num_sanity_val_steps)"
    r"|trainer|logger(\..+)?|tags|callbacks\.model_checkpoint\.(every_n_train_steps|keep_last)"
    r"|callbacks\.(lr_monitor|throughput|skipped_samples|sample_grid)\..+|module\.sample_every_n_steps"
    r"|data\.(num_workers|prefetch_factor|val_batch_size|pin_memory|persistent_workers))$"
)
STAGE_RESUMABLE = {"embeddings": re.compile(r"^data\.batch_size$")}  # shards already written stay valid
EXTENDS = re.compile(r"^trainer\.(max_steps|max_epochs|max_time)$")  # a finished run continues when these change


OUT_DIR = "${out_dir}"  # how a path inside out_dir reads in a run's identity


def relative_to_out_dir(value: str, out_dir: str | os.PathLike | None) -> str:
    """Override text with ``out_dir`` (as a path prefix, anywhere in the text: lists, ``::``-joined urls) written
    as ``${out_dir}``, so that a run moved or copied elsewhere keeps its identity."""
    if not out_dir:
        return value
    root = os.path.normpath(os.fspath(out_dir))
    return re.sub(r"(?<![\w.~-])" + re.escape(root) + r"(?=$|[/\\,\]'\":])", lambda m: OUT_DIR, value)


def identity(commands: list[list[str]], out_dir: str | os.PathLike | None = None) -> list[dict]:
    """What a stage's commands mean, independent of the interpreter, of where the checkout lies and of where
    ``out_dir`` lies: per command the script (``train/train.py``) and its overrides as ``{key: value}`` with paths
    inside ``out_dir`` relative to it (``++key`` and ``key`` are one key: runs recorded before stage keys were
    passed as ``++key=value`` compare equal)."""
    out = []
    for argv in commands:
        script = Path(argv[1])
        pairs = {k: relative_to_out_dir(v, out_dir) for k, v in override_pairs(argv[2:]).items()}
        out.append({"script": f"{script.parent.name}/{script.name}", "overrides": pairs})
    return out


def recorded_out_dir(marker: dict) -> str | None:
    """The out_dir a marker was written under: recorded since markers hold it, else read from the stage's
    ``hydra.run.dir=<out_dir>/<stage>`` (every stage command sets it)."""
    if marker.get("out_dir"):
        return str(marker["out_dir"])
    for argv in marker.get("commands") or []:
        run_dir = override_pairs(argv[2:]).get("hydra.run.dir")
        if run_dir:
            return os.path.dirname(os.path.normpath(run_dir))
    return None


def recorded_identity(marker: dict) -> list[dict]:
    """The identity of the commands a marker recorded, paths relative to the out_dir it was written under."""
    return identity(marker["commands"], recorded_out_dir(marker))


def differences(old: list[dict], new: list[dict]) -> dict[str, tuple]:
    """``{key: (old value, new value)}`` over every command (``None`` where a key is absent; a changed script or
    number of commands shows as the key ``<script>``)."""
    if [c["script"] for c in old] != [c["script"] for c in new]:
        return {"<script>": ([c["script"] for c in old], [c["script"] for c in new])}
    diff: dict[str, tuple] = {}
    for a, b in zip(old, new):
        for k in sorted(set(a["overrides"]) | set(b["overrides"])):
            va, vb = a["overrides"].get(k), b["overrides"].get(k)
            if va != vb:
                diff[k] = (va, vb)
    return diff


def resumable(stage: str, diff: dict) -> bool:
    extra = STAGE_RESUMABLE.get(stage)
    return all(RESUMABLE.match(k) or (extra is not None and extra.match(k)) for k in diff)


def describe(diff: dict) -> str:
    return "; ".join(
        f"{k}: {a if a is not None else '(unset)'} -> {b if b is not None else '(unset)'}"
        for k, a, b in ((k, *v) for k, v in diff.items())
    )


def read_marker(path: Path) -> dict | None:
    """A DONE.json / STARTED.json of ours, or None (absent, or unreadable: a crash mid-write of an old version)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "commands" in data else None


def made_by_train_all(d: Path) -> bool:
    return read_marker(d / "STARTED.json") is not None or read_marker(d / "DONE.json") is not None


# ------------------------------------------------------------------------------------------------ fingerprints

# What a stage makes that later stages read (relative to its dir; a folder means every file in it).
OUTPUTS = {
    **{s: ("checkpoints/last.ckpt",) for s in TRAINED},
    "retrieval": ("metrics.json",),
    "embeddings": ("train", "val"),
    "sample": ("manifest.jsonl", "*.png"),
    "evaluate": ("metrics.json",),
}


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():  # hidden files are temp files of a write in progress
        return sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    return []


# A file of a folder's fingerprint larger than this is not read whole (a LAION-scale embedding folder holds hundreds
# of GB): its size, mtime and the sha256 of its first and last MiB stand for it.
WHOLE_FILE_BYTES = 64 << 20
_EDGE = 1 << 20


def file_digest(path: Path) -> str:
    """sha256 of a file up to :data:`WHOLE_FILE_BYTES`; above that ``size:mtime_ns:sha256(first + last MiB)``
    (what a rewrite of a shard changes; a folder's fingerprint then reads at most 2 MiB a file)."""
    st = path.stat()
    if st.st_size <= WHOLE_FILE_BYTES:
        return sha256_file(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(_EDGE))
        f.seek(st.st_size - _EDGE)
        h.update(f.read(_EDGE))
    return f"{st.st_size}:{st.st_mtime_ns}:{h.hexdigest()}"


def fingerprint(root: str | os.PathLike, patterns: tuple[str, ...] | list[str]) -> str | None:
    """The sha256 of what ``patterns`` (paths or globs under ``root``; a folder stands for every file in it) name:
    the file's own sha256 when that is a single file (a checkpoint), else a sha256 over each file's relative path
    and :func:`file_digest`. None when nothing is there. Read once, when a stage finishes or when a given
    checkpoint is used."""
    root = Path(root)
    files: list[Path] = []
    for pattern in patterns:
        for match in sorted(root.glob(pattern)) if any(c in pattern for c in "*?[") else [root / pattern]:
            files += _files(match)
    files = sorted(dict.fromkeys(files))
    if not files:
        return None
    if len(files) == 1 and len(patterns) == 1 and (root / patterns[0]).is_file():
        return sha256_file(files[0])
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relative_to(root).as_posix()}\0{file_digest(f)}\n".encode())
    return h.hexdigest()


def path_fingerprint(path: str | os.PathLike) -> str | None:
    """The sha256 of a checkpoint file, or of every file of a sharded checkpoint directory (None: not there)."""
    path = Path(path)
    return fingerprint(path.parent, (path.name,)) if path.exists() else None
