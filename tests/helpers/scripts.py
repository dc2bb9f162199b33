"""Run the repository's entry points (``train/train.py``, ``eval/sample.py`` ...) as subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_script(script: str, *args: str, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python <script> args...`` (or ``script="-m module"``) from the repository root with one thread and wandb
    offline; ``env`` entries are added to this process's environment.  stdout and stderr are captured."""
    full_env = {**os.environ, "PYTHONPATH": REPO_ROOT, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
                "PYTHONWARNINGS": "ignore", **(env or {})}  # fmt: skip
    cmd = [sys.executable, *(script.split() if script.startswith("-m ") else [script]), *args]
    return subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, env=full_env)
