"""What to do with each stage — skip it, resume it, run it (afresh), or refuse — decided for every stage before
anything runs, with the reason, so that a run that would stop at its fifth stage stops before its first.

A stage is done (skipped) only when its settings are the ones asked for and what it consumed is still there: its
DONE.json records the sha256 of every upstream output it read (:data:`~dalle2.train_all.identity.OUTPUTS`), so a
stage whose upstream was retrained since — in this run or an earlier one, or a given checkpoint that changed on
disk — runs again (its old outputs moved aside), never "skipped"."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dalle2.train_all import STAGES, TRAINED
from dalle2.train_all.identity import (
    EXTENDS,
    OUTPUTS,
    describe,
    differences,
    fingerprint,
    identity,
    made_by_train_all,
    path_fingerprint,
    read_marker,
    recorded_identity,
    resumable,
)
from dalle2.train_all.runner import running_elsewhere, still_running

RUNS = ("run", "resume")  # actions that change a stage's outputs


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


@dataclass
class Decision:
    """What to do with one stage: ``action`` is ``"given"`` (a checkpoint given instead), ``"skip"``, ``"run"``
    (from the start; ``move_aside``: the stage dir holds an old run of ours, renamed first), ``"resume"`` (continue
    the run in its dir) or ``"refuse"`` (``message`` says why and what to do)."""

    stage: str
    action: str
    reason: str
    move_aside: bool = False
    message: str = ""


def refusal(name: str, d: Path, state: str, diff: dict) -> str:
    return (
        f"[train_all] {name}: {d} holds {'an' if state[0] in 'aeiou' else 'a'} {state} run made with other settings, "
        "which a resume cannot carry over "
        f"({describe(diff)}). Nothing was changed. To redo the stage with the new settings use force=[{name}] "
        f"(the old outputs move to {d.name}.old-<time>/, nothing is deleted), or choose another out_dir."
    )


class Upstream:
    """The current identity (sha256) of each stage's outputs: a given checkpoint's, the one its DONE.json recorded,
    or, for a stage recorded without one (or unfinished), what is on disk now. Each is read once, until
    :meth:`forget` (the stage ran)."""

    def __init__(self, dirs: dict[str, Path], given: dict[str, str]):
        self.dirs, self.given, self._cache = dirs, given, {}

    def current(self, stage: str) -> str | None:
        if stage not in self._cache:
            if stage in self.given:
                value = path_fingerprint(self.given[stage])
            else:
                done = read_marker(self.dirs[stage] / "DONE.json") or {}
                value = done.get("fingerprint") or fingerprint(self.dirs[stage], OUTPUTS[stage])
            self._cache[stage] = value
        return self._cache[stage]

    def finished(self, stage: str) -> str | None:
        """When a stage's DONE.json says it finished (``%Y-%m-%d %H:%M:%S``), None when not done or given."""
        if stage in self.given:
            return None
        return (read_marker(self.dirs[stage] / "DONE.json") or {}).get("finished")

    def inputs(self, uses: tuple[str, ...]) -> dict[str, str | None]:
        """What a stage that reads ``uses`` consumes now, to record in its markers."""
        return {u: self.current(u) for u in uses}

    def forget(self, stage: str) -> None:
        self._cache.pop(stage, None)


def changed_inputs(uses: tuple[str, ...], marker: dict, *, done: bool, upstream: Upstream) -> list[str]:
    """The upstream stages whose outputs differ from what the run recorded in ``marker`` consumed. A marker written
    before inputs were recorded is compared by time: an upstream that finished after this stage did is newer."""
    recorded = marker.get("inputs")
    changed = []
    for u in uses:
        if recorded is None:
            when = upstream.finished(u)
            if done and when and str(when) > str(marker.get("finished", "")):
                changed.append(u)
            continue
        now = upstream.current(u)
        if now is not None and recorded.get(u) != now:
            changed.append(u)
    return changed


def plan_stages(
    stages: list[str],
    *,
    dirs: dict[str, Path],
    commands: dict[str, list[list[str]]],
    uses: dict[str, tuple[str, ...]],
    given: dict[str, str],
    force: set[str],
    resume: bool,
    out_dir: Path,
    upstream: Upstream | None = None,
) -> list[Decision]:
    """A :class:`Decision` for every stage of ``stages`` (in order), touching nothing. ``dirs`` and ``uses`` cover
    every stage (``uses[s]``: the stages whose outputs ``s`` reads). A stage whose upstream runs in this plan, or
    changed since the stage was made, runs again; a stage that would run on an upstream left out of ``stages``
    that is itself out of date (made from an older one) is refused."""
    upstream = upstream or Upstream(dirs, given)
    decisions: list[Decision] = []
    changing: set[str] = set()
    listed = set(stages)
    out_of_date: dict[str, list[str]] = {}

    def behind(u: str) -> list[str]:
        """Why a stage that is not listed (so not remade in this run) is older than what it was made from."""
        if u not in out_of_date:
            out_of_date[u] = []
            done = read_marker(dirs[u] / "DONE.json") if u not in given else None
            if done is not None:
                ups = uses.get(u, ())
                why = [w for w in ups if w in changing]
                why += changed_inputs(ups, done, done=True, upstream=upstream)
                why += [w for w in ups if w not in listed and w not in given and behind(w)]
                out_of_date[u] = sorted(set(why), key=STAGES.index)
        return out_of_date[u]

    for name in stages:
        decision = _decide(
            name,
            dirs[name],
            commands.get(name, []),
            uses=uses.get(name, ()),
            given=given,
            forced=name in force,
            resume=resume,
            out_dir=out_dir,
            changing=changing,
            upstream=upstream,
        )
        if decision.action in RUNS:  # it would read an unlisted upstream that is itself out of date: stop first
            stale = {u: behind(u) for u in uses.get(name, ()) if u not in listed and u not in given and behind(u)}
            if stale:
                what = "; ".join(f"{u} is older than {', '.join(why)}" for u, why in stale.items())
                message = (
                    f"[train_all] {name}: would read {', '.join(stale)}, which {'is' if len(stale) == 1 else 'are'} "
                    f"not in stages= and out of date ({what}). Nothing was changed. Add "
                    f"{', '.join(stale)} to stages= so that {'it is' if len(stale) == 1 else 'they are'} remade first."
                )
                decision = Decision(name, "refuse", f"reads out-of-date {', '.join(stale)}", message=message)
        if decision.action in RUNS:
            changing.add(name)
        decisions.append(decision)
    return decisions


def _decide(name, d, commands, *, uses, given, forced, resume, out_dir, changing, upstream) -> Decision:
    if name in given:
        return Decision(name, "given", f"ckpt.{name}={given[name]}")
    if not d.exists() or not any(d.iterdir()):
        return Decision(name, "run", "not done yet")
    if not made_by_train_all(d):
        message = (
            f"[train_all] {name}: {d} exists and was not made by train_all (no DONE.json/STARTED.json); "
            "nothing was changed. Move it away or choose another out_dir."
        )
        return Decision(name, "refuse", "not made by train_all", message=message)
    done, started = read_marker(d / "DONE.json"), read_marker(d / "STARTED.json")
    alive = still_running(started) if done is None else []
    if alive:
        message = (
            f"[train_all] {name}: still running in {d} (pid {', '.join(map(str, alive))}; left by a train_all that "
            "was killed, or another train_all on this out_dir). Nothing was changed. Wait for it to end, or stop "
            f"it (kill {' '.join(map(str, alive))}: it saves last.ckpt) and rerun to resume it."
        )
        return Decision(name, "refuse", f"still running (pid {', '.join(map(str, alive))})", message=message)
    elsewhere = running_elsewhere(started) if done is None else None
    if elsewhere:
        host, age = elsewhere
        message = (
            f"[train_all] {name}: still running in {d} on {host} (its train_all's heartbeat {age:.0f} s ago). "
            "Nothing was changed. Wait for it to end, or stop that train_all (its stage saves last.ckpt) and rerun "
            "to resume it."
        )
        return Decision(name, "refuse", f"still running on {host}", message=message)
    if forced:
        return Decision(name, "run", "forced", move_aside=True)
    runs_first = [u for u in uses if u in changing]
    if runs_first:
        verb = "runs" if len(runs_first) == 1 else "run"
        return Decision(name, "run", f"{', '.join(runs_first)} {verb} first", move_aside=True)
    marker = done or started
    changed = changed_inputs(uses, marker, done=done is not None, upstream=upstream)
    if changed:
        since = "this stage was made" if done is not None else "this run started"
        return Decision(name, "run", f"{', '.join(changed)} changed since {since}", move_aside=True)
    new = identity(commands, out_dir)
    if done is not None:
        diff = differences(recorded_identity(done), new)
        if not diff:
            return Decision(name, "skip", f"done ({float(done.get('wall_s') or 0):.0f} s), same settings and inputs")
        if not resumable(name, diff):
            return Decision(name, "refuse", "other settings", message=refusal(name, d, "finished", diff))
        if name in TRAINED and any(EXTENDS.match(k) for k in diff):
            return Decision(name, "resume", f"finished; continuing it with {describe(diff)}")
        return Decision(name, "skip", f"done; kept ({describe(diff)} does not change a finished run)")
    if not resume:
        return Decision(name, "run", "unfinished, resume=false", move_aside=True)
    diff = differences(recorded_identity(started), new)
    if diff and not resumable(name, diff):
        return Decision(name, "refuse", "other settings", message=refusal(name, d, "unfinished", diff))
    if name in (*TRAINED, "embeddings"):
        return Decision(name, "resume", "unfinished; resuming" + (f" with {describe(diff)}" if diff else ""))
    return Decision(name, "run", "unfinished; running it again", move_aside=bool(diff))


def format_plan(decisions: list[Decision], out_dir: Path) -> str:
    """One line per stage: ``[train_all]   <stage> <action> <reason>``."""
    lines = [f"[train_all] plan for {out_dir}:"]
    for dec in decisions:
        lines.append(f"[train_all]   {dec.stage:<11} {dec.action:<7} {dec.reason}")
    return "\n".join(lines)


def refusals(decisions: list[Decision]) -> SystemExit | None:
    """One error naming every refused stage (None when the plan can run)."""
    refused = [d.message for d in decisions if d.action == "refuse"]
    if not refused:
        return None
    head = "[train_all] nothing was run: " + (
        "one stage refuses" if len(refused) == 1 else f"{len(refused)} stages refuse"
    )
    return SystemExit("\n".join([head, *refused]))
