"""The stages of the cascade as plain networks, loaded from any file of ours — no Lightning.

    clip, vocabulary = load_clip_model("clip.ckpt")                 # .ckpt, export, or OpenAI / open_clip weights
    prior = load_stage("prior.safetensors", "prior")                 # -> PriorStage (EMA weights)
    decoder = load_stage("decoder.ckpt", "decoder")                  # -> DecoderStage
    up = load_stage("sr.ckpt", "upsampler")                          # -> UpsamplerStage

Files are read by :func:`dalle2.checkpoint.read_stage` (no code runs unless ``trust_checkpoint``; the stage is
checked); each stage is rebuilt from its stored hyperparameters by the same builders its LightningModule uses, and
its sampling weights (the EMA network) are loaded strictly.  :class:`dalle2.pipeline.UnCLIPPipeline` is made of these.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from dalle2.checkpoint import StageFile, is_export, read_stage
from dalle2.clip.model import CLIP
from dalle2.clip.tokenizer import Vocabulary
from dalle2.decoder.stage import DecoderStage, UpsamplerStage
from dalle2.prior.stage import PriorStage

__all__ = ["DecoderStage", "PriorStage", "UpsamplerStage", "load_clip_model", "load_stage"]

Stage = PriorStage | DecoderStage | UpsamplerStage


def _load_weights(net: nn.Module, found: StageFile) -> None:
    try:
        net.load_state_dict(found.weights, strict=True)
    except RuntimeError as e:
        raise ValueError(
            f"{found.source}: its weights do not match the network its hyperparameters build: "
            f"{' '.join(str(e).split())[:600]}"
        ) from None


def _built(found: StageFile, build):
    try:
        return build()
    except (TypeError, ValueError, KeyError) as e:
        raise ValueError(
            f"{found.source}: its hyperparameters do not build a {found.stage} ({type(e).__name__}: {e})"
        ) from None


def load_stage(path: str | Path, stage: str, *, trust_checkpoint: bool = False) -> Stage:
    """The prior / decoder / upsampler of a ``.ckpt`` or an export, in eval mode, with its EMA weights."""
    if stage == "clip":
        raise ValueError("load the CLIP with load_clip_model (it also gives its vocabulary)")
    found = read_stage(path, stage, weights="ema", trust_checkpoint=trust_checkpoint)
    hp = found.hparams
    if stage == "prior":
        out = _built(found, lambda: PriorStage.from_hparams(hp, vocabulary=found.vocabulary))
    elif stage == "decoder":
        out = _built(found, lambda: DecoderStage.from_hparams(hp, vocabulary=found.vocabulary))
    else:
        out = _built(found, lambda: UpsamplerStage.from_hparams(hp))
    _load_weights(out.net, found)
    return out.eval().requires_grad_(False)


def load_clip_model(path: str | Path, *, trust_checkpoint: bool = False) -> tuple[CLIP, Vocabulary | None]:
    """``(CLIP, vocabulary)`` in eval mode from a stage=clip ``.ckpt`` or export (with the vocabulary it was trained
    with), or from CLIP weights — OpenAI / open_clip files or ``save_safetensors`` (no vocabulary recorded)."""
    from dalle2.clip.pretrained import load_clip_checkpoint, load_safetensors

    if str(path).endswith(".ckpt") or is_export(path):
        found = read_stage(path, "clip", trust_checkpoint=trust_checkpoint)
        model = _built(found, lambda: CLIP(**found.hparams["network"]))
        _load_weights(model, found)
        vocab = found.vocabulary
    elif str(path).endswith(".safetensors"):
        model, vocab = load_safetensors(path), None
    else:
        model, vocab = load_clip_checkpoint(path, trust_checkpoint=trust_checkpoint), None
    return model.eval().requires_grad_(False), vocab
