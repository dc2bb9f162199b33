"""Export a stage checkpoint to safetensors + a small JSON config: the way to share weights.

    python -m dalle2.export ckpt=runs/prior/<run>/checkpoints/last.ckpt out=shared/prior [weights=ema|raw]
        [force=true] [trust_checkpoint=true]

writes ``shared/prior.safetensors`` — the network's weights (the EMA weights for the prior, the decoder and the
upsamplers: what sampling uses), plus, for a stage bound to a CLIP vocabulary, its BPE merges as one uint8 tensor
(``dalle2.vocabulary.merges``) — and ``shared/prior.json``: the format, the stage, the hyperparameters that rebuild
the network and its diffusion settings, the vocabulary's name / sha256 / size and where it came from.  The same JSON
is the safetensors file's ``dalle2_export`` metadata, so the ``.safetensors`` alone is enough to load:
``ckpt.prior=shared/prior.safetensors`` (eval/sample.py, eval/serve.py), ``clip_ckpt=shared/clip.safetensors``
(evaluate, precompute, train), ``UnCLIPPipeline.from_checkpoints(prior="shared/prior.safetensors", ...)``,
``load_stage_module(path, "prior")``.  Loading an export never unpickles anything.

``ckpt`` may also be a sharded checkpoint directory (``trainer=fsdp``: ``checkpoints/last.ckpt/``): its shards are
consolidated in this process (no process group; :func:`dalle2.checkpoint.load_checkpoint`) into the one file.

``out`` is a path without suffix (``shared/prior``), a ``.safetensors`` path, or an existing directory (then
``<dir>/<stage>``).  Existing files are kept unless ``force=true``; files are written to a temporary name and
renamed, so an interrupted export leaves nothing half-written.  A checkpoint that cannot be read without running
code is refused unless ``trust_checkpoint=true`` (export it once, trusted, and share the safetensors instead).
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch

from dalle2.checkpoint import (
    CHECKPOINT_ERRORS,
    EXPORT_FORMAT,
    EXPORT_KEY,
    EXPORT_VERSION,
    VOCAB_TENSOR,
    WrongStageError,
    read_stage,
)
from dalle2.lit.checkpoints import STAGE_CLASSES

__all__ = ["export_checkpoint", "export_paths", "main"]


def export_paths(out: str | Path, stage: str) -> tuple[Path, Path]:
    """``(<name>.safetensors, <name>.json)`` for an ``out`` argument."""
    out = Path(out)
    if out.is_dir():
        out = out / stage
    base = out.with_suffix("") if out.suffix == ".safetensors" else out
    return base.with_name(base.name + ".safetensors"), base.with_name(base.name + ".json")


def _json_value(value: Any, where: str) -> Any:
    """A JSON copy of a hyperparameter (tuples -> lists); anything else is an error naming it."""
    if isinstance(value, dict):
        return {str(k): _json_value(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"hyperparameter {where}={value} cannot be written to JSON")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ValueError(f"hyperparameter {where} is a {type(value).__name__}, not a JSON value")


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_export_files(
    st_path: Path, json_path: Path, *, stage: str, weights: str, hparams: dict, tensors: dict, vocabulary, source: dict
) -> None:
    """Write one stage's export (``.safetensors`` with the JSON config in its metadata, and the ``.json`` beside it),
    each atomically: the format ``python -m dalle2.export`` and ``python -m dalle2.convert`` share."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    if vocabulary is not None:
        tensors[VOCAB_TENSOR] = torch.frombuffer(bytearray(vocabulary.merges.encode("utf-8")), dtype=torch.uint8)
    config = {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "stage": stage,
        "class": STAGE_CLASSES[stage],
        "weights": weights,
        "hparams": hparams,
        "vocabulary": vocabulary.to_dict(with_merges=False) if vocabulary is not None else None,
        "source": {**source, "torch": torch.__version__},
    }
    st_path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(config, indent=2, sort_keys=True)
    _atomic_write(st_path, lambda p: save_file(tensors, str(p), metadata={"format": "pt", EXPORT_KEY: text}))
    _atomic_write(json_path, lambda p: p.write_text(text + "\n"))


def export_checkpoint(
    ckpt: str | Path, out: str | Path, *, weights: str = "ema", force: bool = False, trust_checkpoint: bool = False
) -> Path:
    """Write ``<out>.safetensors`` + ``<out>.json`` for the stage checkpoint ``ckpt`` (a ``.ckpt`` file or a sharded
    checkpoint directory); returns the safetensors path.

    ``weights``: ``ema`` (default: what sampling uses) or ``raw`` for the prior, decoder and upsamplers (a CLIP has
    one set of weights)."""

    ckpt = Path(ckpt)
    if weights not in ("ema", "raw"):
        raise ValueError(f"weights={weights!r}: expected one of ['ema', 'raw']")
    try:
        found = read_stage(ckpt, None, weights=weights, trust_checkpoint=trust_checkpoint)
    except WrongStageError as e:
        raise ValueError(
            f"{ckpt}: not a dalle2 stage checkpoint ({e}); export .ckpt files written by train/train.py"
        ) from None
    stage, vocab = found.stage, found.vocabulary
    hparams = _json_value(found.hparams, "hparams")
    if "clip_ckpt" in hparams:
        hparams["clip_ckpt"] = None  # a path on the exporting machine; sampling never needs the frozen CLIP
    st_path, json_path = export_paths(out, stage)
    existing = [str(p) for p in (st_path, json_path) if p.exists()]
    if existing and not force:
        raise FileExistsError(f"{', '.join(existing)} exists: pass force=true to replace it")
    write_export_files(
        st_path,
        json_path,
        stage=stage,
        weights="model" if stage == "clip" else weights,
        hparams=hparams,
        tensors=found.weights,
        vocabulary=vocab,
        source={"file": ckpt.name, "global_step": found.global_step},
    )
    return st_path


def _parse(argv: list[str]) -> dict[str, str]:
    args = {}
    for a in argv:
        key, sep, value = a.partition("=")
        if not sep or key not in {"ckpt", "out", "weights", "force", "trust_checkpoint"}:
            raise SystemExit(
                f"usage: python -m dalle2.export ckpt=FILE.ckpt out=NAME [weights=ema|raw force=true "
                f"trust_checkpoint=true]; got {a!r}"
            )
        args[key] = value
    if "ckpt" not in args or "out" not in args:
        raise SystemExit("usage: python -m dalle2.export ckpt=FILE.ckpt out=NAME (both are required)")
    return args


def _flag(value: str | None) -> bool:
    return str(value).lower() in ("1", "true", "yes")


def main(argv: list[str] | None = None) -> None:
    args = _parse(sys.argv[1:] if argv is None else argv)
    try:
        path = export_checkpoint(
            args["ckpt"],
            args["out"],
            weights=args.get("weights", "ema"),
            force=_flag(args.get("force")),
            trust_checkpoint=_flag(args.get("trust_checkpoint")),
        )
    except (*CHECKPOINT_ERRORS, FileExistsError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    config = json.loads(path.with_suffix(".json").read_text())
    size = path.stat().st_size / 2**20
    vocab = config["vocabulary"]["name"] if config["vocabulary"] else "none"
    print(
        f"[dalle2] {config['stage']} ({config['weights']} weights, vocabulary {vocab}) -> {path} ({size:.1f} MiB) "
        f"+ {path.with_suffix('.json')}"
    )


if __name__ == "__main__":
    main()
