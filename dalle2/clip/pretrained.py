"""Pretrained CLIP weights: OpenAI (TorchScript ``.pt`` or state dict) and open_clip checkpoints, safetensors export.

The architecture is read off the state dict's shapes (as OpenAI's ``build_model`` does); keys are renamed onto
``dalle2.clip.model.CLIP`` and loaded strictly.  Nothing is downloaded: give a local file.  Nothing runs from it
either: pickles go through torch's weights-only unpickler and TorchScript archives are read without ``torch.jit``
(:mod:`dalle2.safe_load`); ``trust_checkpoint=True`` is the explicit, warned way past a file that needs more.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from dalle2.clip.model import CLIP
from dalle2.safe_load import (
    UntrustedCheckpointError,
    is_torchscript_archive,
    read_torchscript_state_dict,
    torch_load,
    warn_trusted,
)

CONFIG_METADATA_KEY = "dalle2_clip_config"
# Scalars OpenAI's TorchScript archives carry in their state dict (dropped, as OpenAI's build_model does).
_OPENAI_META_KEYS = ("input_resolution", "context_length", "vocab_size")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# open_clip ViTs whose head width is not 64 (H/14: 80, g/14: 88, bigG/14: 104); the state dict cannot tell.
_VISION_HEADS_BY_WIDTH = {1280: 16, 1408: 16, 1664: 16}
# OpenAI block names -> ours (applies inside ``resblocks``).
_BLOCK_RENAMES = (
    (".attn.in_proj_weight", ".attn.qkv.weight"),
    (".attn.in_proj_bias", ".attn.qkv.bias"),
    (".attn.out_proj.", ".attn.proj."),
    (".mlp.c_fc.", ".mlp.fc."),
    (".mlp.c_proj.", ".mlp.proj."),
)
_TEXT_PREFIXES = ("token_embedding.", "transformer.", "ln_final.")


# -- reading files --------------------------------------------------------------------------------------------
def _read_torchscript(path: Path, map_location, trust_checkpoint: bool) -> dict[str, torch.Tensor]:
    """OpenAI's TorchScript archive: tensors read without torch.jit; ``torch.jit.load`` only when trusted and the
    safe reader cannot make sense of the archive."""
    try:
        sd = read_torchscript_state_dict(path)
    except UntrustedCheckpointError:
        if not trust_checkpoint:
            raise
        warn_trusted(path, "torch.jit.load")
        return torch.jit.load(str(path), map_location=map_location).state_dict()
    return {k: v.to(map_location) for k, v in sd.items()}


def _read_state_dict(
    path: Path, map_location, trust_checkpoint: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """-> (flat state dict, info: {"torchscript": bool, "safetensors_metadata": dict | None})."""
    if not path.is_file():
        raise FileNotFoundError(f"CLIP checkpoint not found: {path}")
    info: dict[str, Any] = {"torchscript": False, "safetensors_metadata": None}
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        device = str(map_location) if isinstance(map_location, (str, torch.device)) else "cpu"
        with safe_open(str(path), framework="pt", device=device) as f:
            info["safetensors_metadata"] = f.metadata() or {}
            return {k: f.get_tensor(k) for k in f.keys()}, info
    if is_torchscript_archive(path):
        info["torchscript"] = True
        obj: Any = _read_torchscript(path, map_location, trust_checkpoint)
    else:
        try:
            obj = torch_load(path, map_location=map_location, trust_checkpoint=trust_checkpoint, mmap=False)
        except UntrustedCheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - any other failure means "not a weights file we can read"
            raise ValueError(f"{path}: cannot be read as a CLIP state dict ({type(e).__name__}: {e})") from e
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):  # open_clip / Lightning wrapper
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: not a CLIP state dict (expected a mapping of names to tensors, got {type(obj)})")
    sd = {}
    for k, v in obj.items():
        for prefix in _WRAPPER_PREFIXES:
            while k.startswith(prefix):
                k = k[len(prefix) :]
        sd[k] = v
    return sd, info


# -- architecture from shapes ---------------------------------------------------------------------------------
def _count_blocks(sd: Mapping[str, torch.Tensor], pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in sd if (m := rx.match(k))})


def infer_clip_config(sd: Mapping[str, torch.Tensor], *, activation: str = "quick_gelu") -> dict[str, Any]:
    """``CLIP`` keyword arguments for a state dict in OpenAI's key layout (ViT or ModifiedResNet image tower).

    Heads are ``width // 64`` (OpenAI's rule; open_clip's H/g/bigG vision widths use their own 16 heads).
    """
    required = ("text_projection", "token_embedding.weight", "positional_embedding", "ln_final.weight")
    missing = [k for k in required if k not in sd]
    is_vit = "visual.conv1.weight" in sd and "visual.class_embedding" in sd and "visual.proj" in sd
    is_resnet = "visual.attnpool.c_proj.weight" in sd and "visual.layer1.0.conv1.weight" in sd
    if missing or not (is_vit or is_resnet):
        sample = sorted(sd)[:8]
        if any(k.startswith("visual.") for k in sd) and any(k.startswith("text.") for k in sd):
            hint = "; a dalle2 CLIP state dict? export ours with save_safetensors and load with load_safetensors"
        else:
            hint = ""
        raise ValueError(
            "not a CLIP checkpoint in OpenAI/open_clip layout: expected 'text_projection', 'token_embedding.weight', "
            f"'positional_embedding', 'ln_final.weight' and a 'visual.' ViT or ResNet tower; found e.g. {sample}{hint}"
        )
    text_width = sd["ln_final.weight"].shape[0]
    cfg: dict[str, Any] = dict(
        embed_dim=sd["text_projection"].shape[1],
        context_length=sd["positional_embedding"].shape[0],
        vocab_size=sd["token_embedding.weight"].shape[0],
        text_width=text_width,
        text_layers=_count_blocks(sd, r"^transformer\.resblocks\.(\d+)\."),
        text_heads=max(1, text_width // 64),
        activation=activation,
    )
    if is_vit:
        width, _, patch, _ = sd["visual.conv1.weight"].shape
        grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        cfg.update(
            image_size=patch * grid,
            vision_width=width,
            vision_layers=_count_blocks(sd, r"^visual\.transformer\.resblocks\.(\d+)\."),
            vision_heads=_VISION_HEADS_BY_WIDTH.get(width, max(1, width // 64)),
            vision_patch_size=patch,
        )
    else:
        width = sd["visual.layer1.0.conv1.weight"].shape[0]
        grid = round((sd["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
        cfg.update(
            image_size=grid * 32,
            vision_width=width,
            vision_layers=[_count_blocks(sd, rf"^visual\.layer{i}\.(\d+)\.") for i in range(1, 5)],
            vision_heads=width * 32 // 64,
            vision_patch_size=None,
        )
    return cfg


def openai_to_dalle2_key(key: str) -> str:
    """Rename one OpenAI/open_clip CLIP key onto ``dalle2.clip.model.CLIP``."""
    if key == "text_projection":
        return "text.proj"
    if key == "positional_embedding" or key.startswith(_TEXT_PREFIXES):
        key = "text." + key
    if ".resblocks." in key:
        for old, new in _BLOCK_RENAMES:
            key = key.replace(old, new)
    return key


def clip_from_openai_state_dict(
    sd: Mapping[str, torch.Tensor], *, activation: str = "quick_gelu", source: str = "state dict", **overrides: Any
) -> CLIP:
    """Build ``CLIP`` from a state dict in OpenAI's layout and load it strictly (float32 weights).

    ``overrides`` replace inferred config entries (e.g. ``vision_heads`` for an unusual head width).
    """
    sd = {k: v for k, v in sd.items() if k not in _OPENAI_META_KEYS and not k.endswith("attn_mask")}
    config = {**infer_clip_config(sd, activation=activation), **overrides}
    renamed = {openai_to_dalle2_key(k): k for k in sd}
    with torch.device("meta"):
        model = CLIP(**config)
    expected = model.state_dict()
    mapped = {}
    for new, old in renamed.items():
        v = sd[old]
        mapped[new] = v.float() if v.is_floating_point() else v
    for k in expected:  # BatchNorm counters are absent from some exports
        if k.endswith("num_batches_tracked") and k not in mapped:
            mapped[k] = torch.zeros((), dtype=torch.long)
    missing = sorted(set(expected) - set(mapped))
    unexpected = sorted(renamed[k] for k in set(mapped) - set(expected))
    shapes = sorted(
        f"{renamed.get(k, k)}: {tuple(mapped[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in mapped and mapped[k].shape != v.shape
    )
    if missing or unexpected or shapes:

        def fmt(items: list[str]) -> str:
            return ", ".join(items[:12]) + (f" ... (+{len(items) - 12})" if len(items) > 12 else "") or "none"

        raise ValueError(
            f"{source}: weights do not match the inferred CLIP architecture {config}: "
            f"missing keys: {fmt(missing)}; unexpected keys: {fmt(unexpected)}; shape mismatches: {fmt(shapes)}"
        )
    model.load_state_dict(mapped, strict=True, assign=True)
    return model.eval()


def load_clip_checkpoint(
    path: str | Path,
    *,
    map_location="cpu",
    activation: str | None = None,
    trust_checkpoint: bool = False,
    **overrides: Any,
) -> CLIP:
    """``CLIP`` (eval mode, float32) from OpenAI or open_clip weights, or from our own safetensors export.

    Reads OpenAI's TorchScript archives (``ViT-B-32.pt``), plain state dicts in OpenAI's key layout (``.pt``/
    ``.bin``/``.safetensors``, e.g. open_clip's ``open_clip_pytorch_model.bin``) and open_clip training
    checkpoints (``{"state_dict": ...}`` with ``module.`` prefixes).  ``activation`` defaults to ``"quick_gelu"``
    for OpenAI archives (TorchScript, or state dicts carrying OpenAI's ``input_resolution`` entry) and ``"gelu"``
    otherwise (open_clip's LAION models); pass ``activation="quick_gelu"`` for ``*-quickgelu`` open_clip models and
    OpenAI weights re-saved as plain state dicts.  A file that would run code when loaded raises
    ``UntrustedCheckpointError`` unless ``trust_checkpoint``.
    """
    path = Path(path)
    sd, info = _read_state_dict(path, map_location, trust_checkpoint)
    meta = info["safetensors_metadata"]
    if meta is not None and CONFIG_METADATA_KEY in meta:
        return load_safetensors(path, device=str(map_location))
    if activation is None:
        openai = info["torchscript"] or any(k in sd for k in _OPENAI_META_KEYS)
        activation = "quick_gelu" if openai else "gelu"
    return clip_from_openai_state_dict(sd, activation=activation, source=str(path), **overrides)


# -- safetensors ----------------------------------------------------------------------------------------------
def save_safetensors(model: CLIP, path: str | Path) -> None:
    """Write ``model``'s weights with its config (JSON) in the metadata; ``load_safetensors`` rebuilds it."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata={"format": "pt", CONFIG_METADATA_KEY: json.dumps(model.to_config())})


def load_safetensors(path: str | Path, *, device: str = "cpu") -> CLIP:
    """``CLIP`` (eval mode) from a ``save_safetensors`` file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CLIP safetensors file not found: {path}")
    with safe_open(str(path), framework="pt", device=device) as f:
        meta = f.metadata() or {}
        if CONFIG_METADATA_KEY not in meta:
            raise ValueError(
                f"{path}: no {CONFIG_METADATA_KEY!r} metadata; not a dalle2 CLIP safetensors file "
                "(OpenAI/open_clip-layout safetensors load with load_clip_checkpoint)"
            )
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    with torch.device("meta"):
        model = CLIP(**json.loads(meta[CONFIG_METADATA_KEY]))
    try:
        model.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not match the stored CLIP config: {e}") from e
    return model.eval()
