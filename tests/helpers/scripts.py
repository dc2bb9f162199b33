"""Entry-point scripts (train/*.py, eval/*.py are not packages) loaded as modules, and train_all configs composed
as the command line would."""

from __future__ import annotations

import importlib.util
import sys

from helpers.tiny_runs import REPO_ROOT


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
