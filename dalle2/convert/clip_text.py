"""A ``transformers`` CLIP text tower (``CLIPTextModelWithProjection``) and its tokenizer files, as ours.

The text tower maps onto :class:`dalle2.clip.model.CLIP` without an image tower (``vision_layers=0``): the same
pre-LN causal transformer, final LayerNorm, pooled state at the end token (the highest id: ``argmax``) times the
projection.  The tokenizer (``vocab.json`` + ``merges.txt`` + the special tokens) becomes our
:class:`~dalle2.clip.tokenizer.Tokenizer` with ``transformers``' text cleaning (``cleaning="nfc"``) and padding id;
``vocab.json`` must give every token the id our layout gives it (bytes, word-end bytes, merges, start, end).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from dalle2.clip.model import CLIP
from dalle2.clip.tokenizer import EOT, SOT, Tokenizer, read_merges
from dalle2.convert.diffusers_dir import ConversionError, load_converted, read_json

__all__ = ["clip_text_config", "convert_clip_text", "load_tokenizer_dir"]

_LAYER = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.(.+)$")
_LAYER_NAMES = {
    "layer_norm1.weight": "ln_1.weight",
    "layer_norm1.bias": "ln_1.bias",
    "layer_norm2.weight": "ln_2.weight",
    "layer_norm2.bias": "ln_2.bias",
    "self_attn.out_proj.weight": "attn.proj.weight",
    "self_attn.out_proj.bias": "attn.proj.bias",
    "mlp.fc1.weight": "mlp.fc.weight",
    "mlp.fc1.bias": "mlp.fc.bias",
    "mlp.fc2.weight": "mlp.proj.weight",
    "mlp.fc2.bias": "mlp.proj.bias",
}
_TOP_NAMES = {
    "text_model.embeddings.token_embedding.weight": "text.token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "text.positional_embedding",
    "text_model.final_layer_norm.weight": "text.ln_final.weight",
    "text_model.final_layer_norm.bias": "text.ln_final.bias",
}


def load_tokenizer_dir(path: str | Path, *, name: str = "tokenizer") -> Tokenizer:
    """Our tokenizer for a ``transformers`` CLIP tokenizer folder (``vocab.json``, ``merges.txt``, optional
    ``special_tokens_map.json`` / ``tokenizer_config.json``): same ids as ``CLIPTokenizer``, padding included."""
    path = Path(path)
    merges_file = path / "merges.txt"
    if (path / "vocab.json").is_file() or not (path / "tokenizer.json").is_file():
        vocab = read_json(path / "vocab.json")
        if not merges_file.is_file():
            raise ConversionError(f"missing {merges_file}")
        try:
            merges = read_merges(merges_file, max_merges=max(len(vocab) - 514, 0))
        except ValueError as e:
            raise ConversionError(str(e)) from None
    else:  # the tokenizers-library file that newer transformers write instead
        vocab, merges = _tokenizer_json(path / "tokenizer.json")
        merges_file = path / "tokenizer.json"
    special: dict[str, Any] = {}
    for fname in ("tokenizer_config.json", "special_tokens_map.json"):
        if (path / fname).is_file():
            special.update(read_json(path / fname))
    max_len = special.get("model_max_length", 77)
    context_length = int(max_len) if isinstance(max_len, (int, float)) and max_len <= 4096 else 77
    tok = Tokenizer(merges=merges, context_length=context_length, name=name, cleaning="nfc")
    if len(vocab) != tok.vocab_size:
        raise ConversionError(f"{path / 'vocab.json'} has {len(vocab)} tokens, {merges_file} makes {tok.vocab_size}")
    ours = tok._vocab
    for token, i in vocab.items():
        if not isinstance(i, int) or not 0 <= i < len(ours) or ours[i] != token:
            raise ConversionError(
                f"{path / 'vocab.json'}: token {token!r} has id {i}, CLIP's layout gives "
                f"{ours.index(token) if token in ours else 'no id'}: not a CLIP BPE vocabulary"
            )
    for key, expected in (("bos_token", SOT), ("eos_token", EOT)):
        value = special.get(key, expected)
        value = value.get("content") if isinstance(value, dict) else value
        if value != expected:
            raise ConversionError(f"{path}: {key} is {value!r}, expected {expected!r}")
    pad = special.get("pad_token", EOT)
    pad = pad.get("content") if isinstance(pad, dict) else pad
    if pad not in vocab:
        raise ConversionError(f"{path}: pad_token {pad!r} is not in vocab.json")
    # a padding token that is not start / end is an added token of the reference: split out of any text as its id
    split = (pad,) if pad not in (SOT, EOT) else ()
    return Tokenizer(
        merges=merges, context_length=context_length, name=name, pad_id=vocab[pad], cleaning="nfc", split_tokens=split
    )


def _tokenizer_json(path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    model = read_json(path).get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise ConversionError(f"{path}: not a BPE tokenizer (model type {model.get('type')!r})")
    merges = []
    for m in model.get("merges") or []:
        pair = m.split(" ") if isinstance(m, str) else list(m)
        if len(pair) != 2:
            raise ConversionError(f"{path}: merge {m!r} is not two symbols")
        merges.append((pair[0], pair[1]))
    return dict(model["vocab"]), merges[: max(len(model["vocab"]) - 514, 0)]


def clip_text_config(config: Mapping[str, Any], *, source: str = "text_encoder/config.json") -> dict[str, Any]:
    """``CLIP`` keyword arguments (no image tower) for a ``CLIPTextConfig`` dict; unsupported settings are errors."""
    cfg = dict(config.get("text_config") or config)
    act = cfg.get("hidden_act", "quick_gelu")
    width, vocab = int(cfg["hidden_size"]), int(cfg["vocab_size"])
    problems = []
    if act not in ("quick_gelu", "gelu"):
        problems.append(f"hidden_act {act!r} (quick_gelu or gelu)")
    if int(cfg.get("intermediate_size", 4 * width)) != 4 * width:
        problems.append(f"intermediate_size {cfg.get('intermediate_size')} != 4 * hidden_size")
    if abs(float(cfg.get("layer_norm_eps", 1e-5)) - 1e-5) > 1e-12:
        problems.append(f"layer_norm_eps {cfg.get('layer_norm_eps')} (1e-5)")
    if int(cfg.get("eos_token_id", 2)) not in (2, vocab - 1):
        problems.append(f"eos_token_id {cfg.get('eos_token_id')} (the last id, {vocab - 1}, pools at the end token)")
    if problems:
        raise ConversionError(f"{source}: unsupported CLIP text tower: {'; '.join(problems)}")
    return dict(
        embed_dim=int(cfg.get("projection_dim", width)),
        image_size=224,
        vision_width=0,
        vision_layers=0,  # no image tower
        vision_heads=1,
        vision_patch_size=None,
        context_length=int(cfg.get("max_position_embeddings", 77)),
        vocab_size=vocab,
        text_width=width,
        text_layers=int(cfg["num_hidden_layers"]),
        text_heads=int(cfg["num_attention_heads"]),
        activation=act,
    )


def convert_clip_text(
    sd: Mapping[str, torch.Tensor], config: Mapping[str, Any], *, source: str = "text_encoder"
) -> CLIP:
    """Our text-only ``CLIP`` (eval, float32) with the weights of a ``CLIPTextModelWithProjection`` state dict."""
    cfg = clip_text_config(config, source=f"{source}/config.json")
    out: dict[str, torch.Tensor] = {}
    qkv: dict[int, dict[str, torch.Tensor]] = {}
    unexpected = []
    for key, value in sd.items():
        value = value.float()
        if key in _TOP_NAMES:
            out[_TOP_NAMES[key]] = value
        elif key == "text_projection.weight":
            out["text.proj"] = value.t().contiguous()
        elif key.endswith("position_ids"):
            continue
        elif m := _LAYER.match(key):
            i, rest = int(m.group(1)), m.group(2)
            prefix = f"text.transformer.resblocks.{i}."
            if rest in _LAYER_NAMES:
                out[prefix + _LAYER_NAMES[rest]] = value
            elif rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                qkv.setdefault(i, {})[rest.split(".", 1)[1]] = value
            else:
                unexpected.append(key)
        else:
            unexpected.append(key)
    for i, parts in qkv.items():
        for kind in ("weight", "bias"):
            names = [f"{p}_proj.{kind}" for p in "qkv"]
            if all(n in parts for n in names):
                out[f"text.transformer.resblocks.{i}.attn.qkv.{kind}"] = torch.cat([parts[n] for n in names])
    model = CLIP(**cfg)
    out["logit_scale"] = model.state_dict()["logit_scale"]
    return load_converted(model, out, unexpected=unexpected, source=str(source))
