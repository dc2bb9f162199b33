"""Running a stage: its commands as subprocesses (SIGTERM passed on), the account of each attempt (wall and CPU
time, kept current in STARTED.json so that a kill -9 loses little of it), and moving old outputs aside."""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from dalle2.io import write_json_atomic
from dalle2.train_all.commands import Stage, shell_join

_live: set[int] = set()  # pids of the stage commands running now (their CPU time is not in RUSAGE_CHILDREN yet)


class StageFailed(SystemExit):
    """A stage command exited with a non-zero status (``returncode``; negative: killed by that signal)."""

    def __init__(self, message: str, returncode: int):
        super().__init__(message)
        self.returncode = returncode


def children_cpu_s() -> float:
    """CPU seconds (user + system) of the finished subprocesses so far: a load-independent cost of a stage."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def process_tree_cpu_s(pid: int) -> float:
    """CPU seconds of a running process and its descendants so far (Linux ``/proc``; 0 where it cannot be read)."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    total, todo, seen = 0.0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            # utime, stime, and the reaped children's cutime, cstime (fields 14-17 of proc(5))
            total += sum(int(x) for x in fields[11:15]) / tick
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError, IndexError):
            continue
    return total


def _parent_death_signal():
    """A ``preexec_fn`` that makes the child get SIGTERM when train_all dies (Linux ``PR_SET_PDEATHSIG``), so a
    ``kill -9`` of train_all leaves no orphaned stage training on in the background: the stage saves its last.ckpt
    (SIGTERM is its preemption signal) and exits, and a rerun resumes it. None where unsupported."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here, in the parent, not after the fork
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # train_all died between fork and prctl
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def cmdline(pid: int) -> str | None:
    """The command line of a live process on this machine (Linux ``/proc``), None when it is not running."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return None


def still_running(marker: dict | None) -> list[int]:
    """Pids of a stage's commands that an attempt recorded as running and that still run on this machine with the
    same command line (a train_all killed where the parent-death signal does not exist, or a second train_all
    on the same out_dir): rerunning now would start a second trainer in the same folder."""
    if not marker or not marker.get("attempts"):
        return []
    last = marker["attempts"][-1]
    if last.get("ended") != "running" or last.get("host") != socket.gethostname():
        return []
    return [int(p) for p, cmd in (last.get("pids") or {}).items() if cmd and cmdline(int(p)) == cmd]


def running_elsewhere(marker: dict | None, *, now: float | None = None) -> tuple[str, float] | None:
    """``(host, seconds since its last heartbeat)`` when a stage's last attempt runs on another machine that shares
    this disk (a SLURM job's node, seen from a login node): recorded as running there, with a heartbeat younger than
    three heartbeat periods (+10 s). Its pids mean nothing here, so the heartbeat is the only sign of life; None when
    it is stale (that train_all died) or was not recorded."""
    if not marker or not marker.get("attempts"):
        return None
    last = marker["attempts"][-1]
    host, beat, every = last.get("host"), last.get("beat"), last.get("every_s")
    if last.get("ended") != "running" or not host or host == socket.gethostname():
        return None
    if not isinstance(beat, (int, float)) or not isinstance(every, (int, float)) or every <= 0:
        return None
    age = (time.time() if now is None else now) - beat
    return (str(host), age) if age < 3 * every + 10 else None


def run_commands(stage: Stage, *, cwd: Path) -> None:
    """Run the stage's commands one after another (printed first); a failing one ends train_all naming the stage.
    Each command dies with train_all (SIGTERM on Linux; see :func:`_parent_death_signal`)."""
    for argv in stage.commands:
        print(f"[train_all] {stage.name}: {shell_join(argv)}", flush=True)
        proc = subprocess.Popen(argv, cwd=cwd, preexec_fn=_parent_death_signal())
        _live.add(proc.pid)
        # SIGTERM (a scheduler's preemption) goes on to the stage, which saves last.ckpt; a rerun resumes it.
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: proc.send_signal(signum))
        try:
            rc = proc.wait()
        finally:
            signal.signal(signal.SIGTERM, previous)
            _live.discard(proc.pid)
        if rc != 0:
            raise StageFailed(
                f"[train_all] stage {stage.name} failed (exit status {rc}); fix it and rerun the same "
                "command: finished stages are skipped",
                rc,
            )


def earlier_attempts(marker: dict | None) -> list[dict]:
    """The attempts a stage's marker recorded; one still ``running`` there was killed with train_all (its account
    is what the last heartbeat wrote). A DONE.json from before attempts were recorded counts as one attempt."""
    if not marker:
        return []
    if "attempts" not in marker:
        if marker.get("wall_s") is None:
            return []
        return [{"wall_s": marker["wall_s"], "cpu_s": marker.get("cpu_s"), "ended": "finished"}]
    out = []
    for a in marker["attempts"]:
        a = dict(a)
        if a.get("ended") == "running":
            a["ended"] = "killed"
        out.append(a)
    return out


def total(attempts: list[dict], key: str) -> float | None:
    values = [a.get(key) for a in attempts]
    return round(sum(v for v in values if v is not None), 2) if any(v is not None for v in values) else None


class Attempt:
    """One attempt at a stage, accounted in its ``STARTED.json``: the attempt (start, wall and CPU time so far,
    how it ended) is appended to ``marker["attempts"]`` and written at the start, every ``every_s`` seconds while
    the stage runs (a heartbeat: a kill -9 of train_all loses at most that much of the account) and at the end,
    however it ends. CPU time: the finished subprocesses' (rusage) plus the running ones' (``/proc``)."""

    def __init__(self, path: Path, marker: dict, *, every_s: float = 30.0):
        self.path, self.marker, self.every_s = Path(path), marker, float(every_s)
        self.record = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "wall_s": 0.0, "cpu_s": 0.0, "ended": "running"}
        marker.setdefault("attempts", []).append(self.record)
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._thread = threading.Thread(target=self._beat, name="train_all-heartbeat", daemon=True)

    def __enter__(self) -> Attempt:
        self._t0, self._cpu0 = time.time(), children_cpu_s()
        self.write()
        if self.every_s > 0:
            self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.write()
            except OSError as e:  # a full disk must not kill the stage; the final write will say so
                print(f"[train_all] could not update {self.path}: {e}", flush=True)

    def write(self, ended: str | None = None) -> None:
        with self._lock:
            pids = sorted(_live)
            live = sum(process_tree_cpu_s(pid) for pid in pids)
            self.record["host"] = socket.gethostname()
            self.record["beat"], self.record["every_s"] = round(time.time(), 2), self.every_s  # see running_elsewhere
            self.record["pids"] = {str(p): cmdline(p) for p in pids}
            self.record["wall_s"] = round(time.time() - self._t0, 2)
            self.record["cpu_s"] = round(children_cpu_s() - self._cpu0 + live, 2)
            if ended is not None:
                self.record["ended"] = ended
            write_json_atomic(self.path, self.marker)

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if exc_type is None:
            ended = "finished"
        elif isinstance(exc, StageFailed):
            ended = f"failed (exit status {exc.returncode})"
        elif isinstance(exc, KeyboardInterrupt):
            ended = "interrupted"
        else:
            ended = f"failed ({exc_type.__name__})"
        self.write(ended)
        return False


def move_aside(d: Path) -> Path:
    """Rename ``out_dir/<stage>`` to ``out_dir/<stage>.old-<time>`` (never delete: it may hold checkpoints)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = d.with_name(f"{d.name}.old-{stamp}")
    n = 1
    while target.exists():
        target, n = d.with_name(f"{d.name}.old-{stamp}-{n}"), n + 1
    d.rename(target)
    return target
