"""Refuse before anything runs when a stage would train on pictures smaller than its resolution.

train/train.py stops at once on such data (:func:`dalle2.data.resolution.check_config_resolution`); train_all asks
the same question of every stage it is about to train while it plans, so that a 256 px upsampler on 64 px shards
stops the run before the CLIP's hours, not after.  Each stage's command line is composed the way train.py composes
it (Hydra's compose API, in one child process so that train_all's own Hydra app is left alone)."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

__all__ = ["resolution_errors"]


def resolution_errors(commands: dict[str, list[str]], conf_dir: Path, *, timeout: float = 300.0) -> dict[str, str]:
    """``{stage: error}`` for the stages (name -> train/train.py argv) whose pictures are too small.

    A command line that does not compose here is left to the stage itself (it fails with Hydra's own message)."""
    if not commands:
        return {}
    request = {"conf_dir": str(conf_dir), "stages": {s: [a for a in argv[2:]] for s, argv in commands.items()}}
    proc = subprocess.run(
        [sys.executable, "-m", "dalle2.train_all.resolution"],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        warnings.warn(f"train_all: the resolution check could not run ({proc.stderr.strip()[-500:]})", stacklevel=2)
        return {}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _main() -> None:
    from hydra import compose, initialize_config_dir

    from dalle2.data.resolution import ResolutionError, check_config_resolution

    request = json.loads(sys.stdin.read())
    errors: dict[str, str] = {}
    with initialize_config_dir(config_dir=request["conf_dir"], version_base="1.3"):
        for stage, args in request["stages"].items():
            overrides = [a for a in args if not a.startswith(("hydra.", "+hydra."))]
            try:
                cfg = compose(config_name="config", overrides=overrides)
            except Exception:  # noqa: BLE001 - the stage reports its own composition error
                continue
            try:
                check_config_resolution(cfg)
            except ResolutionError as exn:
                errors[stage] = str(exn)
    print(json.dumps(errors))


if __name__ == "__main__":
    _main()
