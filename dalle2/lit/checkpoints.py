"""Stage-checked checkpoint loading: a checkpoint of the wrong stage gives one clear error."""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

STAGE_KEY = "dalle2_stage"
STAGE_CLASSES = {
    "clip": "dalle2.lit.clip_module:CLIPModule",
    "prior": "dalle2.lit.prior_module:PriorModule",
    "decoder": "dalle2.lit.decoder_module:DecoderModule",
    "upsampler": "dalle2.lit.decoder_module:UpsamplerModule",
}


class WrongStageError(ValueError):
    pass


def checkpoint_stage(path: str | Path) -> str | None:
    """The stage a Lightning ``.ckpt`` of ours was written by (None when it is not one of ours)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    return ckpt.get(STAGE_KEY) if isinstance(ckpt, dict) else None


def load_stage_module(path: str | Path, stage: str, *, map_location="cpu"):
    """``<StageModule>.load_from_checkpoint(path)`` after checking the checkpoint was written by ``stage``."""
    if stage not in STAGE_CLASSES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {sorted(STAGE_CLASSES)}")
    found = checkpoint_stage(path)
    if found != stage:
        what = f"a {found!r} checkpoint" if found else "not a dalle2 Lightning checkpoint"
        raise WrongStageError(f"{path} is {what}, but a {stage!r} checkpoint was expected")
    mod_name, cls_name = STAGE_CLASSES[stage].split(":")
    cls = getattr(importlib.import_module(mod_name), cls_name)
    return cls.load_from_checkpoint(str(path), map_location=map_location, weights_only=False)


class RunDirInUseError(RuntimeError):
    """A new run was started in a run directory that already holds checkpoints."""


def checkpoint_step(path: str | Path) -> int | None:
    """The ``global_step`` stored in a Lightning checkpoint (read with ``weights_only=True`` and mmap: no code
    runs, no tensor is copied); None when the file cannot be read as one."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # truncated, foreign, or needing globals we do not allow: not a candidate
        return None
    step = ckpt.get("global_step") if isinstance(ckpt, dict) else None
    return int(step) if isinstance(step, int) else None


def run_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``(global_step, path)`` of the checkpoints a run left in ``run_dir``, newest first: ``checkpoints/last*.ckpt``,
    ``checkpoints/step_*.ckpt`` and Lightning's SLURM ``hpc_ckpt_*.ckpt`` (in the run dir itself); unreadable
    files are left out. Ties keep ``last.ckpt`` first."""
    run_dir = Path(run_dir)
    names = ("last*.ckpt", "step_*.ckpt", "*.ckpt")
    files = dict.fromkeys(p for pattern in names for p in sorted((run_dir / "checkpoints").glob(pattern)))
    files.update(dict.fromkeys(sorted(run_dir.glob("hpc_ckpt_*.ckpt"))))
    found = [(step, p) for p in files if p.is_file() and (step := checkpoint_step(p)) is not None]
    return sorted(found, key=lambda sp: -sp[0])  # stable: last.ckpt first among equal steps


def resolve_ckpt_path(ckpt_path: str | None, output_dir: str | Path) -> str | None:
    """What ``trainer.fit(ckpt_path=...)`` should get for the ``ckpt_path`` config value.

    * ``None`` / ``""``: start from scratch — in a fresh run dir only: when ``output_dir`` already holds
      checkpoints, :class:`RunDirInUseError` says so (Lightning would quietly write ``last-v1.ckpt`` beside the
      old ``last.ckpt``, which a later ``ckpt_path=last`` would then resume).
    * ``"last"``: the newest checkpoint of ``output_dir`` by global step (``last.ckpt``, ``step_*.ckpt``,
      ``hpc_ckpt_*.ckpt``), else from scratch (so one command line works for the first launch and every requeue;
      pin the run dir with ``hydra.run.dir=...``).
    * a run directory: its newest checkpoint likewise;  a file: that file (``FileNotFoundError`` when missing).
    """
    if ckpt_path in (None, "", "null", "none"):
        existing = run_checkpoints(output_dir)
        if existing:
            step, path = existing[0]
            raise RunDirInUseError(
                f"{output_dir} already holds checkpoints (newest: {path}, step {step}); continue that run with "
                "ckpt_path=last, or start a new one in another directory (hydra.run.dir=...)"
            )
        return None
    if ckpt_path == "last":
        existing = run_checkpoints(output_dir)
        if existing:
            return str(existing[0][1])
        print(f"[dalle2] ckpt_path=last: no checkpoint in {output_dir} yet, starting from scratch")
        return None
    path = Path(ckpt_path)
    if path.is_dir():
        given_checkpoints_dir = path.name == "checkpoints" and not (path / "checkpoints").is_dir()
        existing = run_checkpoints(path.parent if given_checkpoints_dir else path)
        if existing:
            return str(existing[0][1])
        raise FileNotFoundError(f"ckpt_path={ckpt_path!r}: a directory without checkpoints (checkpoints/last.ckpt, ...)")
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path!r}: no such checkpoint")
    return str(path)
