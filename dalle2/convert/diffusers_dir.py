"""Reading a diffusers-format pipeline directory without running code.

A directory holds ``model_index.json`` (component name -> [library, class]) and one folder per component with its
``config.json`` and weights: ``diffusion_pytorch_model.safetensors`` / ``model.safetensors`` (possibly sharded with a
``*.safetensors.index.json``), or the same names in ``.bin`` — read only through the weights-only loader
(:func:`dalle2.safe_load.torch_load`): a pickle that would run code is refused.  Every problem is one
:class:`ConversionError` line naming the file and what is missing or mismatched.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from dalle2.safe_load import torch_load

__all__ = ["ConversionError", "component_config", "component_weights", "read_json", "read_model_index"]

_WEIGHT_NAMES = ("diffusion_pytorch_model", "model", "pytorch_model")


class ConversionError(ValueError):
    """The source directory is not what the converter expects (one line: the file and what is wrong)."""


def read_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"missing {path}")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_model_index(src: str | Path, expected: dict[str, str]) -> dict[str, Any]:
    """``model_index.json`` of ``src``, checked to name every component of ``expected`` (name -> class)."""
    src = Path(src)
    if not src.is_dir():
        raise ConversionError(f"source directory not found: {src}")
    index = read_json(src / "model_index.json")
    missing = [name for name in expected if name not in index]
    if missing:
        raise ConversionError(
            f"{src / 'model_index.json'}: not a Karlo-shaped unCLIP pipeline: no component(s) {', '.join(missing)} "
            f"(expected {', '.join(expected)}; found {', '.join(k for k in index if not k.startswith('_'))})"
        )
    wrong = []
    for name, cls in expected.items():
        entry = index[name]
        found = entry[-1] if isinstance(entry, list) and entry else entry
        if found != cls:
            wrong.append(f"{name} is {found!r}, expected {cls!r}")
    if wrong:
        raise ConversionError(f"{src / 'model_index.json'}: not a Karlo-shaped unCLIP pipeline: {'; '.join(wrong)}")
    return index


def component_config(src: str | Path, name: str, filename: str = "config.json") -> dict[str, Any]:
    return read_json(Path(src) / name / filename)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - SafetensorError and friends
        raise ConversionError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None


def _read_bin(path: Path) -> dict[str, torch.Tensor]:
    obj = torch_load(path, trust_checkpoint=False, map_location="cpu")
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConversionError(f"{path}: not a state dict (a mapping of names to tensors)")
    return dict(obj)


def _sharded(index_path: Path, reader) -> dict[str, torch.Tensor]:
    weight_map = read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ConversionError(f"{index_path}: no weight_map")
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        out.update(reader(index_path.parent / shard))
    return out


def component_weights(src: str | Path, name: str) -> dict[str, torch.Tensor]:
    """The state dict of component ``name`` (float tensors as stored): safetensors first, then ``.bin`` (weights
    only), single file or sharded."""
    folder = Path(src) / name
    if not folder.is_dir():
        raise ConversionError(f"missing component folder {folder}")
    for ext, reader in ((".safetensors", _read_safetensors), (".bin", _read_bin)):
        for base in _WEIGHT_NAMES:
            single, index = folder / f"{base}{ext}", folder / f"{base}{ext}.index.json"
            if single.is_file():
                return reader(single)
            if index.is_file():
                return _sharded(index, reader)
        found = sorted(p for p in folder.glob(f"*{ext}") if p.is_file())
        if len(found) == 1:  # a variant (e.g. *.fp16.safetensors) as the only weights file
            return reader(found[0])
    raise ConversionError(
        f"{folder}: no weights (expected {_WEIGHT_NAMES[0]}.safetensors, model.safetensors or their .bin / sharded forms)"
    )


def load_converted(model, out: dict, *, unexpected: list[str], source: str, keep=frozenset()):
    """Load the converted state dict ``out`` into ``model`` strictly (``keep``: our keys the source does not hold,
    taken from the model as built) -> the model in eval mode; a ``ConversionError`` naming the missing, unexpected
    (``unexpected``: source keys nothing consumed) and mis-shaped weights first."""
    expected = model.state_dict()
    for key in keep:
        out.setdefault(key, expected[key])
    missing = sorted(set(expected) - set(out))
    shapes = [
        f"{k}: {tuple(out[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in out and out[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        raise ConversionError(
            f"{source}: weights do not match its config: missing {missing[:6]}, unexpected {unexpected[:6]}, "
            f"shape mismatches {shapes[:6]}"
        )
    model.load_state_dict({k: out[k] for k in expected}, strict=True)
    return model.eval()
