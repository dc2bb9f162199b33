"""What a paper-size run costs before launching it: memory per GPU, the largest micro-batch that fits, step time at a
stated MFU, samples/s, GPU-hours for the paper's sample counts and the input bandwidth per node.

    python bench/scale_plan.py stage=decoder config=paper gpus=64 gpu=h100 strategy=fsdp
    python bench/scale_plan.py stage=all config=paper gpus=8,64,512 gpu=h100 strategy=fsdp --out plan.json

Prints one JSON object (``plans``: one per stage x GPU count) and writes the Markdown table to stderr (also in the
JSON as ``table``).

How each number is made:

* **Network**: built on the meta device (no memory, no init) from the model config that training uses,
  ``dalle2/presets/model/<stage>/<config>.yaml`` (``config=paper``: prior ``paper``, decoder ``base64``, upsampler ``sr64_256``;
  or any file name there, e.g. ``sr256_1024``; ``config=karlo``: Karlo v1 alpha's prior, 64 px decoder and 64->256
  super-resolution pair, as ``python -m dalle2.convert karlo`` builds them), cast to bf16 as under bf16 mixed
  precision.
* **FLOPs per sample**: ``torch.utils.flop_counter.FlopCounterMode`` over one forward and backward of the network
  (attention through a flash kernel, as on GPUs: :class:`FlashAttention`) at the training shapes (prior: 77 text tokens; decoder: 64 px; upsampler: ``crop`` x the output side, the paper's
  random crops), divided by the measured batch. Activation checkpointing adds one more forward.
* **Activations per sample**: the bytes of the tensors autograd saves for backward (``saved_tensors_hooks``,
  parameters and shared storages counted once) in that forward, divided by the batch and scaled linearly with the
  micro-batch. With activation checkpointing (per prior block / UNet stage, as ``grad_checkpointing=True`` does):
  what is saved outside the blocks + every block's inputs + the largest block's own activations (recomputed in
  backward, one block at a time).
* **State per GPU** (N parameters, G GPUs): fp32 weights 4N, fp32 gradients 4N, AdamW moments 8N, EMA 4N; DDP holds
  all of it on every GPU plus its gradient buckets (4N); FSDP (FSDP2, bf16 compute, fp32 master and reductions)
  shards all four by G and adds the unsharded bf16 weights of the root (parameters outside the blocks) and of two
  blocks (the current one and the prefetched one) plus one block's fp32 gradients for the reduce-scatter.
* **Fits**: state + micro-batch x activations <= memory x (1 - ``fragmentation``) - ``context_gib`` (CUDA context,
  NCCL buffers). ``ckpt=auto`` checkpoints only when fewer than ``min_micro`` samples (or the per-GPU share of the
  paper's batch, if smaller) fit without it.
* **Time**: compute per optimizer step = global batch x FLOPs/sample / (G x bf16 peak x ``mfu``). Communication per
  step, bandwidth-only (no latency), at ``nvlink_gbs`` GB/s per GPU within a node and ``net_gbps`` Gb/s per GPU
  across nodes: DDP one fp32 all-reduce of the gradients (2 x 4N (G-1)/G bytes); FSDP per micro-batch two bf16
  all-gathers of the weights (forward, backward: 2 x 2N (G-1)/G) and one fp32 reduce-scatter of the gradients per
  step (4N (G-1)/G). Step time = max(compute, communication) (overlap assumed; ``bound`` says which); samples/s,
  GPU-hours (iterations x step time x G) and days follow. The MFU is an assumption (default 0.40), not a
  measurement: measure yours with ``bench/train_step.py device=cuda precision=bf16`` and pass it.
* **Input**: samples/s per node (``gpus_per_node``) x bytes per sample (prior: fp16 image + text embeddings and 77
  token states, as in embedding shards; decoder / upsampler: one JPEG of ``image_kb`` + an fp16 image embedding).
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import PEAK_BF16_TFLOPS, emit, parse_kv  # noqa: E402
from dalle2.convert.karlo import KARLO_V1_ALPHA  # noqa: E402
from dalle2.decoder.blocks import Stage  # noqa: E402
from dalle2.decoder.networks import build_unet  # noqa: E402
from dalle2.prior.network import PriorBlock  # noqa: E402
from dalle2.prior.stage import build_prior_network  # noqa: E402

STAGES = ("prior", "decoder", "upsampler")
PAPER_CONFIG = {"prior": "paper", "decoder": "base64", "upsampler": "sr64_256"}
# (stage, config) of the four paper-size stages, for stage=all
PAPER_STAGES = (("prior", "paper"), ("decoder", "base64"), ("upsampler", "sr64_256"), ("upsampler", "sr256_1024"))

# DALL-E 2 (Ramesh et al. 2022, "Hierarchical Text-Conditional Image Generation with CLIP Latents"), appendix C,
# table "Hyperparameters for the models": batch size x iterations per model. Quoted from our reading of that table
# (not re-checked against the PDF in this session): diffusion prior 4096 x 600K, 64 px decoder 2048 x 800K,
# 64->256 upsampler 1024 x 1M, 256->1024 upsampler 512 x 1M; the upsamplers train on random crops of 1/4 the output
# side ("crop fraction 0.25"). Our networks differ from the paper's: the decoder has no GLIDE text transformer
# (~1.2 B of the paper's 3.5 B), the prior attends to 77 CLIP tokens (the paper: 256 text positions).
PAPER_SCHEDULE = {  # config -> (global batch, iterations)
    "paper": (4096, 600_000),
    "base64": (2048, 800_000),
    "sr64_256": (1024, 1_000_000),
    "sr256_1024": (512, 1_000_000),
}
# memory (GiB, nominal) and the name fragment of bench/common.py's bf16 peak table
GPUS = {
    "h100": (80, "H100"),
    "h200": (141, "H200"),
    "a100": (80, "A100"),
    "a100_40": (40, "A100"),
    "l40s": (48, "L40S"),
}
# output side of each upsampler config (the network is fully convolutional; training runs on crops)
UPSAMPLER_SIDES = {"sr64_256": 256, "sr256_1024": 1024, "tiny_sr32_64": 64, "bench": 128, "karlo_sr64_256": 256}
DEFAULTS = {
    "stage": "decoder",
    "config": "paper",
    "gpus": "64",
    "gpu": "h100",
    "strategy": "fsdp",
    "ckpt": "auto",
    "mfu": 0.40,
    "peak_tflops": 0.0,
    "memory_gib": 0.0,
    "fragmentation": 0.10,
    "context_gib": 2.0,
    "min_micro": 8,
    "measure_batch": 2,
    "crop": 0.25,
    "image_size": 0,
    "text_len": 77,
    "image_kb": 0.0,
    "gpus_per_node": 8,
    "global_batch": 0,
    "iterations": 0,
    "nvlink_gbs": 300.0,
    "net_gbps": 400.0,
    "out": None,
    "result": None,  # results/<name>.json: the plans and the table's rows with their provenance (dalle2.results)
}
GIB = 2**30


def model_config(stage: str, config: str) -> tuple[str, dict]:
    """The keyword arguments of preset ``model/<stage>/<config>`` (``dalle2/presets``; ``config=paper``: the stage's
    paper preset; ``config=karlo``: Karlo v1 alpha's published shapes, ``dalle2.convert.karlo.KARLO_V1_ALPHA``)."""
    from dalle2.presets import load_preset, preset_names

    if config == "karlo":
        name, kwargs = KARLO_V1_ALPHA[stage]
        return name, dict(kwargs)
    name = PAPER_CONFIG[stage] if config == "paper" else config
    if name not in preset_names(stage):
        raise SystemExit(f"no model preset {stage}/{name}; expected one of {preset_names(stage)} (or paper)")
    return name, load_preset(stage, name)


def build_network(stage: str, kwargs: dict, device: str = "meta") -> torch.nn.Module:
    """The stage's network in bf16, training mode, on ``device`` (meta: shapes only, nothing allocated)."""
    with torch.device(device):
        net = build_prior_network(kwargs) if stage == "prior" else build_unet(kwargs)
    if getattr(net, "arch", None) == "karlo_sr":  # Karlo's super-resolution pair: fine-tuning trains `first`
        net = net.first  # (`last`, the same size, stays frozen: add its weights + EMA, 8 bytes a parameter)
    return net.to(torch.bfloat16).train()


def training_inputs(
    stage: str, net: torch.nn.Module, batch: int, *, image_size: int, text_len: int, device: str = "meta"
) -> tuple:
    """``(args, kwargs)`` of one training forward at the training shapes, bf16, on ``device`` (meta: no memory)."""
    dev, bf16 = torch.device(device), torch.bfloat16
    t = torch.zeros(batch, dtype=torch.long, device=dev)
    if stage == "prior":
        d = net.embed_dim
        kw = {
            "text_embed": torch.randn(batch, d, device=dev, dtype=bf16),
            "text_tokens": torch.randn(batch, text_len, net.text_token_dim, device=dev, dtype=bf16),
            "text_mask": torch.ones(batch, text_len, dtype=torch.bool, device=dev),
            "drop_text": torch.zeros(batch, dtype=torch.bool, device=dev),
        }
        return (torch.randn(batch, d, device=dev, dtype=bf16), t), kw
    x = torch.randn(batch, 3, image_size, image_size, device=dev, dtype=bf16)
    if stage == "decoder":
        kw = {
            "image_embed": torch.randn(batch, net.clip_dim, device=dev, dtype=bf16),
            "drop_image_embed": torch.zeros(batch, dtype=torch.bool, device=dev),
        }
        if getattr(net, "arch", None) == "karlo":  # Karlo's decoder: 77 CLIP token states and the pooled embedding
            kw.update(
                text_embed=torch.randn(batch, net.clip_dim, device=dev, dtype=bf16),
                text_tokens=torch.randn(batch, text_len, net.text_dim, device=dev, dtype=bf16),
                text_mask=torch.ones(batch, text_len, dtype=torch.bool, device=dev),
                drop_text=torch.zeros(batch, dtype=torch.bool, device=dev),
            )
        return (x, t), kw
    low = image_size // 4
    return (x, t), {
        "lowres_image": torch.randn(batch, 3, low, low, device=dev, dtype=bf16),
        "lowres_aug_level": torch.zeros(batch, dtype=torch.long, device=dev),
    }


_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
# FLOPs of that kernel (FlopCounterMode has formulas for the CUDA attention kernels only)
_FLASH_FLOPS = {
    _FLASH: lambda q, k, v, *args, out_shape=None, **kw: sdpa_flop_count(q, k, v),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: lambda g, q, k, v, *args, out_shape=None, **kw: (
        sdpa_backward_flop_count(g, q, k, v)
    ),
}


class FlashAttention(TorchFunctionMode):
    """Every ``F.scaled_dot_product_attention`` through a flash-attention kernel, also on the meta device (whose
    default is the math path, which keeps the (L x L) attention weights for backward): what autograd saves is then
    the output and the log-sum-exp, as with the GPU's flash / memory-efficient kernels."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and not kwargs.get("enable_gqa", False):
            q, k, v = args[:3]
            mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
            dropout = kwargs.get("dropout_p", args[4] if len(args) > 4 else 0.0)
            causal = kwargs.get("is_causal", args[5] if len(args) > 5 else False)
            if mask is not None and mask.dtype == torch.bool:  # the kernel takes an additive mask
                mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
            return _FLASH(q, k, v, dropout, causal, attn_mask=mask, scale=kwargs.get("scale"))[0]
        return func(*args, **kwargs)


@dataclass
class Measurement:
    params: int
    root_params: int  # parameters outside the checkpoint/sharding units
    largest_unit_params: int
    units: int
    fwd_flops: float  # per sample
    train_flops: float  # forward + backward, per sample
    act_bytes: float  # saved for backward, per sample
    act_bytes_ckpt: float  # with per-unit activation checkpointing, per sample


def measure(net: torch.nn.Module, args: tuple, kwargs: dict, batch: int) -> Measurement:
    """FLOPs and saved-activation bytes of one forward + backward (see the module docstring)."""
    units = [m for m in net.modules() if isinstance(m, (PriorBlock, Stage))]
    params = {p.untyped_storage()._cdata for p in net.parameters()}
    saved: dict[int, int] = {}  # storage -> bytes
    owner: dict[int, int] = {}  # storage -> unit index saved in (-1: outside every unit)
    inputs: list[dict[int, int]] = [{} for _ in units]
    current = [-1]

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s._cdata not in params and s._cdata not in saved:
            saved[s._cdata], owner[s._cdata] = s.nbytes(), current[0]
        return t

    def pre(i):
        def hook(module, args):
            for a in args:
                if isinstance(a, torch.Tensor):
                    inputs[i][a.untyped_storage()._cdata] = a.untyped_storage().nbytes()
            current[0] = i

        return hook

    def post(module, args, out):
        current[0] = -1

    handles = [
        h for i, u in enumerate(units) for h in (u.register_forward_pre_hook(pre(i)), u.register_forward_hook(post))
    ]
    try:
        with FlopCounterMode(display=False, custom_mapping=_FLASH_FLOPS) as counter, FlashAttention():
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = net(*args, **kwargs)
            fwd = counter.get_total_flops()
            out.float().square().mean().backward()
        total = counter.get_total_flops()
    finally:
        for h in handles:
            h.remove()
    inside = [0] * len(units)
    outside = 0
    for storage, nbytes in saved.items():
        if owner[storage] >= 0:
            inside[owner[storage]] += nbytes
        else:
            outside += nbytes
    unit_inputs = sum(sum(d.values()) for d in inputs)
    ckpt = outside + unit_inputs + max(inside, default=0)
    unit_params = [sum(p.numel() for p in u.parameters()) for u in units]
    n = sum(p.numel() for p in net.parameters())
    return Measurement(
        params=n,
        root_params=n - sum(unit_params),
        largest_unit_params=max(unit_params, default=0),
        units=len(units),
        fwd_flops=fwd / batch,
        train_flops=total / batch,
        act_bytes=sum(saved.values()) / batch,
        act_bytes_ckpt=ckpt / batch,
    )


def state_bytes(m: Measurement, strategy: str, gpus: int) -> dict[str, float]:
    """Bytes per GPU of weights, gradients, optimizer, EMA and communication / unsharded buffers."""
    n = m.params
    if strategy == "ddp":
        return {"weights": 4.0 * n, "gradients": 4.0 * n, "optimizer": 8.0 * n, "ema": 4.0 * n, "comm": 4.0 * n}
    if strategy != "fsdp":
        raise SystemExit(f"unknown strategy {strategy!r}; expected ddp or fsdp")
    unsharded = 2.0 * (m.root_params + 2 * m.largest_unit_params) + 4.0 * m.largest_unit_params
    return {
        "weights": 4.0 * n / gpus,
        "gradients": 4.0 * n / gpus,
        "optimizer": 8.0 * n / gpus,
        "ema": 4.0 * n / gpus,
        "comm": unsharded,
    }


def comm_seconds(params: int, strategy: str, gpus: int, *, accumulation: int, gbs: float) -> float:
    """Bandwidth-only time of one optimizer step's collectives per GPU (see the module docstring)."""
    if gpus <= 1:
        return 0.0
    share = (gpus - 1) / gpus
    if strategy == "ddp":
        nbytes = 2 * 4.0 * params * share
    else:
        nbytes = accumulation * 2 * 2.0 * params * share + 4.0 * params * share
    return nbytes / (gbs * 1e9)


def fit(
    m: Measurement, strategy: str, gpus: int, *, memory_gib: float, fragmentation: float, context_gib: float, ckpt: bool
) -> dict[str, Any]:
    state = state_bytes(m, strategy, gpus)
    usable = memory_gib * GIB * (1 - fragmentation) - context_gib * GIB
    per_sample = m.act_bytes_ckpt if ckpt else m.act_bytes
    room = usable - sum(state.values())
    micro = max(0, math.floor(room / per_sample)) if per_sample > 0 else 0
    return {
        "ckpt": ckpt,
        "state_bytes": state,
        "state_gib": sum(state.values()) / GIB,
        "usable_gib": usable / GIB,
        "activation_bytes_per_sample": per_sample,
        "max_micro_batch": micro,
        "total_gib_at_max": (sum(state.values()) + micro * per_sample) / GIB,
    }


def plan_one(stage: str, config: str, gpus: int, o: dict[str, Any], m: Measurement | None = None) -> dict[str, Any]:
    name, kwargs = model_config(stage, config)
    if stage == "upsampler":
        side = o["image_size"] or round(UPSAMPLER_SIDES.get(name, 256) * o["crop"])
    else:
        side = o["image_size"] or 64
    if m is None:
        net = build_network(stage, kwargs)
        args, kw = training_inputs(stage, net, o["measure_batch"], image_size=side, text_len=o["text_len"])
        m = measure(net, args, kw, o["measure_batch"])
    memory_gib, peak_name = GPUS[o["gpu"]] if o["gpu"] in GPUS else (None, None)
    if memory_gib is None and not (o["memory_gib"] and o["peak_tflops"]):
        raise SystemExit(f"unknown gpu {o['gpu']!r}; expected one of {sorted(GPUS)} (or memory_gib= and peak_tflops=)")
    memory_gib = o["memory_gib"] or memory_gib
    peak = (o["peak_tflops"] or next(v for k, v in PEAK_BF16_TFLOPS.items() if k == peak_name)) * 1e12
    fit_kw = dict(memory_gib=memory_gib, fragmentation=o["fragmentation"], context_gib=o["context_gib"])
    memory = {
        s: {"no_ckpt": fit(m, s, gpus, ckpt=False, **fit_kw), "ckpt": fit(m, s, gpus, ckpt=True, **fit_kw)}
        for s in ("ddp", "fsdp")
    }
    batch, iters = PAPER_SCHEDULE.get(name, (0, 0))
    batch, iters = o["global_batch"] or batch or 256 * gpus, o["iterations"] or iters or 100_000
    per_gpu = math.ceil(batch / gpus)
    chosen = memory[o["strategy"]]
    if o["ckpt"] == "auto":
        use_ckpt = chosen["no_ckpt"]["max_micro_batch"] < min(o["min_micro"], per_gpu)
    else:
        use_ckpt = o["ckpt"].lower() in ("1", "true", "yes", "on")
    mem = chosen["ckpt" if use_ckpt else "no_ckpt"]
    micro = min(mem["max_micro_batch"], per_gpu)
    flops = m.train_flops + (m.fwd_flops if use_ckpt else 0.0)
    compute_s = batch * flops / (gpus * peak * o["mfu"])
    accumulation = math.ceil(per_gpu / micro) if micro else 1
    comm_s = comm_seconds(
        m.params,
        o["strategy"],
        gpus,
        accumulation=accumulation,
        gbs=o["nvlink_gbs"] if gpus <= o["gpus_per_node"] else o["net_gbps"] / 8,
    )
    step_s = max(compute_s, comm_s)
    rate = batch / step_s  # samples/s over all GPUs
    samples = batch * iters
    gpu_hours = iters * step_s * gpus / 3600
    if o["image_kb"]:
        image_kb = o["image_kb"]
    else:
        image_kb = 250.0 if name == "sr256_1024" else 20.0
    if stage == "prior":
        sample_bytes = 2 * (2 * kwargs["embed_dim"] + o["text_len"] * kwargs["text_token_dim"]) + 256
    else:
        sample_bytes = image_kb * 1024 + 2 * kwargs.get("clip_dim", 0) + 256
    nodes = max(1, gpus // o["gpus_per_node"])
    return {
        "stage": stage,
        "config": name,
        "gpus": gpus,
        "gpu": o["gpu"],
        "strategy": o["strategy"],
        "params": m.params,
        "train_shape": {"text_len": o["text_len"]} if stage == "prior" else {"image_size": side},
        "units": m.units,
        "largest_unit_params": m.largest_unit_params,
        "root_params": m.root_params,
        "flops_per_sample": {
            "forward": m.fwd_flops,
            "train": m.train_flops,
            "train_with_ckpt": m.train_flops + m.fwd_flops,
        },
        "activation_bytes_per_sample": {"no_ckpt": m.act_bytes, "ckpt": m.act_bytes_ckpt},
        "memory_gib": memory_gib,
        "memory": memory,
        "chosen": {
            "ckpt": use_ckpt,
            "max_micro_batch": mem["max_micro_batch"],
            "micro_batch": micro,
            "fits": micro >= 1,
            "accumulation": accumulation if micro else None,
            "bytes": {**mem["state_bytes"], "activations": micro * mem["activation_bytes_per_sample"]},
        },
        "paper": {"global_batch": batch, "iterations": iters, "samples": samples},
        "mfu": o["mfu"],
        "peak_tflops": peak / 1e12,
        "compute_s_per_step": compute_s,
        "comm_s_per_step": comm_s,
        "step_time_s": step_s,
        "bound": "compute" if compute_s >= comm_s else "communication",
        "samples_per_s": rate,
        "gpu_hours": gpu_hours,
        "days": gpu_hours / gpus / 24,
        "input": {
            "bytes_per_sample": sample_bytes,
            "samples_per_s_per_node": rate / nodes,
            "mb_per_s_per_node": rate / nodes * sample_bytes / 1e6,
        },
    }


COLUMNS = (
    "stage",
    "params",
    "GPUs",
    "strategy",
    "act. ckpt",
    "weights+grads+optim+EMA / GPU",
    "activations / sample",
    "max micro-batch: chosen (ddp, fsdp+ckpt)",
    "step (s)",
    "samples/s",
    "GPU-hours",
    "days",
    "input / node",
)


def table_rows(plans: list[dict]) -> list[dict[str, str]]:
    """One row of display strings per plan (the Markdown table's cells, and a results file's ``rows``)."""
    rows = []
    for p in plans:
        c, b = p["chosen"], p["chosen"]["bytes"]
        state = (b["weights"] + b["gradients"] + b["optimizer"] + b["ema"]) / GIB
        act = p["memory"][p["strategy"]]["ckpt" if c["ckpt"] else "no_ckpt"]["activation_bytes_per_sample"] / 2**20
        fits = f"{c['max_micro_batch']}" if c["fits"] else "**does not fit**"
        ddp = p["memory"]["ddp"]["ckpt" if c["ckpt"] else "no_ckpt"]["max_micro_batch"]
        fits += f" ({ddp or 'does not fit'}, {p['memory']['fsdp']['ckpt']['max_micro_batch']})"
        step = f"{p['step_time_s']:.2f}" + (" comm-bound" if p["bound"] == "communication" else "")
        cells = (
            f"{p['stage']}/{p['config']}",
            f"{p['params'] / 1e9:.2f} B",
            str(p["gpus"]),
            p["strategy"],
            "yes" if c["ckpt"] else "no",
            f"{state:.1f} GiB (+{b['comm'] / GIB:.1f} buffers)",
            f"{act:.0f} MiB",
            fits,
            step,
            f"{p['samples_per_s']:,.0f}",
            f"{p['gpu_hours']:,.0f}",
            f"{p['days']:.1f}",
            f"{p['input']['mb_per_s_per_node']:.0f} MB/s",
        )
        rows.append(dict(zip(COLUMNS, cells)))
    return rows


def table(plans: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row.values()) + " |" for row in table_rows(plans)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    o = parse_kv(sys.argv[1:] if argv is None else argv, DEFAULTS)
    if o["strategy"] not in ("ddp", "fsdp"):
        raise SystemExit(f"unknown strategy {o['strategy']!r}; expected ddp or fsdp")
    if o["stage"] == "all":
        targets = list(PAPER_STAGES) if o["config"] == "paper" else [(s, o["config"]) for s in STAGES]
    elif o["stage"] in STAGES:
        targets = [(o["stage"], o["config"])]
    else:
        raise SystemExit(f"unknown stage {o['stage']!r}; expected one of {STAGES} or all")
    gpu_counts = [int(g) for g in str(o["gpus"]).split(",")]
    plans = []
    for stage, config in targets:
        m = None
        for g in gpu_counts:
            plans.append(plan_one(stage, config, g, o, m))
            m = _measurement(plans[-1])
    md = table(plans)
    print(md, file=sys.stderr)
    result = {
        "plans": plans,
        "table": md,
        "assumptions": {
            "mfu": o["mfu"],
            "fragmentation": o["fragmentation"],
            "context_gib": o["context_gib"],
            "nvlink_gbs": o["nvlink_gbs"],
            "net_gbps": o["net_gbps"],
            "gpus_per_node": o["gpus_per_node"],
            "precision": "bf16 compute, fp32 master weights / gradients / AdamW moments / EMA",
            "paper_schedule": {k: {"global_batch": b, "iterations": i} for k, (b, i) in PAPER_SCHEDULE.items()},
        },
    }
    if o["result"]:
        from dalle2.results import write_result

        write_result(o["result"], {"rows": table_rows(plans), "plans": plans, "assumptions": result["assumptions"]})
    return emit(result, o["out"])


def _measurement(plan: dict) -> Measurement:
    """The measurement a plan was made from (so that other GPU counts reuse it)."""
    return Measurement(
        params=plan["params"],
        root_params=plan["root_params"],
        largest_unit_params=plan["largest_unit_params"],
        units=plan["units"],
        fwd_flops=plan["flops_per_sample"]["forward"],
        train_flops=plan["flops_per_sample"]["train"],
        act_bytes=plan["activation_bytes_per_sample"]["no_ckpt"],
        act_bytes_ckpt=plan["activation_bytes_per_sample"]["ckpt"],
    )


if __name__ == "__main__":
    main()
