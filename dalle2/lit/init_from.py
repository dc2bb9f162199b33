"""Starting a training run from another stage file's weights (``train/train.py init_from=<stage file>``): a converted
Karlo stage (``python -m dalle2.convert karlo``), an export or a ``.ckpt`` of ours.

:func:`init_module_config` gives the module keywords that define the network — ``network``, ``diffusion`` and the
stage's structural settings (the prior's embedding space, the decoder's image size and text use, the upsampler's sizes)
— so the run builds the file's network; the rest of the run's config (optimizer, data, trainer, CFG drop rates...) is
the run's.  :func:`load_init_weights` then loads the weights into the network *and* its EMA copy (the EMA starts from
them, not from a random init), and binds the module to the file's CLIP vocabulary.  A run resumed with ``ckpt_path``
restores its own checkpoint over these.
"""

from __future__ import annotations

from typing import Any

from dalle2.checkpoint import StageFile, read_stage

__all__ = ["STRUCTURAL_KEYS", "init_module_config", "load_init_weights", "read_init"]

STRUCTURAL_KEYS = {
    "prior": ("use_text_tokens", "embed_scale", "x0_clip"),
    "decoder": ("image_size", "use_text"),
    "upsampler": (
        "lowres_size",
        "image_size",
        "sample_aug_level",
        "lowres_aug",
        "sample_spacing",
        "residual",
        "residual_gain",
        "downsample_mode",
    ),
}


def read_init(path: str, stage: str, *, trust_checkpoint: bool = False) -> StageFile:
    """The stage file ``path`` (its EMA weights), checked to be a ``stage`` (``WrongStageError`` otherwise)."""
    if stage not in STRUCTURAL_KEYS:
        raise ValueError(f"init_from starts a prior, decoder or upsampler run, not a {stage!r} one")
    return read_stage(path, stage, weights="ema", trust_checkpoint=trust_checkpoint)


def init_module_config(found: StageFile) -> dict[str, Any]:
    """The module keywords of ``found`` that define its network (see the module docstring)."""
    hp = found.hparams
    out: dict[str, Any] = {"network": dict(hp["network"])}
    if hp.get("diffusion") is not None:
        out["diffusion"] = dict(hp["diffusion"])
    out.update({k: hp[k] for k in STRUCTURAL_KEYS[found.stage] if k in hp})
    return out


def load_init_weights(module, found: StageFile) -> None:
    """``found``'s weights into ``module.net`` and its EMA copy (strictly), and its vocabulary bound."""
    try:
        module.net.load_state_dict(found.weights, strict=True)
        if getattr(module, "ema", None) is not None:
            module.ema.module.load_state_dict(found.weights, strict=True)
    except RuntimeError as e:
        raise ValueError(
            f"init_from={found.source}: weights do not fit the network: {' '.join(str(e).split())[:400]}"
        ) from None
    if found.vocabulary is not None:
        module.bind_vocabulary(found.vocabulary, source=f"init_from={found.source}")
