"""The repository's entry points (``train/*.py``, ``eval/*.py``: not packages) run as subprocesses or loaded as
modules, and train_all configs composed as the command line would."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

from helpers.tiny_runs import REPO_ROOT, run


def run_script(script: str, *args: str, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python <script> args...`` (or ``script="-m module"``) from the repository root with one thread and wandb
    offline; ``env`` entries are added to this process's environment.  stdout and stderr are captured; a run past
    ``timeout`` is killed with its process group and comes back with returncode -9 (see ``tiny_runs.run``)."""
    full_env = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "offline",
        "PYTHONWARNINGS": "ignore",
        **(env or {}),
    }
    cmd = [sys.executable, *(script.split() if script.startswith("-m ") else [script]), *args]
    return run(cmd, timeout=timeout, env=full_env)


def load_script(folder: str, name: str):
    """``<folder>/<name>.py`` as a module (by path: ``train/train.py`` would shadow other names)."""
    spec = importlib.util.spec_from_file_location(f"_dalle2_script_{folder}_{name}", REPO_ROOT / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def compose_train_all(overrides: list[str]):
    """The train_all config for command-line ``overrides`` (stage overrides rewritten as train_all's main does)."""
    from hydra import compose, initialize_config_dir

    train_all = load_script("train", "train_all")
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf" / "train_all"), version_base="1.3"):
        return compose("config", overrides=train_all.stage_override_argv(overrides))


def compose_conf(name: str, overrides: list[str]):
    """``conf/<name>.yaml`` composed as its entry point's command line would (defaults list included), without the
    ``hydra`` node, for calling the script's ``run(cfg)`` in this process."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        cfg = compose(name, overrides=overrides)
    with open_dict(cfg):
        cfg.pop("hydra", None)
    return cfg
