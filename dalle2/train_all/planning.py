"""What to do with each stage: skip it, resume it, run it afresh, or refuse (before anything is touched)."""

from __future__ import annotations

from pathlib import Path

from dalle2.train_all import STAGES, TRAINED
from dalle2.train_all.identity import (
    EXTENDS,
    describe,
    differences,
    identity,
    made_by_train_all,
    read_marker,
    resumable,
)


def forced_stages(force) -> set[str]:
    if force is True:
        return set(STAGES)
    if not force:
        return set()
    if isinstance(force, str):
        force = [force]
    unknown = [s for s in force if s not in STAGES]
    if unknown:
        raise SystemExit(f"force names unknown stages {unknown}; expected some of {list(STAGES)}")
    return set(force)


def refuse(name: str, d: Path, state: str, diff: dict) -> SystemExit:
    return SystemExit(
        f"[train_all] {name}: {d} holds {'an' if state[0] in 'aeiou' else 'a'} {state} run made with other settings, "
        "which a resume cannot carry over "
        f"({describe(diff)}). Nothing was changed. To redo the stage with the new settings use force=[{name}] "
        f"(the old outputs move to {d.name}.old-<time>/, nothing is deleted), or choose another out_dir."
    )


def plan_stage(
    name: str, d: Path, commands: list[list[str]], *, forced: bool, stale: list[str], resume: bool = True
) -> str:
    """What to do with one stage whose run dir is ``d`` and whose commands are ``commands``: ``"skip"``,
    ``"resume"`` (continue the run in its dir), ``"fresh"`` (start in an empty dir; an old one is moved aside
    first), ``"rerun"``. Raises ``SystemExit`` — before anything is touched — when the dir is not train_all's, or
    holds a run whose settings differ in a way a resume cannot carry over."""
    if not d.exists() or not any(d.iterdir()):
        return "fresh"
    if not made_by_train_all(d):
        raise SystemExit(
            f"[train_all] {name}: {d} exists and was not made by train_all (no DONE.json/STARTED.json); "
            "nothing was changed. Move it away or choose another out_dir."
        )
    if forced or stale:
        return "fresh"
    new = identity(commands)
    done, started = read_marker(d / "DONE.json"), read_marker(d / "STARTED.json")
    if done is not None:
        diff = differences(identity(done["commands"]), new)
        if not diff:
            return "skip"
        if not resumable(name, diff):
            raise refuse(name, d, "finished", diff)
        if name in TRAINED and any(EXTENDS.match(k) for k in diff):
            print(f"[train_all] {name}: finished before; continuing it with {describe(diff)}", flush=True)
            return "resume"
        print(f"[train_all] {name}: finished before; kept ({describe(diff)} does not change a finished run)")
        return "skip"
    if not resume:
        return "fresh"
    diff = differences(identity(started["commands"]), new) if started is not None else {}
    if diff and not resumable(name, diff):
        raise refuse(name, d, "unfinished", diff)
    if name in (*TRAINED, "embeddings"):
        return "resume"
    return "fresh" if diff else "rerun"
