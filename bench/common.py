"""What the benchmark scripts share: ``key=value`` arguments, one builder per stage (network, diffusion, a random
batch with the training shapes, the training loss), timing with device synchronisation, machine facts.

The diffusion stages' steps are built by the stages' own LightningModules (``training_inputs``: the target and the
conditioning with the CFG drops / low-res augmentation, then ``diffusion.training_losses``) with the diffusion
settings of ``conf/stage/*.yaml``, so a benchmarked step computes what a training step computes, minus Lightning's
bookkeeping; CLIP's is ``CLIP`` + ``ClipLoss``.
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dalle2.clip.loss import ClipLoss  # noqa: E402
from dalle2.clip.model import CLIP, clip_preset  # noqa: E402
from dalle2.decoder import PRESET_IMAGE_SIZES, UNET_PRESETS  # noqa: E402
from dalle2.diffusion import GaussianDiffusion  # noqa: E402
from dalle2.prior.network import PRIOR_PRESETS  # noqa: E402

STAGES = ("prior", "decoder", "upsampler", "clip")
DEFAULT_CONFIG = {"prior": "bench", "decoder": "bench", "upsampler": "bench", "clip": "tiny"}
# an upsampler config name (dalle2/presets/model/upsampler/<name>.yaml) -> its UNet preset, where the two differ
UPSAMPLER_PRESETS = {"bench": "sr_bench"}
DEFAULT_BATCH = {"prior": 32, "decoder": 8, "upsampler": 4, "clip": 64}
# the low-res side of each SR preset (the output side is PRESET_IMAGE_SIZES)
LOWRES_SIZES = {"sr_bench": 32, "tiny_sr32_64": 32, "sr64_256": 64, "sr256_1024": 256}
# dense bf16 tensor-core peak (TFLOP/s) by GPU name fragment (first match wins), for MFU; override with
# peak_tflops=...  (fp32 runs are still divided by the bf16 peak: MFU is against what the GPU can do)
PEAK_BF16_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H200": 989.0,
    "H100": 989.0,
    "GH200": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10G": 70.0,
    "4090": 165.0,
}
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
    """A network, how to make a random training batch for it, and the training loss on such a batch; for the
    diffusion stages ``module`` is the stage's real LightningModule, whose ``training_inputs`` builds the step."""

    stage: str
    config: str
    net: torch.nn.Module
    make_batch: Callable[[], dict[str, Any]]
    loss: Callable[[torch.nn.Module, dict[str, Any]], dict[str, torch.Tensor]]
    diffusion: GaussianDiffusion | None = None
    sample_shape: tuple[int, ...] = ()
    info: dict[str, Any] = field(default_factory=dict)
    module: Any = None

    def conditioning(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The network's keyword arguments for ``batch`` with nothing dropped (what a sampler passes)."""
        return self.module.training_inputs(batch, train=False)[1]


def _text(b: int, length: int, dim: int, vocab: int, device) -> dict[str, torch.Tensor]:
    """Random CLIP text: token ids (0-padded after a random length) and per-token states."""
    lengths = torch.randint(1, length + 1, (b,), device=device)
    ids = torch.randint(1, vocab, (b, length), device=device)
    ids = torch.where(torch.arange(length, device=device)[None] < lengths[:, None], ids, torch.zeros_like(ids))
    return {"tokens": ids, "txt_tokens": torch.randn(b, length, dim, device=device)}


def _stage_setup(stage: str, config: str, module, make_batch, sample_shape, info) -> StageSetup:
    """A StageSetup over a real LightningModule: the loss is its ``training_inputs`` through the diffusion's
    ``training_losses`` (the model argument lets the benchmark pass a compiled / channels-last network)."""
    module.ema = None  # the benchmark keeps its own EMA (ema=0|1); the module's copy would only cost memory

    def loss(model, b: dict) -> dict[str, torch.Tensor]:
        x0, kw = module.training_inputs(b, train=True)
        return module.diffusion.training_losses(model, x0, model_kwargs=kw)

    return StageSetup(stage, config, module.net, make_batch, loss, module.diffusion, sample_shape, info, module)


def setup_prior(
    config: str, batch: int, device: torch.device, *, clip_dim: int = 512, text_len: int = 77
) -> StageSetup:
    from dalle2.lit.prior_module import PriorModule

    network = {"embed_dim": clip_dim, "text_token_dim": clip_dim, **PRIOR_PRESETS[config]}
    module = PriorModule(network=network, diffusion=DIFFUSION["prior"]).to(device)
    d, dt = module.net.embed_dim, module.net.text_token_dim

    def make_batch() -> dict[str, Any]:
        return {
            "img_emb": torch.randn(batch, d, device=device),
            "txt_emb": torch.randn(batch, d, device=device),
            **_text(batch, text_len, dt, 8192, device),
        }

    return _stage_setup("prior", config, module, make_batch, (batch, d), {"text_len": text_len})


def setup_decoder(
    config: str,
    batch: int,
    device: torch.device,
    *,
    clip_dim: int = 512,
    text_len: int = 77,
    channels_last: bool = False,
) -> StageSetup:
    from dalle2.lit.decoder_module import DecoderModule

    network = {"clip_dim": clip_dim, **UNET_PRESETS[config]}
    size = PRESET_IMAGE_SIZES[config]
    module = DecoderModule(
        network=network,
        diffusion=DIFFUSION["decoder"],
        image_size=size,
        use_text=network.get("text_dim") is not None,
        channels_last=channels_last,
    ).to(device)
    net = module.net

    def make_batch() -> dict[str, Any]:
        out = {
            "image": torch.rand(batch, 3, size, size, device=device) * 2 - 1,
            "img_emb": torch.randn(batch, net.clip_dim, device=device),
        }
        if net.text_dim is not None:
            out.update(_text(batch, text_len, net.text_dim, 8192, device))
        else:
            out["tokens"] = torch.zeros(batch, text_len, dtype=torch.long, device=device)
        return out

    return _stage_setup(
        "decoder",
        config,
        module,
        make_batch,
        (batch, 3, size, size),
        {"image_size": size, "text_len": text_len if net.text_dim else 0},
    )


def setup_upsampler(
    config: str, batch: int, device: torch.device, *, channels_last: bool = False, crop: int = 0
) -> StageSetup:
    from dalle2.lit.decoder_module import UpsamplerModule

    config = UPSAMPLER_PRESETS.get(config, config)
    size, low = PRESET_IMAGE_SIZES[config], LOWRES_SIZES.get(config, PRESET_IMAGE_SIZES[config] // 4)
    module = UpsamplerModule(
        network=UNET_PRESETS[config],
        diffusion=DIFFUSION["upsampler"],
        lowres_size=low,
        image_size=size,
        lowres_aug={"max_train_level": 250},
        sample_aug_level=50,
        channels_last=channels_last,
        train_crop_size=crop or None,  # e.g. a quarter of the side, as the paper trains its SR stages
    ).to(device)

    def make_batch() -> dict[str, Any]:
        return {"image": torch.rand(batch, 3, size, size, device=device) * 2 - 1}

    side = crop or size
    return _stage_setup(
        "upsampler",
        config,
        module,
        make_batch,
        (batch, 3, side, side),
        {"image_size": size, "lowres_size": low, "train_crop_size": crop or None},
    )


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


def setup_stage(
    stage: str,
    config: str | None,
    batch: int | None,
    device: torch.device,
    *,
    channels_last: bool = False,
    crop: int = 0,
) -> StageSetup:
    if stage not in STAGES:
        raise SystemExit(f"unknown stage {stage!r}; expected one of {STAGES}")
    config = config or DEFAULT_CONFIG[stage]
    batch = batch or DEFAULT_BATCH[stage]
    if stage == "prior":
        s = setup_prior(config, batch, device)
    elif stage == "decoder":
        s = setup_decoder(config, batch, device, channels_last=channels_last)
    elif stage == "upsampler":
        s = setup_upsampler(config, batch, device, channels_last=channels_last, crop=crop)
    else:
        s = setup_clip(config, batch, device)
    s.net.to(device)
    if channels_last and stage in ("decoder", "upsampler"):
        s.net.to(memory_format=torch.channels_last)
    s.info["batch"] = batch
    return s
