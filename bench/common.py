"""What the benchmark scripts share: ``key=value`` arguments, one builder per stage (network, diffusion, a random
batch with the training shapes, the training loss), timing with device synchronisation, machine facts.

The stage builders use the library's own pieces (``prior_from_preset``, ``unet_from_preset``, ``CLIP`` presets,
``build_diffusion`` and ``GaussianDiffusion.training_losses``, ``LowResAugmentation``, ``ClipLoss``) with the same
diffusion settings as ``conf/stage/*.yaml``, so a benchmarked step computes what a training step computes, minus
Lightning's bookkeeping.
"""

from __future__ import annotations

import json

import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dalle2.clip.loss import ClipLoss  # noqa: E402
from dalle2.clip.model import CLIP, clip_preset  # noqa: E402
from dalle2.decoder import PRESET_IMAGE_SIZES, UNET_PRESETS, unet_from_preset  # noqa: E402
from dalle2.diffusion import GaussianDiffusion, LowResAugmentation, Schedule  # noqa: E402
from dalle2.prior.network import EmbeddingScaler, prior_from_preset  # noqa: E402

STAGES = ("prior", "decoder", "upsampler", "clip")
DEFAULT_CONFIG = {"prior": "bench", "decoder": "bench", "upsampler": "bench", "clip": "tiny"}
# an upsampler config name (dalle2/presets/model/upsampler/<name>.yaml) -> its UNet preset, where the two differ
UPSAMPLER_PRESETS = {"bench": "sr_bench"}
DEFAULT_BATCH = {"prior": 32, "decoder": 8, "upsampler": 4, "clip": 64}
# the low-res side of each SR preset (the output side is PRESET_IMAGE_SIZES)
LOWRES_SIZES = {"sr_bench": 32, "tiny_sr32_64": 32, "sr64_256": 64, "sr256_1024": 256}
# dense bf16 tensor-core peak (TFLOP/s) by GPU name fragment (first match wins), for MFU; override with
# peak_tflops=...  (fp32 runs are still divided by the bf16 peak: MFU is against what the GPU can do)
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H200": 989.0, "H100": 989.0, "GH200": 989.0,
                    "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 70.0, "4090": 165.0}
# diffusion settings of conf/stage/*.yaml
DIFFUSION = {
    "prior": {"schedule": "cosine", "num_timesteps": 1000, "objective": "x0"},
    "decoder": {"schedule": "cosine", "num_timesteps": 1000, "objective": "eps"},
    "upsampler": {"schedule": "linear", "num_timesteps": 1000, "objective": "eps"},
}


def emit(result: Any, out: str | None) -> Any:
    """Print a benchmark's result as JSON and, with ``out``, write it to that file too."""
    print(json.dumps(result, indent=2))
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=2)
    return result


def parse_kv(argv: list[str], defaults: dict[str, Any]) -> dict[str, Any]:
    """``["stage=prior", "batch=8", "--out", "f.json"]`` -> dict; values are cast to the default's type."""
    out = dict(defaults)
    it = iter(argv)
    for arg in it:
        if arg.startswith("--"):
            key = arg[2:].replace("-", "_")
            if "=" in key:
                key, value = key.split("=", 1)
            else:
                value = next(it, None)
                if value is None:
                    raise SystemExit(f"{arg} needs a value")
        elif "=" in arg:
            key, value = arg.split("=", 1)
        else:
            raise SystemExit(f"expected key=value, got {arg!r}")
        if key not in out:
            raise SystemExit(f"unknown argument {key!r}; expected one of {sorted(out)}")
        default = out[key]
        if isinstance(default, bool):
            out[key] = value.lower() in ("1", "true", "yes", "on")
        elif isinstance(default, int):
            out[key] = int(value)
        elif isinstance(default, float):
            out[key] = float(value)
        else:
            out[key] = None if value.lower() in ("", "none", "null") else value
    return out


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    try:
        info["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {"peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30, "memory_kind": "cuda_max_allocated"}
    # ru_maxrss is KiB on Linux, bytes on macOS
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024
    return {"peak_memory_gib": rss * scale / 2**30, "memory_kind": "cpu_max_rss"}


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return float(override)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def time_steps(fns: list[Callable[[], Any]], *, steps: int, warmup: int, device: torch.device) -> list[list[float]]:
    """Run each fn ``warmup`` times, then ``steps`` timed rounds that interleave the fns (so load drift hits every
    variant alike); -> per-fn lists of seconds."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    sync(device)
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(steps):
        for i, fn in enumerate(fns):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[i].append(time.perf_counter() - t0)
    return times


def summarize(times: list[float]) -> dict[str, float]:
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return {"s_per_step": statistics.median(times), "min_s": min(times), "q1_s": q[0], "q3_s": q[2]}


# ---------------------------------------------------------------------------------------------------------------
# stages


@dataclass
class StageSetup:
    """A network, how to make a random training batch for it, and the training loss on such a batch."""

    stage: str
    config: str
    net: torch.nn.Module
    make_batch: Callable[[], dict[str, Any]]
    loss: Callable[[torch.nn.Module, dict[str, Any]], dict[str, torch.Tensor]]
    diffusion: GaussianDiffusion | None = None
    sample_shape: tuple[int, ...] = ()
    info: dict[str, Any] = field(default_factory=dict)


def build_diffusion(stage: str, learned_variance: bool = False) -> GaussianDiffusion:
    cfg = dict(DIFFUSION[stage])
    return GaussianDiffusion(
        schedule=Schedule.make(cfg.pop("schedule"), cfg.pop("num_timesteps")),
        learned_variance=learned_variance,
        **cfg,
    )


def _text(b: int, length: int, dim: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randn(b, length, dim, device=device)
    lengths = torch.randint(1, length + 1, (b,), device=device)
    return tokens, torch.arange(length, device=device)[None] < lengths[:, None]


def setup_prior(config: str, batch: int, device: torch.device, *, clip_dim: int = 512, text_len: int = 77) -> StageSetup:
    net = prior_from_preset(config, embed_dim=None if "embed_dim" in _prior_preset(config) else clip_dim,
                            text_token_dim=None if "text_token_dim" in _prior_preset(config) else clip_dim)
    diffusion = build_diffusion("prior")
    scaler = EmbeddingScaler.for_dim(net.embed_dim)
    d, dt = net.embed_dim, net.text_token_dim

    def make_batch() -> dict[str, Any]:
        tokens, mask = _text(batch, text_len, dt, device)
        return {"img_emb": torch.randn(batch, d, device=device), "txt_emb": torch.randn(batch, d, device=device),
                "txt_tokens": tokens, "text_mask": mask}

    def loss(model, b: dict) -> dict[str, torch.Tensor]:
        # as PriorModule.training_step: scaled unit-norm image embedding, CFG text drop with p = 0.1
        x0 = scaler.scale_embed(b["img_emb"])
        drop = torch.rand(batch, device=device) < 0.1
        kw = {"text_embed": b["txt_emb"], "text_tokens": b["txt_tokens"], "text_mask": b["text_mask"], "drop_text": drop}
        return diffusion.training_losses(model, x0, model_kwargs=kw)

    return StageSetup("prior", config, net, make_batch, loss, diffusion, (batch, d), {"text_len": text_len})


def _prior_preset(config: str) -> dict:
    from dalle2.prior.network import PRIOR_PRESETS

    return PRIOR_PRESETS[config]


def setup_decoder(config: str, batch: int, device: torch.device, *, clip_dim: int = 512, text_len: int = 77,
                  channels_last: bool = False) -> StageSetup:
    preset = UNET_PRESETS[config]
    net = unet_from_preset(config, **({} if "clip_dim" in preset else {"clip_dim": clip_dim}))
    diffusion = build_diffusion("decoder", learned_variance=net.learned_variance)
    size = PRESET_IMAGE_SIZES[config]
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def make_batch() -> dict[str, Any]:
        out = {"image": (torch.rand(batch, 3, size, size, device=device) * 2 - 1).contiguous(memory_format=fmt),
               "img_emb": torch.randn(batch, net.clip_dim, device=device)}
        if net.text_dim is not None:
            out["txt_tokens"], out["text_mask"] = _text(batch, text_len, net.text_dim, device)
        return out

    def loss(model, b: dict) -> dict[str, torch.Tensor]:
        # as DecoderModule.model_kwargs(train=True): unit-norm embedding, drops p = 0.1 (image) / 0.5 (text)
        u = torch.rand(2, batch, device=device)
        kw = {"image_embed": F.normalize(b["img_emb"].float(), dim=-1), "drop_image_embed": u[0] < 0.1}
        if "txt_tokens" in b:
            kw.update(text_tokens=b["txt_tokens"], text_mask=b["text_mask"], drop_text=u[1] < 0.5)
        return diffusion.training_losses(model, b["image"], model_kwargs=kw)

    return StageSetup("decoder", config, net, make_batch, loss, diffusion, (batch, 3, size, size),
                      {"image_size": size, "text_len": text_len if net.text_dim else 0})


def setup_upsampler(config: str, batch: int, device: torch.device, *, channels_last: bool = False) -> StageSetup:
    config = UPSAMPLER_PRESETS.get(config, config)
    net = unet_from_preset(config)
    diffusion = build_diffusion("upsampler", learned_variance=net.learned_variance)
    size, low = PRESET_IMAGE_SIZES[config], LOWRES_SIZES.get(config, PRESET_IMAGE_SIZES[config] // 4)
    aug = LowResAugmentation(schedule=Schedule.make("linear", 1000), max_train_level=250)
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def make_batch() -> dict[str, Any]:
        return {"image": (torch.rand(batch, 3, size, size, device=device) * 2 - 1).contiguous(memory_format=fmt)}

    def loss(model, b: dict) -> dict[str, torch.Tensor]:
        # as UpsamplerModule.model_kwargs(train=True): antialiased bicubic downsample, blur + noise augmentation
        hi = b["image"]
        lo = F.interpolate(hi, size=(low, low), mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)
        lo, level = aug(lo.contiguous(memory_format=fmt), train=True)
        return diffusion.training_losses(model, hi, model_kwargs={"lowres_image": lo, "lowres_aug_level": level})

    return StageSetup("upsampler", config, net, make_batch, loss, diffusion, (batch, 3, size, size),
                      {"image_size": size, "lowres_size": low})


def setup_clip(config: str, batch: int, device: torch.device) -> StageSetup:
    kwargs = clip_preset(config)
    net = CLIP(**kwargs)
    criterion = ClipLoss()
    size, ctx, vocab = kwargs["image_size"], kwargs["context_length"], kwargs["vocab_size"]

    def make_batch() -> dict[str, Any]:
        tokens = torch.randint(1, vocab - 1, (batch, ctx), device=device)
        lengths = torch.randint(2, ctx + 1, (batch,), device=device)
        pos = torch.arange(ctx, device=device)[None]
        tokens = torch.where(pos < lengths[:, None], tokens, torch.zeros_like(tokens))
        tokens.scatter_(1, (lengths - 1)[:, None], vocab - 1)  # EOT (the largest id) ends each caption
        return {"image": torch.randn(batch, 3, size, size, device=device), "tokens": tokens}

    def loss(model, b: dict) -> dict[str, torch.Tensor]:
        out = model(b["image"], b["tokens"])
        return criterion(out["image_features"], out["text_features"], out["logit_scale"])

    return StageSetup("clip", config, net, make_batch, loss, None, (), {"image_size": size, "text_len": ctx})


def setup_stage(stage: str, config: str | None, batch: int | None, device: torch.device, *,
                channels_last: bool = False) -> StageSetup:
    if stage not in STAGES:
        raise SystemExit(f"unknown stage {stage!r}; expected one of {STAGES}")
    config = config or DEFAULT_CONFIG[stage]
    batch = batch or DEFAULT_BATCH[stage]
    if stage == "prior":
        s = setup_prior(config, batch, device)
    elif stage == "decoder":
        s = setup_decoder(config, batch, device, channels_last=channels_last)
    elif stage == "upsampler":
        s = setup_upsampler(config, batch, device, channels_last=channels_last)
    else:
        s = setup_clip(config, batch, device)
    s.net.to(device)
    if channels_last and stage in ("decoder", "upsampler"):
        s.net.to(memory_format=torch.channels_last)
    s.info["batch"] = batch
    return s
