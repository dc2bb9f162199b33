"""Karlo's diffusers configs and weight names -> ours: the architecture checks (every config entry our networks
cannot express is a :class:`ConversionError` naming it) and the name maps of the UNet blocks, used by
:mod:`dalle2.convert.karlo`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from dalle2.convert.diffusers_dir import ConversionError, load_converted

_RES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_proj.1",
    "norm2": "out_norm",
    "conv2": "out_layers.2",
    "conv_shortcut": "skip",
}
_ATTN = {"group_norm": "norm", "to_out.0": "proj"}
_FUSED_ATTN = {"qkv": ("to_q", "to_k", "to_v"), "context_kv": ("add_k_proj", "add_v_proj")}


# ----------------------------------------------------------------------------------------------- config checks


def _require(config: Mapping[str, Any], source: str, checks: Mapping[str, Callable[[Any], bool] | Any]) -> None:
    bad = []
    for key, want in checks.items():
        value = config.get(key)
        ok = want(value) if callable(want) else value == want
        if not ok:
            bad.append(f"{key}={value!r}" + ("" if callable(want) else f" (expected {want!r})"))
    if bad:
        raise ConversionError(f"{source}: not Karlo-shaped: {'; '.join(bad)}")


def _single(value, what: str, source: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ConversionError(f"{source}: per-block {what} {list(value)} is not supported (one value for all)")
        value = value[0]
    return int(value)


def _channels(config: Mapping[str, Any], source: str) -> tuple[int, list[int]]:
    boc = [int(c) for c in config["block_out_channels"]]
    if any(c % boc[0] for c in boc):
        raise ConversionError(f"{source}: block_out_channels {boc} are not multiples of the first")
    return boc[0], [c // boc[0] for c in boc]


def _emb_mode(config: Mapping[str, Any]) -> str:
    """diffusers' ``resnet_time_scale_shift`` -> our :class:`~dalle2.decoder.adm_unet.ADMResBlock` ``emb_mode``."""
    return "scale_shift" if config.get("resnet_time_scale_shift") == "scale_shift" else "add"


def _common_unet_checks(config: Mapping[str, Any], source: str) -> None:
    _require(
        config,
        source,
        {
            "resnet_time_scale_shift": lambda v: v in (None, "default", "scale_shift"),
            "act_fn": lambda v: v in (None, "silu"),
            "flip_sin_to_cos": lambda v: v in (None, True),
            "freq_shift": lambda v: v in (None, 0),
            "norm_eps": lambda v: v is None or abs(float(v) - 1e-5) < 1e-12,
            "mid_block_scale_factor": lambda v: v in (None, 1, 1.0),
            "resnet_out_scale_factor": lambda v: v in (None, 1, 1.0),
            "resnet_skip_time_act": lambda v: v in (None, False),
            "center_input_sample": lambda v: v in (None, False),
            "time_embedding_type": lambda v: v in (None, "positional"),
            "time_embedding_dim": lambda v: v is None or int(v) == 4 * int(config["block_out_channels"][0]),
            "conv_in_kernel": lambda v: v in (None, 3),
            "conv_out_kernel": lambda v: v in (None, 3),
            "layers_per_block": lambda v: isinstance(v, int) or len(set(v)) == 1,
        },
    )


# ----------------------------------------------------------------------------------------------- name maps


def _put(out: dict, key: str, value: torch.Tensor) -> None:
    if key in out:
        raise ConversionError(f"two source weights map onto {key}")
    out[key] = value.float().contiguous()


def _map_block(sd: Mapping, used: set, src: str, dst: str, kind: str, out: dict) -> None:
    """Copy one resnet / attention block ``src.*`` onto ``dst.*`` (fusing q/k/v and the added k/v)."""
    names = _RES if kind == "res" else _ATTN
    for a, b in names.items():
        for p in ("weight", "bias"):
            key = f"{src}.{a}.{p}"
            if key in sd:
                _put(out, f"{dst}.{b}.{p}", sd[key])
                used.add(key)
    if kind == "attn":
        for fused, parts in _FUSED_ATTN.items():
            for p in ("weight", "bias"):
                keys = [f"{src}.{part}.{p}" for part in parts]
                if all(k in sd for k in keys):
                    _put(out, f"{dst}.{fused}.{p}", torch.cat([sd[k] for k in keys]))
                    used.update(keys)


def _map_unet_body(
    sd: Mapping, used: set, *, levels: int, blocks: int, attn: set, mid_attention: bool, out: dict, dst: str
):
    """diffusers' UNet (ResnetDownsample / SimpleCrossAttn blocks) -> :class:`ADMUNet` under ``dst``."""

    def direct(src: str, ours: str) -> None:
        for p in ("weight", "bias"):
            if f"{src}.{p}" in sd:
                _put(out, f"{dst}.{ours}.{p}", sd[f"{src}.{p}"])
                used.add(f"{src}.{p}")

    direct("conv_in", "input_conv")
    direct("conv_norm_out", "out.0")
    direct("conv_out", "out.2")
    i = 0
    for level in range(levels):
        for j in range(blocks):
            _map_block(sd, used, f"down_blocks.{level}.resnets.{j}", f"{dst}.down.{i}.0", "res", out)
            if level in attn:
                _map_block(sd, used, f"down_blocks.{level}.attentions.{j}", f"{dst}.down.{i}.1", "attn", out)
            i += 1
        if level < levels - 1:
            _map_block(sd, used, f"down_blocks.{level}.downsamplers.0", f"{dst}.down.{i}.0", "res", out)
            i += 1
    _map_block(sd, used, "mid_block.resnets.0", f"{dst}.middle.0", "res", out)
    if mid_attention:
        _map_block(sd, used, "mid_block.attentions.0", f"{dst}.middle.1", "attn", out)
    _map_block(sd, used, "mid_block.resnets.1", f"{dst}.middle.{2 if mid_attention else 1}", "res", out)
    i = 0
    for u in range(levels):
        level = levels - 1 - u
        for j in range(blocks + 1):
            _map_block(sd, used, f"up_blocks.{u}.resnets.{j}", f"{dst}.up.{i}.0", "res", out)
            if level in attn:
                _map_block(sd, used, f"up_blocks.{u}.attentions.{j}", f"{dst}.up.{i}.1", "attn", out)
            if level > 0 and j == blocks:
                _map_block(
                    sd, used, f"up_blocks.{u}.upsamplers.0", f"{dst}.up.{i}.{2 if level in attn else 1}", "res", out
                )
            i += 1


def _time_embedding(sd: Mapping, used: set, out: dict, dst: str) -> None:
    for a, b in (("linear_1", "mlp.0"), ("linear_2", "mlp.2")):
        for p in ("weight", "bias"):
            key = f"time_embedding.{a}.{p}"
            if key in sd:
                _put(out, f"{dst}.{b}.{p}", sd[key])
                used.add(key)


def _load_strict(model: torch.nn.Module, out: dict, sd: Mapping, used: set, source: str, keep: set = frozenset()):
    return load_converted(model, out, unexpected=sorted(k for k in sd if k not in used), source=source, keep=keep)
