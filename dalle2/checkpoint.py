"""Reading our stage files without running code, with the stage checked from that safe read — no Lightning here.

* Lightning ``.ckpt`` files go through torch's weights-only unpickler (:func:`dalle2.safe_load.torch_load`): a file
  that would run code is refused with :class:`UntrustedCheckpointError` before anything else is looked at;
  ``trust_checkpoint=True`` unpickles it anyway, with a warning.
* Sharded checkpoints (``trainer=fsdp``: a directory ``last.ckpt/`` with one DCP shard file per rank and Lightning's
  ``meta.pt``) read the same way: ``meta.pt`` weights-only, the DCP index through an allowlist (shard files outside
  the directory refused), the shards' byte entries weights-only, and their tensors consolidated in this process
  (:func:`dalle2.safe_load.read_dcp_state`; no process group needed).  Even without tensors (``checkpoint_stage``,
  which train.py runs before Lightning resumes from the directory; ``FSDP2Strategy`` then reads it through
  :func:`dalle2.safe_load.load_dcp_into`) every byte entry is read weights-only first.
* dalle2 safetensors exports (``python -m dalle2.export``) are read with no unpickling at all.
* A file of the wrong stage is one clear :class:`WrongStageError`.

:func:`read_stage` gives what sampling needs from either kind of file — the stage's hyperparameters, its sampling
weights (the EMA network of a diffusion stage) and the CLIP vocabulary it is bound to — for :mod:`dalle2.stages`
(the pipeline's plain networks) and :mod:`dalle2.lit.checkpoints` (the LightningModules).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dalle2.clip.tokenizer import Vocabulary, VocabularyMismatchError
from dalle2.safe_load import UntrustedCheckpointError, check_dcp_checkpoint, read_dcp_state, torch_load

STAGE_KEY = "dalle2_stage"
VOCAB_KEY = "dalle2_vocabulary"  # {"name", "sha256", "vocab_size", "merges"}: the CLIP's BPE vocabulary
EXPORT_KEY = "dalle2_export"  # safetensors metadata: the export's JSON config
EXPORT_FORMAT, EXPORT_VERSION = "dalle2.export", 1
VOCAB_TENSOR = "dalle2.vocabulary.merges"  # an export's vocabulary merges, as UTF-8 bytes (uint8)
STAGES = ("clip", "prior", "decoder", "upsampler")
SHARDED_META = "meta.pt"  # a sharded checkpoint directory's Lightning metadata (all but weights and optimizer state)
# state_dict prefix of each kind of weights in a stage's .ckpt
WEIGHT_PREFIXES = {"ema": "ema.module.", "raw": "net.", "model": "model."}

__all__ = [
    "CHECKPOINT_ERRORS",
    "STAGES",
    "STAGE_KEY",
    "VOCAB_KEY",
    "StageFile",
    "UntrustedCheckpointError",
    "WrongStageError",
    "check_stage",
    "checkpoint_stage",
    "is_export",
    "is_sharded_checkpoint",
    "load_checkpoint",
    "read_export",
    "read_stage",
]


class WrongStageError(ValueError):
    pass


# What an entry point turns into a one-line error (the file, and what to do).
CHECKPOINT_ERRORS = (FileNotFoundError, UntrustedCheckpointError, WrongStageError, VocabularyMismatchError)


def is_sharded_checkpoint(path: str | Path) -> bool:
    """A sharded (distributed) checkpoint directory as ``trainer=fsdp`` writes it (``<dir>/meta.pt`` + DCP shards)."""
    path = Path(path)
    return path.is_dir() and (path / SHARDED_META).is_file()


def _exists(path: Path) -> None:
    if not (path.is_file() or is_sharded_checkpoint(path)):
        what = "a directory that is not a sharded checkpoint (no meta.pt)" if path.is_dir() else "not found"
        raise FileNotFoundError(f"checkpoint {what}: {path}")


def load_checkpoint(
    path: str | Path, *, trust_checkpoint: bool = False, tensors: bool = True, optimizer: bool = False
) -> Any:
    """The unpickled ``.ckpt`` (a dict for ours), tensors memory-mapped; never runs code unless ``trust_checkpoint``.

    A sharded checkpoint directory gives the same dict: its ``meta.pt`` with the consolidated ``state_dict`` (full
    tensors, keys as in a ``.ckpt``) and ``optimizer_states``; ``tensors=False`` reads ``meta.pt`` alone (after
    checking the shards' index and reading every byte entry of the shards weights-only, as resuming would unpickle
    them); the optimizer state of a directory is consolidated only with ``optimizer=True``
    (it is ~2x the weights, and no reader of weights needs it)."""
    path = Path(path)
    _exists(path)
    if path.is_file():
        return torch_load(path, trust_checkpoint=trust_checkpoint)
    ckpt = torch_load(path / SHARDED_META, trust_checkpoint=trust_checkpoint)
    if not tensors:  # what resuming would unpickle is checked all the same: the index and every byte entry
        check_dcp_checkpoint(path, trust_checkpoint=trust_checkpoint)
        return ckpt
    keys = None if optimizer else {"state_dict"}
    state = read_dcp_state(path, keys, trust_checkpoint=trust_checkpoint)
    ckpt["state_dict"] = state.pop("state_dict", {})
    optimizers = sorted((k for k in state if k.startswith("optimizer_")), key=lambda k: int(k.split("_")[1]))
    ckpt["optimizer_states"] = [state[k] for k in optimizers]  # keyed by parameter name (FQN), not index
    return ckpt


def is_export(path: str | Path) -> bool:
    """A ``.safetensors`` file written by ``python -m dalle2.export`` (its header says so)."""
    if not str(path).endswith(".safetensors") or not Path(path).is_file():
        return False
    try:
        return EXPORT_KEY in _safetensors_metadata(path)
    except ValueError:
        return False


def _safetensors_metadata(path) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - SafetensorError and friends
        raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None


def _export_config(path) -> dict:
    meta = _safetensors_metadata(path)
    if EXPORT_KEY not in meta:
        raise ValueError(
            f"{path}: not a dalle2 export (no {EXPORT_KEY!r} metadata; write one with python -m "
            "dalle2.export; CLIP weights in OpenAI/open_clip layout load as the CLIP only)"
        )
    try:
        config = json.loads(meta[EXPORT_KEY])
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: its {EXPORT_KEY!r} metadata is not JSON ({e})") from None
    if not isinstance(config, dict) or config.get("format") != EXPORT_FORMAT:
        fmt = config.get("format") if isinstance(config, dict) else None
        raise ValueError(f"{path}: not a dalle2 export (format {fmt!r})")
    if int(config.get("version", 0)) > EXPORT_VERSION:
        raise ValueError(
            f"{path}: export version {config['version']} is newer than this dalle2 reads ({EXPORT_VERSION})"
        )
    return config


def read_export(path: str | Path) -> tuple[dict, dict, Vocabulary | None]:
    """``(config, tensors, vocabulary)`` of an export; safetensors and JSON only, nothing is unpickled."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"export not found: {path}")
    config = _export_config(path)
    with safe_open(str(path), framework="pt", device="cpu") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    merges = tensors.pop(VOCAB_TENSOR, None)
    vocab = None
    if config.get("vocabulary"):
        if merges is None:
            raise VocabularyMismatchError(f"{path}: its config names a vocabulary but the file has no {VOCAB_TENSOR}")
        text = bytes(merges.numpy().tobytes()).decode("utf-8")
        vocab = Vocabulary.from_dict(config["vocabulary"], merges=text, source=str(path))
    return config, tensors, vocab


def checkpoint_stage(path: str | Path, *, trust_checkpoint: bool = False) -> str | None:
    """The stage a ``.ckpt``, sharded checkpoint directory or export of ours was written by (None when it is not one
    of ours)."""
    path = Path(path)
    _exists(path)
    if str(path).endswith(".safetensors"):
        return _export_config(path).get("stage")
    ckpt = load_checkpoint(path, trust_checkpoint=trust_checkpoint, tensors=False)
    return ckpt.get(STAGE_KEY) if isinstance(ckpt, dict) else None


def check_stage(path, found: str | None, stage: str) -> None:
    if found != stage:
        kind = "export" if str(path).endswith(".safetensors") else "Lightning checkpoint"
        what = f"a {found!r} checkpoint" if found else f"not a dalle2 {kind}"
        raise WrongStageError(f"{path} is {what}, but a {stage!r} checkpoint was expected")


@dataclass
class StageFile:
    """What a stage file holds for sampling: ``hparams`` (the constructor keywords of its LightningModule), the
    ``weights`` of its network (state_dict keys without prefix: the EMA weights of a diffusion stage unless asked
    otherwise; the CLIP model's for a CLIP), the ``vocabulary`` it is bound to, and where it came from."""

    stage: str
    hparams: dict[str, Any]
    weights: dict[str, torch.Tensor]
    vocabulary: Vocabulary | None
    source: str
    global_step: int | None = None


def read_stage(
    path: str | Path, stage: str | None, *, weights: str = "ema", trust_checkpoint: bool = False
) -> StageFile:
    """The :class:`StageFile` of a ``.ckpt`` or sharded checkpoint directory (weights-only unpickling) or a dalle2
    safetensors export (none); the
    stage is checked (:class:`WrongStageError`; ``stage=None`` takes any of ours). ``weights``: ``ema`` or ``raw``
    (which network of a diffusion stage's ``.ckpt``)."""
    if stage is not None and stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {list(STAGES)}")
    if weights not in ("ema", "raw"):
        raise ValueError(f"weights={weights!r}: expected 'ema' or 'raw'")
    path = Path(path)
    _exists(path)
    if str(path).endswith(".safetensors"):
        config, tensors, vocab = read_export(path)
        found = config.get("stage")
        check_stage(path, found, stage if stage is not None else found if found in STAGES else "one of ours")
        return StageFile(
            found,
            dict(config.get("hparams") or {}),
            tensors,
            vocab,
            str(path),
            (config.get("source") or {}).get("global_step"),
        )
    ckpt = load_checkpoint(path, trust_checkpoint=trust_checkpoint)
    found = ckpt.get(STAGE_KEY) if isinstance(ckpt, dict) else None
    check_stage(path, found, stage if stage is not None else found if found in STAGES else "one of ours")
    stage = found
    prefix = WEIGHT_PREFIXES["model" if stage == "clip" else weights]
    sd = ckpt.get("state_dict") or {}
    tensors = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    if not tensors:
        raise ValueError(f"{path}: no {prefix}* weights in its state_dict")
    vocab = Vocabulary.from_dict(ckpt[VOCAB_KEY], source=str(path)) if ckpt.get(VOCAB_KEY) else None
    return StageFile(
        stage, dict(ckpt.get("hyper_parameters") or {}), tensors, vocab, str(path), ckpt.get("global_step")
    )
