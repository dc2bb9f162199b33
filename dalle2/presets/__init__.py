"""The network presets, defined once: ``dalle2/presets/model/<kind>/<name>.yaml`` (shipped with the package, as
open_clip ships its model configs).  Hydra composes them as the ``model`` config group (``model=decoder/tiny32``;
``conf/config.yaml`` puts ``pkg://dalle2.presets`` on its search path), and Python reads the same files:
``load_preset("decoder", "tiny32")`` -> the keyword dict of the network's constructor (``CLIP``, ``PriorNetwork``,
``UNet``), whose keyword-only, typed signature is the schema.  Nothing else defines a preset."""

from __future__ import annotations

import functools
from importlib import resources
from typing import Any

import yaml

__all__ = ["KINDS", "load_preset", "preset_names"]

KINDS = ("clip", "prior", "decoder", "upsampler")


def _folder(kind: str):
    if kind not in KINDS:
        raise ValueError(f"unknown preset kind {kind!r}; expected one of {list(KINDS)}")
    return resources.files(__name__).joinpath("model", kind)


def preset_names(kind: str) -> list[str]:
    """The presets of ``kind`` (file names without ``.yaml``)."""
    return sorted(p.name[:-5] for p in _folder(kind).iterdir() if p.name.endswith(".yaml"))


@functools.cache
def _read(kind: str, name: str) -> dict[str, Any]:
    path = _folder(kind).joinpath(f"{name}.yaml")
    if not path.is_file():
        raise ValueError(f"unknown {kind} preset {name!r}; expected one of {preset_names(kind)}")
    return dict(yaml.safe_load(path.read_text()) or {})


def load_preset(kind: str, name: str, **overrides: Any) -> dict[str, Any]:
    """A copy of preset ``<kind>/<name>`` with ``overrides`` applied."""
    return {**_read(kind, name), **overrides}
