"""What a stage's run is, to tell a resume from another experiment: its script and overrides (the interpreter and
the checkout left out), and the markers train_all leaves in a stage's dir (STARTED.json, DONE.json)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from dalle2.sweep import override_pairs

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


def identity(commands: list[list[str]]) -> list[dict]:
    """What a stage's commands mean, independent of the interpreter and of where the checkout lies: per command
    the script (``train/train.py``) and its overrides as ``{key: value}`` (``++key`` and ``key`` are one key: runs
    recorded before stage keys were passed as ``++key=value`` compare equal)."""
    out = []
    for argv in commands:
        script = Path(argv[1])
        out.append({"script": f"{script.parent.name}/{script.name}", "overrides": override_pairs(argv[2:])})
    return out


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
