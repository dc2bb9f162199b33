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


def resolve_ckpt_path(ckpt_path: str | None, output_dir: str | Path) -> str | None:
    """What ``trainer.fit(ckpt_path=...)`` should get for the ``ckpt_path`` config value.

    * ``None`` / ``""``: start from scratch.
    * ``"last"``: ``<output_dir>/checkpoints/last.ckpt`` when it exists, else from scratch (so one command line
      works for the first launch and every requeue; pin the run dir with ``hydra.run.dir=...``).
    * a run directory: its ``checkpoints/last.ckpt``;  a file: that file (``FileNotFoundError`` when missing).
    """
    if ckpt_path in (None, "", "null", "none"):
        return None
    if ckpt_path == "last":
        last = Path(output_dir) / "checkpoints" / "last.ckpt"
        if last.is_file():
            return str(last)
        print(f"[dalle2] ckpt_path=last: no {last} yet, starting from scratch")
        return None
    path = Path(ckpt_path)
    if path.is_dir():
        for cand in (path / "checkpoints" / "last.ckpt", path / "last.ckpt"):
            if cand.is_file():
                return str(cand)
        raise FileNotFoundError(f"ckpt_path={ckpt_path!r}: a directory without checkpoints/last.ckpt")
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path!r}: no such checkpoint")
    return str(path)
