"""Karlo (Kakao Brain's unCLIP, in diffusers' format) -> our stages: name maps, architecture checks, exports.

    python -m dalle2.convert karlo src=<dir with model_index.json> out=<dir> [check=true] [force=true]

``src`` is a diffusers ``UnCLIPPipeline`` directory: ``prior/`` (``PriorTransformer``), ``text_proj/``
(``UnCLIPTextProjModel``), ``decoder/`` (``UNet2DConditionModel``), ``super_res_first/`` and ``super_res_last/``
(``UNet2DModel``), ``text_encoder/`` (``CLIPTextModelWithProjection``), ``tokenizer/`` (``CLIPTokenizer``) and the
three ``UnCLIPScheduler`` configs.  ``out`` receives our exports (``python -m dalle2.export``'s format: safetensors
with the JSON config in its metadata, plus the JSON beside it) — ``clip`` (the text tower and its vocabulary),
``prior``, ``decoder`` and ``upsampler`` — and ``pipeline.json`` naming them with Karlo's sampling settings (the
diffusers pipeline's defaults), so ``UnCLIPPipeline.from_dir(out)`` and ``eval/sample.py pipeline=out`` load it whole.

The networks are :class:`dalle2.prior.karlo.KarloPrior`, :class:`dalle2.decoder.karlo.KarloDecoderUNet` (the text
projection is part of it) and :class:`dalle2.decoder.karlo.KarloSuperRes`; every weight is mapped by name, every
config entry our networks cannot express is a :class:`ConversionError` naming it.  The unconditional branch of
classifier-free guidance (the CLIP encoding of the empty prompt in Karlo's pipeline) is computed here with the
converted text tower and stored in the prior's and the decoder's ``null_text_*`` weights.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from dalle2.clip.model import CLIP
from dalle2.clip.tokenizer import Tokenizer
from dalle2.convert.clip_text import convert_clip_text, load_tokenizer_dir
from dalle2.convert.diffusers_dir import (
    ConversionError,
    component_config,
    component_weights,
    read_model_index,
)
from dalle2.convert.karlo_names import (
    _channels,
    _common_unet_checks,
    _emb_mode,
    _load_strict,
    _map_unet_body,
    _put,
    _require,
    _single,
    _time_embedding,
)
from dalle2.decoder.karlo import KarloDecoderUNet, KarloSuperRes
from dalle2.export import write_export_files
from dalle2.prior.karlo import KarloPrior

__all__ = [
    "COMPONENTS",
    "ConversionError",
    "KARLO_V1_ALPHA",
    "PIPELINE_FILE",
    "convert_karlo",
    "decoder_from_diffusers",
    "prior_from_diffusers",
    "super_res_from_diffusers",
]

COMPONENTS = {
    "prior": "PriorTransformer",
    "text_proj": "UnCLIPTextProjModel",
    "decoder": "UNet2DConditionModel",
    "super_res_first": "UNet2DModel",
    "super_res_last": "UNet2DModel",
    "text_encoder": "CLIPTextModelWithProjection",
    "tokenizer": "CLIPTokenizer",
    "prior_scheduler": "UnCLIPScheduler",
    "decoder_scheduler": "UnCLIPScheduler",
    "super_res_scheduler": "UnCLIPScheduler",
}
# Karlo v1 alpha's published shapes as our network keywords (what convert_karlo builds from its configs: diffusers'
# conversion script's PriorTransformer defaults, DECODER_CONFIG + the text projection, the two super-resolution
# UNet2DModels) — for bench/scale_plan.py config=karlo; a conversion reads the source directory's own configs.
_KARLO_SR_UNET = dict(in_channels=3, model_channels=320, channel_mult=[1, 2, 3, 4], num_res_blocks=3, emb_mode="add")
KARLO_V1_ALPHA: dict[str, tuple[str, dict[str, Any]]] = {
    "prior": ("karlo_prior", dict(arch="karlo", embed_dim=768, text_token_dim=768, heads=32, dim_head=64, depth=20)),
    "decoder": (
        "karlo_decoder64",
        dict(
            arch="karlo",
            model_channels=320,
            channel_mult=[1, 2, 3, 4],
            num_res_blocks=3,
            attention_levels=[1, 2, 3],
            head_channels=64,
            clip_dim=768,
            text_dim=768,
            context_dim=1536,
            num_image_tokens=4,
            learned_variance=True,
        ),
    ),
    "upsampler": ("karlo_sr64_256", dict(arch="karlo_sr", first=_KARLO_SR_UNET, last=_KARLO_SR_UNET)),
}
PIPELINE_FILE = "pipeline.json"
PIPELINE_FORMAT = "dalle2.pipeline"

# ----------------------------------------------------------------------------------------------- components


def prior_from_diffusers(
    sd: Mapping[str, torch.Tensor], config: Mapping[str, Any], *, source: str = "prior"
) -> KarloPrior:
    """``PriorTransformer`` weights + config -> :class:`KarloPrior` (its null text still zero: see :func:`set_null_text`)."""
    defaults = {"encoder_hid_proj_type": "linear", "added_emb_type": "prd", "time_embed_act_fn": "silu"}
    cfg = {**defaults, **{k: v for k, v in config.items() if not (k in defaults and k not in config)}}
    width = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    _require(
        cfg,
        f"{source}/config.json",
        {
            "additional_embeddings": lambda v: v in (None, 4),
            "time_embed_act_fn": "silu",
            "norm_in_type": None,
            "embedding_proj_norm_type": None,
            "encoder_hid_proj_type": "linear",
            "added_emb_type": "prd",
            "time_embed_dim": lambda v: v is None or int(v) == width,
            "embedding_proj_dim": lambda v: v is None or int(v) == int(config["embedding_dim"]),
            "clip_embed_dim": lambda v: v is None or int(v) == int(config["embedding_dim"]),
        },
    )
    net = KarloPrior(
        embed_dim=int(config["embedding_dim"]),
        heads=int(config["num_attention_heads"]),
        dim_head=int(config["attention_head_dim"]),
        depth=int(config["num_layers"]),
        max_text_len=int(config["num_embeddings"]),
        dropout=float(config.get("dropout", 0.0) or 0.0),
    )
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(src: str, dst: str, fn=lambda v: v) -> None:
        if src in sd:
            _put(out, dst, fn(sd[src]))
            used.add(src)

    take("positional_embedding", "pos_embed", lambda v: v.reshape(v.shape[-2], v.shape[-1]))
    take("prd_embedding", "prd_token", lambda v: v.reshape(-1))
    take("clip_mean", "clip_mean", lambda v: v.reshape(-1))
    take("clip_std", "clip_std", lambda v: v.reshape(-1))
    _time_embedding(sd, used, out, "time_embed")
    for a, b in (
        ("proj_in", "x_proj"),
        ("embedding_proj", "text_embed_proj"),
        ("encoder_hidden_states_proj", "text_token_proj"),
        ("norm_out", "ln_final"),
        ("proj_to_clip_embeddings", "out_proj"),
    ):
        for p in ("weight", "bias"):
            take(f"{a}.{p}", f"{b}.{p}")
    for i in range(net.config["depth"]):
        s, d = f"transformer_blocks.{i}", f"blocks.{i}"
        for a, b in (
            ("norm1", "ln_1"),
            ("attn1.to_out.0", "attn.proj"),
            ("norm3", "ln_2"),
            ("ff.net.0.proj", "mlp.fc"),
            ("ff.net.2", "mlp.proj"),
        ):
            for p in ("weight", "bias"):
                take(f"{s}.{a}.{p}", f"{d}.{b}.{p}")
        for p in ("weight", "bias"):
            keys = [f"{s}.attn1.to_{c}.{p}" for c in "qkv"]
            if all(k in sd for k in keys):
                _put(out, f"{d}.attn.qkv.{p}", torch.cat([sd[k] for k in keys]))
                used.update(keys)
    return _load_strict(net, out, sd, used, source, keep={"null_text_embed", "null_text_tokens", "null_text_mask"})


def decoder_from_diffusers(
    unet_sd: Mapping[str, torch.Tensor],
    unet_config: Mapping[str, Any],
    proj_sd: Mapping[str, torch.Tensor],
    proj_config: Mapping[str, Any],
    *,
    text_dim: int | None = None,
    max_text_len: int = 77,
    source: str = "decoder",
) -> KarloDecoderUNet:
    """``UNet2DConditionModel`` + ``UnCLIPTextProjModel`` -> :class:`KarloDecoderUNet` (null text still zero)."""
    src = f"{source}/config.json"
    _common_unet_checks(unet_config, src)
    down, up = list(unet_config["down_block_types"]), list(unet_config["up_block_types"])
    kinds = {"ResnetDownsampleBlock2D": False, "SimpleCrossAttnDownBlock2D": True}
    if any(t not in kinds for t in down):
        raise ConversionError(f"{src}: not Karlo-shaped: down_block_types {down} (expected {sorted(kinds)})")
    mirror = [t.replace("Down", "Up").replace("Downsample", "Upsample") for t in reversed(down)]
    mirror = [t.replace("ResnetUpBlock2D", "ResnetUpsampleBlock2D") for t in mirror]
    if up != mirror:
        raise ConversionError(f"{src}: not Karlo-shaped: up_block_types {up} do not mirror down_block_types {down}")
    _require(
        unet_config,
        src,
        {
            "mid_block_type": "UNetMidBlock2DSimpleCrossAttn",
            "resnet_time_scale_shift": "scale_shift",
            "class_embed_type": "identity",
            "only_cross_attention": lambda v: v in (None, False) or (isinstance(v, list) and not any(v)),
            "cross_attention_norm": None,
            "encoder_hid_dim": None,
            "addition_embed_type": None,
            "time_cond_proj_dim": None,
            "timestep_post_act": None,
            "dual_cross_attention": lambda v: v in (None, False),
        },
    )
    mc, mult = _channels(unet_config, src)
    in_ch, out_ch = int(unet_config["in_channels"]), int(unet_config["out_channels"])
    if out_ch not in (in_ch, 2 * in_ch):
        raise ConversionError(f"{src}: out_channels {out_ch} is neither in_channels nor twice it (learned variance)")
    context_dim = int(unet_config["cross_attention_dim"])
    _require(
        proj_config,
        "text_proj/config.json",
        {
            "cross_attention_dim": context_dim,
            "time_embed_dim": 4 * mc,
        },
    )
    clip_dim = int(proj_config["clip_embeddings_dim"])
    net = KarloDecoderUNet(
        in_channels=in_ch,
        model_channels=mc,
        channel_mult=tuple(mult),
        num_res_blocks=_single(unet_config["layers_per_block"], "layers_per_block", src),
        attention_levels=tuple(i for i, t in enumerate(down) if kinds[t]),
        mid_attention=True,
        head_channels=_single(unet_config.get("attention_head_dim", 8), "attention_head_dim", src),
        norm_groups=int(unet_config.get("norm_num_groups", 32)),
        clip_dim=clip_dim,
        text_dim=clip_dim if text_dim is None else int(text_dim),
        context_dim=context_dim,
        num_image_tokens=int(proj_config.get("clip_extra_context_tokens", 4)),
        max_text_len=max_text_len,
        learned_variance=out_ch == 2 * in_ch,
    )
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    _time_embedding(unet_sd, used, out, "time_embed")
    _map_unet_body(
        unet_sd,
        used,
        levels=len(mult),
        blocks=net.config["num_res_blocks"],
        attn=set(net.config["attention_levels"]),
        mid_attention=True,
        out=out,
        dst="body",
    )
    proj_used: set[str] = set()
    for a, b in (
        ("embedding_proj", "text_embed_to_time"),
        ("clip_image_embeddings_project_to_time_embeddings", "image_to_time"),
        ("clip_extra_context_tokens_proj", "image_to_tokens"),
        ("encoder_hidden_states_proj", "text_proj"),
        ("text_encoder_hidden_states_norm", "text_norm"),
    ):
        for p in ("weight", "bias"):
            if f"{a}.{p}" in proj_sd:
                _put(out, f"{b}.{p}", proj_sd[f"{a}.{p}"])
                proj_used.add(f"{a}.{p}")
    if "learned_classifier_free_guidance_embeddings" in proj_sd:
        _put(out, "null_image_embed", proj_sd["learned_classifier_free_guidance_embeddings"])
        proj_used.add("learned_classifier_free_guidance_embeddings")
    leftover = sorted(k for k in proj_sd if k not in proj_used)
    if leftover:
        raise ConversionError(f"text_proj: unexpected weights {leftover[:6]}")
    return _load_strict(net, out, unet_sd, used, source, keep={"null_text_embed", "null_text_tokens", "null_text_mask"})


def _sr_config(config: Mapping[str, Any], source: str) -> dict[str, Any]:
    src = f"{source}/config.json"
    _common_unet_checks(config, src)
    n = len(config["block_out_channels"])
    _require(
        config,
        src,
        {
            "down_block_types": lambda v: list(v) == ["ResnetDownsampleBlock2D"] * n,
            "up_block_types": lambda v: list(v) == ["ResnetUpsampleBlock2D"] * n,
            "add_attention": False,
            "class_embed_type": None,
            "num_class_embeds": None,
            "mid_block_type": lambda v: v in (None, "UNetMidBlock2D"),
            "in_channels": lambda v: int(v) == 2 * int(config["out_channels"]),
        },
    )
    mc, mult = _channels(config, src)
    return dict(
        in_channels=int(config["out_channels"]),
        model_channels=mc,
        channel_mult=mult,
        num_res_blocks=_single(config["layers_per_block"], "layers_per_block", src),
        mid_attention=False,
        norm_groups=int(config.get("norm_num_groups", 32)),
        emb_mode=_emb_mode(config),
    )


def super_res_from_diffusers(
    first_sd: Mapping[str, torch.Tensor],
    first_config: Mapping[str, Any],
    last_sd: Mapping[str, torch.Tensor],
    last_config: Mapping[str, Any],
) -> KarloSuperRes:
    """``super_res_first`` + ``super_res_last`` (``UNet2DModel``) -> :class:`KarloSuperRes`."""
    first, last = _sr_config(first_config, "super_res_first"), _sr_config(last_config, "super_res_last")
    net = KarloSuperRes(first=first, last=last)
    out: dict[str, torch.Tensor] = {}
    used_all: set[str] = set()
    for part, sd, cfg in (("first", first_sd, first), ("last", last_sd, last)):
        used: set[str] = set()
        _time_embedding(sd, used, out, f"{part}.time_embed")
        _map_unet_body(
            sd,
            used,
            levels=len(cfg["channel_mult"]),
            blocks=cfg["num_res_blocks"],
            attn=set(),
            mid_attention=False,
            out=out,
            dst=f"{part}.body",
        )
        leftover = sorted(k for k in sd if k not in used)
        if leftover:
            raise ConversionError(f"super_res_{part}: unexpected weights {leftover[:6]}")
        used_all |= {f"{part}:{k}" for k in used}
    return _load_strict(net, out, {}, set(), "super_res")


@torch.no_grad()
def set_null_text(net: torch.nn.Module, clip: CLIP, tokenizer: Tokenizer) -> None:
    """Karlo's unconditional branch: the CLIP encoding of the empty prompt, into ``net``'s ``null_text_*``."""
    feats = clip.encode_text_features(tokenizer([""], context_length=net.null_text_tokens.shape[0]))
    net.null_text_embed.copy_(feats.embed[0].float())
    net.null_text_tokens.copy_(feats.tokens[0].float())
    net.null_text_mask.copy_(feats.mask[0])


# ----------------------------------------------------------------------------------------------- schedulers


def _scheduler(src: Path, name: str, *, learned: bool) -> tuple[dict, float | None]:
    """(diffusion dict, x0 clip range or None) of one ``UnCLIPScheduler`` config."""
    cfg = component_config(src, name, "scheduler_config.json")
    _require(cfg, f"{name}/scheduler_config.json", {"beta_schedule": lambda v: v in (None, "squaredcos_cap_v2")})
    variance = cfg.get("variance_type", "fixed_small_log")
    if variance != ("learned_range" if learned else "fixed_small_log"):
        want = "learned_range" if learned else "fixed_small_log"
        raise ConversionError(f"{name}/scheduler_config.json: variance_type {variance!r}, its network needs {want!r}")
    objective = {"epsilon": "eps", "sample": "x0"}.get(cfg.get("prediction_type", "epsilon"))
    if objective is None:
        raise ConversionError(f"{name}/scheduler_config.json: prediction_type {cfg.get('prediction_type')!r}")
    diffusion = {
        "schedule": "cosine",
        "num_timesteps": int(cfg.get("num_train_timesteps", 1000)),
        "objective": objective,
    }
    clip = float(cfg.get("clip_sample_range", 1.0)) if cfg.get("clip_sample", True) else None
    return diffusion, clip


# ----------------------------------------------------------------------------------------------- writing


def _write_export(path: Path, *, stage: str, hparams: dict, tensors: dict, vocabulary=None, source: dict) -> None:
    weights = "model" if stage == "clip" else "ema"
    write_export_files(
        path.with_suffix(".safetensors"),
        path.with_suffix(".json"),
        stage=stage,
        weights=weights,
        hparams=hparams,
        tensors=tensors,
        vocabulary=vocabulary,
        source=source,
    )


def karlo_sampling_defaults(prior_steps: int = 25, decoder_steps: int = 25, sr_steps: int = 7) -> dict[str, Any]:
    """diffusers' ``UnCLIPPipeline.__call__`` defaults (prior 25 steps at guidance 4, decoder 25 at 8, super-resolution
    7), with Karlo's sampler; one prior sample per prompt (no reranking) and no low-res augmentation."""
    return {
        "prior": {"steps": prior_steps, "sampler": "unclip", "guidance_scale": 4.0, "eta": 0.0},
        "decoder": {"steps": decoder_steps, "sampler": "unclip", "guidance_scale": 8.0, "eta": 0.0},
        "upsampler": {"steps": sr_steps, "sampler": "unclip", "guidance_scale": 1.0, "eta": 0.0},
        "n_prior_samples": 1,
        "threshold": "static",
        "upsampler_aug_level": 0,
    }


def convert_karlo(src: str | Path, out: str | Path, *, force: bool = False) -> Path:
    """Convert the diffusers-format Karlo directory ``src`` into ``out`` (see the module docstring); returns the
    path of ``out/pipeline.json``."""
    src, out = Path(src), Path(out)
    read_model_index(src, COMPONENTS)
    names = ("clip", "prior", "decoder", "upsampler")
    existing = [
        str(out / f"{n}{ext}") for n in names for ext in (".safetensors", ".json") if (out / f"{n}{ext}").exists()
    ]
    if (out / PIPELINE_FILE).exists():
        existing.append(str(out / PIPELINE_FILE))
    if existing and not force:
        raise FileExistsError(
            f"{', '.join(existing[:3])}{' ...' if len(existing) > 3 else ''} exists: pass force=true to replace"
        )

    tokenizer = load_tokenizer_dir(src / "tokenizer", name="karlo")
    vocab = tokenizer.vocabulary
    clip = convert_clip_text(component_weights(src, "text_encoder"), component_config(src, "text_encoder"))
    if clip.config["vocab_size"] != tokenizer.vocab_size:
        raise ConversionError(
            f"text_encoder has {clip.config['vocab_size']} token embeddings, the tokenizer {tokenizer.vocab_size} ids"
        )
    text_width, embed_dim = clip.config["text_width"], clip.config["embed_dim"]

    prior_cfg = component_config(src, "prior")
    prior = prior_from_diffusers(component_weights(src, "prior"), prior_cfg)
    if prior.embed_dim != embed_dim or prior.text_token_dim != text_width:
        raise ConversionError(
            f"prior works on CLIP embeddings of {prior.embed_dim} / text states of {prior.text_token_dim}, the text "
            f"encoder gives {embed_dim} / {text_width}"
        )
    unet_cfg = component_config(src, "decoder")
    decoder = decoder_from_diffusers(
        component_weights(src, "decoder"),
        unet_cfg,
        component_weights(src, "text_proj"),
        component_config(src, "text_proj"),
        text_dim=text_width,
        max_text_len=clip.context_length,
    )
    if decoder.clip_dim != embed_dim:
        raise ConversionError(
            f"text_proj takes CLIP embeddings of {decoder.clip_dim}, the text encoder gives {embed_dim}"
        )
    first_cfg, last_cfg = component_config(src, "super_res_first"), component_config(src, "super_res_last")
    sr = super_res_from_diffusers(
        component_weights(src, "super_res_first"), first_cfg, component_weights(src, "super_res_last"), last_cfg
    )
    for net in (prior, decoder):
        set_null_text(net, clip, tokenizer)

    prior_diff, prior_clip = _scheduler(src, "prior_scheduler", learned=False)
    dec_diff, dec_clip = _scheduler(src, "decoder_scheduler", learned=decoder.learned_variance)
    sr_diff, sr_clip = _scheduler(src, "super_res_scheduler", learned=False)
    for name, c in (("decoder_scheduler", dec_clip), ("super_res_scheduler", sr_clip)):
        if c != 1.0:
            raise ConversionError(f"{name}: clip_sample_range {c} (our decoder and upsampler clip x0 to [-1, 1])")
    lowres = int(unet_cfg.get("sample_size", 64))
    highres = int(first_cfg.get("sample_size", 4 * lowres))

    out.mkdir(parents=True, exist_ok=True)
    source = {"file": str(src.resolve().name), "converter": "dalle2.convert.karlo"}
    _write_export(
        out / "clip",
        stage="clip",
        hparams={"network": clip.to_config()},
        tensors=clip.state_dict(),
        vocabulary=vocab,
        source=source,
    )
    _write_export(
        out / "prior",
        stage="prior",
        hparams={
            "network": prior.config,
            "diffusion": prior_diff,
            "use_text_tokens": True,
            "x0_clip": prior_clip,
            "cond_drop_prob": 0.1,
        },
        tensors=prior.state_dict(),
        vocabulary=vocab,
        source=source,
    )
    _write_export(
        out / "decoder",
        stage="decoder",
        hparams={
            "network": decoder.config,
            "diffusion": {**dec_diff, "learned_variance": decoder.learned_variance},
            "image_size": lowres,
            "use_text": True,
        },
        tensors=decoder.state_dict(),
        vocabulary=vocab,
        source=source,
    )
    _write_export(
        out / "upsampler",
        stage="upsampler",
        hparams={
            "network": sr.config,
            "diffusion": sr_diff,
            "lowres_size": lowres,
            "image_size": highres,
            "sample_aug_level": 0,
            # fine-tuning: clean low-res inputs (Karlo's SR has no augmentation-level input); override to augment
            "lowres_aug": {"blur_sigma": [0.4, 0.6], "blur_prob": 0.0, "max_train_level": 0},
            "sample_spacing": "unclip",
        },
        tensors=sr.state_dict(),
        source=source,
    )
    pipeline = {
        "format": PIPELINE_FORMAT,
        "version": 1,
        "clip": "clip.safetensors",
        "prior": "prior.safetensors",
        "decoder": "decoder.safetensors",
        "upsamplers": ["upsampler.safetensors"],
        "sampling": karlo_sampling_defaults(),
        "source": {**source, "kind": "karlo"},
    }
    path = out / PIPELINE_FILE
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(pipeline, indent=2) + "\n")
    os.replace(tmp, path)
    return path
