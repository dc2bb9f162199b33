"""Stage LightningModules from our checkpoints, and the run directory's checkpoints for resuming.

Files are read by :mod:`dalle2.checkpoint` (no code runs, the stage is checked; its names are importable from here
too). The module is rebuilt from the stored hyperparameters (``save_hyperparameters``), as ``load_from_checkpoint`` would,
from the one safe load.  :class:`StageCheckpointMixin` writes the stage and the CLIP vocabulary into every checkpoint.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import time
import warnings
from pathlib import Path
from typing import Any

from dalle2.checkpoint import (
    CHECKPOINT_ERRORS,
    EXPORT_FORMAT,
    EXPORT_KEY,
    EXPORT_VERSION,
    SHARDED_META,
    STAGE_KEY,
    VOCAB_KEY,
    VOCAB_TENSOR,
    StageFile,
    UntrustedCheckpointError,
    WrongStageError,
    check_stage,
    checkpoint_stage,
    is_export,
    is_sharded_checkpoint,
    load_checkpoint,
    read_export,
    read_stage,
)
from dalle2.clip.tokenizer import Tokenizer, Vocabulary, VocabularyMismatchError
from dalle2.safe_load import torch_load

STAGE_CLASSES = {
    "clip": "dalle2.lit.clip_module:CLIPModule",
    "prior": "dalle2.lit.prior_module:PriorModule",
    "decoder": "dalle2.lit.decoder_module:DecoderModule",
    "upsampler": "dalle2.lit.decoder_module:UpsamplerModule",
}

__all__ = [
    "CHECKPOINT_ERRORS",
    "EXPORT_FORMAT",
    "EXPORT_KEY",
    "EXPORT_VERSION",
    "STAGE_CLASSES",
    "STAGE_KEY",
    "VOCAB_KEY",
    "VOCAB_TENSOR",
    "RunDirInUseError",
    "StageCheckpointMixin",
    "StageFile",
    "UntrustedCheckpointError",
    "WrongStageError",
    "build_module",
    "check_stage",
    "checkpoint_stage",
    "is_export",
    "is_sharded_checkpoint",
    "load_checkpoint",
    "load_stage_module",
    "read_export",
    "read_stage",
    "remove_stale_temp_files",
    "resolve_ckpt_path",
    "run_checkpoints",
]


class StageCheckpointMixin:
    """Checkpoint tags of a stage module: its ``stage`` and, when known, the ``vocabulary`` of the CLIP whose text it
    was trained on (the CLIP's own for a CLIP).  Mixed into every stage's LightningModule."""

    stage: str = "?"
    vocabulary: Vocabulary | None = None

    def bind_vocabulary(self, vocabulary: Vocabulary | None, *, source: str = "the tokenizer") -> None:
        """Record ``vocabulary``; a different one already recorded is a :class:`VocabularyMismatchError`."""
        if vocabulary is None:
            return
        if self.vocabulary is not None and self.vocabulary.sha256 != vocabulary.sha256:
            raise VocabularyMismatchError(
                f"{source} has vocabulary {vocabulary.describe()}, but this {self.stage} was trained with "
                f"{self.vocabulary.describe()}"
            )
        self.vocabulary = vocabulary

    def bind_tokenizer(self, tokenizer, *, source: str = "the tokenizer") -> None:
        if isinstance(tokenizer, Tokenizer):
            self.bind_vocabulary(tokenizer.vocabulary, source=f"{source} {tokenizer.name}")

    def _datamodule_tokenizer(self):
        trainer = getattr(self, "_trainer", None)
        return getattr(getattr(trainer, "datamodule", None), "tokenizer", None)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[STAGE_KEY] = self.stage
        if self.vocabulary is not None:
            checkpoint[VOCAB_KEY] = self.vocabulary.to_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        stored = checkpoint.get(VOCAB_KEY)
        if stored:
            self.bind_vocabulary(
                Vocabulary.from_dict(stored, source=f"this {self.stage} checkpoint"), source="the checkpoint"
            )


# -- rebuilding modules -------------------------------------------------------------------------------------


def _stage_class(stage: str):
    if stage not in STAGE_CLASSES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {sorted(STAGE_CLASSES)}")
    mod_name, cls_name = STAGE_CLASSES[stage].split(":")
    return getattr(importlib.import_module(mod_name), cls_name)


def build_module(stage: str, hparams: dict, *, source) -> Any:
    """``<StageModule>(**hparams)``, keeping the keys its constructor takes (as ``load_from_checkpoint`` does)."""
    cls = _stage_class(stage)
    params = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in dict(hparams or {}).items() if k in params}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: its hyperparameters do not build a {cls.__name__}: {e}") from None


def _load_weights(module, sd: dict, *, source, what: str = "weights") -> None:
    try:
        module.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ValueError(
            f"{source}: its {what} do not match the network its hyperparameters build: {' '.join(str(e).split())[:600]}"
        ) from None


def load_stage_module(path: str | Path, stage: str, *, map_location="cpu", trust_checkpoint: bool = False):
    """The ``stage`` module from a ``.ckpt`` or sharded checkpoint directory (weights-only unpickling) or a dalle2
    safetensors export (none).

    The stage is checked from that safe load (:class:`WrongStageError`); a file that would run code raises
    :class:`UntrustedCheckpointError` unless ``trust_checkpoint``.  An export's weights (the EMA weights of a
    diffusion stage) fill both the network and its EMA copy."""
    _stage_class(stage)
    path = Path(path)
    if not (path.is_file() or is_sharded_checkpoint(path)):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if str(path).endswith(".safetensors"):
        config, tensors, vocab = read_export(path)
        check_stage(path, config.get("stage"), stage)
        module = build_module(stage, config.get("hparams") or {}, source=path)
        targets = [module.model] if stage == "clip" else [module.net, module.ema.module]
        for target in targets:
            _load_weights(target, tensors, source=path)
        module.bind_vocabulary(vocab, source=str(path))
    else:
        ckpt = load_checkpoint(path, trust_checkpoint=trust_checkpoint)
        check_stage(path, ckpt.get(STAGE_KEY) if isinstance(ckpt, dict) else None, stage)
        module = build_module(stage, ckpt.get("hyper_parameters") or {}, source=path)
        module.on_load_checkpoint(ckpt)
        _load_weights(module, ckpt["state_dict"], source=path, what="weights (state_dict)")
    return module.to(map_location) if map_location is not None else module


class RunDirInUseError(RuntimeError):
    """A new run was started in a run directory that already holds checkpoints."""


def checkpoint_step(path: str | Path) -> int | None:
    """The ``global_step`` stored in a Lightning checkpoint (a safe load with mmap: no code runs, no tensor is
    copied; a sharded checkpoint directory's ``meta.pt``); None, with a warning naming the file, when it cannot be
    read as one."""
    try:
        ckpt = torch_load(Path(path) / SHARDED_META if Path(path).is_dir() else path)
    except Exception as e:  # truncated, foreign, or refused: not a candidate
        warnings.warn(f"{path}: not a readable checkpoint ({type(e).__name__}: {e}); passed over", stacklevel=2)
        return None
    step = ckpt.get("global_step") if isinstance(ckpt, dict) else None
    return int(step) if isinstance(step, int) else None


def run_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``(global_step, path)`` of the checkpoints a run left in ``run_dir``, newest first: ``checkpoints/last*.ckpt``,
    ``checkpoints/step_*.ckpt`` and Lightning's SLURM ``hpc_ckpt_*.ckpt`` (in the run dir itself); unreadable
    files are left out. Sharded checkpoints (``trainer=fsdp``) are directories of those names. Ties keep ``last.ckpt``
    first."""
    run_dir = Path(run_dir)
    names = ("last*.ckpt", "step_*.ckpt", "*.ckpt")
    files = dict.fromkeys(p for pattern in names for p in sorted((run_dir / "checkpoints").glob(pattern)))
    files.update(dict.fromkeys(sorted(run_dir.glob("hpc_ckpt_*.ckpt"))))
    found = [
        (step, p)
        for p in files
        if (p.is_file() or is_sharded_checkpoint(p)) and (step := checkpoint_step(p)) is not None
    ]
    return sorted(found, key=lambda sp: -sp[0])  # stable: last.ckpt first among equal steps


# The temp files of dalle2.io.atomic_write (checkpoints, markers, shards): ``.<name>.tmp-<pid>`` beside the target.
TEMP_FILE = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except OSError:
        return True
    return True


def remove_stale_temp_files(
    run_dir: str | Path, *, started: float | None = None, margin_s: float = 10.0, recursive: bool = False
) -> list[Path]:
    """Remove what a save killed mid-write (SIGKILL, OOM, a node lost) left: temp files of our atomic writes
    (:func:`dalle2.io.temp_path`: ``.<name>.tmp-<pid>``) in ``run_dir`` and ``run_dir/checkpoints`` (every folder
    under ``run_dir`` when ``recursive``). Only files of that name whose writer is not alive on this machine and
    that were last written before ``started`` (default: now) less ``margin_s`` — a writer on another machine
    sharing the disk keeps writing, so its file stays recent. Nothing else is touched. Returns the files removed."""
    run_dir = Path(run_dir)
    before = (time.time() if started is None else started) - margin_s
    if recursive:
        folders = [run_dir, *(p for p in sorted(run_dir.rglob("*")) if p.is_dir() and not p.is_symlink())]
    else:
        folders = [run_dir, run_dir / "checkpoints"]
    removed = []
    for folder in folders:
        try:
            entries = sorted(folder.iterdir())
        except OSError:
            continue
        for path in entries:
            m = TEMP_FILE.match(path.name)
            if not m or path.is_symlink() or not path.is_file() or _alive(int(m["pid"])):
                continue
            try:
                if path.stat().st_mtime >= before:
                    continue
                path.unlink()
            except FileNotFoundError:  # another rank of the same start removed it first
                continue
            removed.append(path)
    for path in removed:
        print(f"[dalle2] removed {path}: a temp file left by a save that was killed mid-write", flush=True)
    return removed


def resolve_ckpt_path(ckpt_path: str | None, output_dir: str | Path) -> str | None:
    """What ``trainer.fit(ckpt_path=...)`` should get for the ``ckpt_path`` config value.

    * ``None`` / ``""``: start from scratch — in a fresh run dir only: when ``output_dir`` already holds
      checkpoints, :class:`RunDirInUseError` says so (Lightning would quietly write ``last-v1.ckpt`` beside the
      old ``last.ckpt``, which a later ``ckpt_path=last`` would then resume).
    * ``"last"``: the newest checkpoint of ``output_dir`` by global step (``last.ckpt``, ``step_*.ckpt``,
      ``hpc_ckpt_*.ckpt``), else from scratch (so one command line works for the first launch and every requeue;
      pin the run dir with ``hydra.run.dir=...``).
    * a run directory: its newest checkpoint likewise;  a file or a sharded checkpoint directory: that checkpoint
      (``FileNotFoundError`` when missing).

    A run starts here, so the temp files a save killed mid-write left in ``output_dir`` are removed first
    (:func:`remove_stale_temp_files`).
    """
    remove_stale_temp_files(output_dir)
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
    if is_sharded_checkpoint(path):  # a sharded checkpoint (trainer=fsdp) is a directory too
        return str(path)
    if path.is_dir():
        given_checkpoints_dir = path.name == "checkpoints" and not (path / "checkpoints").is_dir()
        existing = run_checkpoints(path.parent if given_checkpoints_dir else path)
        if existing:
            return str(existing[0][1])
        raise FileNotFoundError(
            f"ckpt_path={ckpt_path!r}: a directory without checkpoints (checkpoints/last.ckpt, ...)"
        )
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path!r}: no such checkpoint")
    return str(path)
