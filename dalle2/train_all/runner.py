"""Running a stage: its commands as subprocesses (SIGTERM passed on), their CPU time, and moving old outputs aside."""

from __future__ import annotations

import resource
import signal
import subprocess
import time
from pathlib import Path

from dalle2.train_all.commands import Stage, shell_join


def children_cpu_s() -> float:
    """CPU seconds (user + system) of the finished subprocesses so far: a load-independent cost of a stage."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_commands(stage: Stage, *, cwd: Path) -> None:
    """Run the stage's commands one after another (printed first); a failing one ends train_all naming the stage."""
    for argv in stage.commands:
        print(f"[train_all] {stage.name}: {shell_join(argv)}", flush=True)
        proc = subprocess.Popen(argv, cwd=cwd)
        # SIGTERM (a scheduler's preemption) goes on to the stage, which saves last.ckpt; a rerun resumes it.
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: proc.send_signal(signum))
        try:
            rc = proc.wait()
        finally:
            signal.signal(signal.SIGTERM, previous)
        if rc != 0:
            raise SystemExit(
                f"[train_all] stage {stage.name} failed (exit status {rc}); fix it and rerun the same "
                "command: finished stages are skipped"
            )


def move_aside(d: Path) -> Path:
    """Rename ``out_dir/<stage>`` to ``out_dir/<stage>.old-<time>`` (never delete: it may hold checkpoints)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = d.with_name(f"{d.name}.old-{stamp}")
    n = 1
    while target.exists():
        target, n = d.with_name(f"{d.name}.old-{stamp}-{n}"), n + 1
    d.rename(target)
    return target
