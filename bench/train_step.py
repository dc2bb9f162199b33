"""Throughput of one full training step: forward + loss, backward, AdamW step, EMA update; prints one JSON object.

    python bench/train_step.py stage=prior                       # prior/bench, batch 32, CPU fp32, 2 threads
    python bench/train_step.py stage=decoder batch=8 steps=20 precision=bf16 channels_last=1
    python bench/train_step.py stage=decoder compare=channels_last   # A/B in one run: ratio on/off
    python bench/train_step.py stage=decoder device=cuda batch=64 precision=bf16 compile=1 --out bench/h100.json

Arguments (``key=value`` or ``--key value``): stage prior|decoder|upsampler|clip; config (model preset; default
prior/bench, decoder/bench, upsampler/bench, clip/tiny); batch; steps (timed, median reported); warmup;
precision fp32|bf16 (bf16 = autocast); compile 0|1 (``torch.compile`` of the network); channels_last 0|1 (UNets);
threads (CPU); device; ema 0|1; optimizer default|foreach|forloop (``default`` = ``dalle2.lit.optim.default_adamw``:
the fused kernel, on CPU too); compare <flag> (run the flag off and on in one process, steps interleaved, and report
the speed ratio: channels_last, compile, precision, optimizer, ema, threads 1 vs 2); peak_tflops (for MFU; default by GPU name);
profile N (print the N top ops of one profiled step to stderr); crop (upsampler: train on random crops of that side, e.g.
``config=sr256_1024 crop=256``, the paper's quarter-size crops); result (also write a results file,
``dalle2.results.write_result``).

The loss is the library's: ``GaussianDiffusion.training_losses`` with the stage's diffusion settings
(``conf/stage/*.yaml``) and the modules' conditioning drops, or ``ClipLoss``.  Model FLOPs per step (forward +
backward of the network and loss) are counted once with ``torch.utils.flop_counter.FlopCounterMode``; achieved
TFLOP/s = FLOPs / median step time and, where the peak is known, MFU = achieved / peak.  Not a test.
"""

from __future__ import annotations

import contextlib
import math
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from common import emit, machine_info, parse_kv, peak_memory, peak_tflops, setup_stage, summarize, sync, time_steps
from dalle2.lit.optim import default_adamw, param_groups
from dalle2.nn import EMA

DEFAULTS = {
    "stage": "prior",
    "config": None,
    "batch": 0,
    "steps": 20,
    "warmup": 3,
    "precision": "fp32",
    "compile": False,
    "channels_last": False,
    "threads": 2,
    "device": "cpu",
    "ema": True,
    "optimizer": "default",
    "compare": None,
    "peak_tflops": 0.0,
    "lr": 1e-4,
    "weight_decay": 0.0,
    "seed": 0,
    "flops": True,
    "profile": 0,
    "crop": 0,
    "out": None,
    "result": None,
}
COMPARABLE = {
    "channels_last": (False, True),
    "compile": (False, True),
    "precision": ("fp32", "bf16"),
    "optimizer": ("foreach", "default"),
    "ema": (False, True),
    "threads": (1, 2),
}


def _sdpa_cpu(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _sdpa_cpu_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# FlopCounterMode knows the CUDA SDPA kernels but not the CPU one; count it with the same formulas
CPU_SDPA_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward,
}


class Runner:
    """One configured training step (network, optimizer, EMA, a fixed batch) callable as ``runner()``."""

    def __init__(self, a: dict, device: torch.device):
        torch.manual_seed(a["seed"])
        self.a, self.device = a, device
        self.setup = s = setup_stage(
            a["stage"], a["config"], a["batch"] or None, device, channels_last=a["channels_last"], crop=a["crop"]
        )
        self.net = s.net.train()
        groups = param_groups(self.net, weight_decay=a["weight_decay"])
        if a["optimizer"] == "default":
            self.opt = default_adamw(groups, lr=a["lr"])
        elif a["optimizer"] in ("foreach", "forloop"):
            self.opt = torch.optim.AdamW(groups, lr=a["lr"], foreach=a["optimizer"] == "foreach", fused=False)
        else:
            raise SystemExit(f"unknown optimizer {a['optimizer']!r}; expected default, foreach or forloop")
        self.ema = EMA(self.net, decay=0.9999, warmup=10) if a["ema"] else None
        self.model = torch.compile(self.net) if a["compile"] else self.net
        self.batch = s.make_batch()  # one prefetched batch: the data pipeline is benchmarked by dataloader.py
        self.step_count, self.last_loss = 0, float("nan")

    def autocast(self):
        if self.a["precision"] == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        if self.a["precision"] != "fp32":
            raise SystemExit(f"unknown precision {self.a['precision']!r}; expected fp32 or bf16")
        return contextlib.nullcontext()

    def forward_backward(self, model) -> torch.Tensor:
        with self.autocast():
            loss = self.setup.loss(model, self.batch)["loss"]
        loss.backward()
        return loss

    def __call__(self) -> None:
        if self.device.type == "cpu" and self.a["threads"]:
            torch.set_num_threads(self.a["threads"])
        loss = self.forward_backward(self.model)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.net, self.step_count)
        self.step_count += 1
        self.last_loss = loss.detach()

    def count_flops(self) -> int:
        """Model FLOPs of one forward + backward (eager network, so compile does not hide them)."""
        counter = FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOPS)
        with counter:
            self.forward_backward(self.net)
        self.opt.zero_grad(set_to_none=True)
        return counter.get_total_flops()


def profile(runner: Runner, *, rows: int) -> None:
    """One warm-up step, then one step under ``torch.profiler``: the top ops by self time go to stderr."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    runner()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if runner.device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        runner()
        sync(runner.device)
    key = "self_cuda_time_total" if runner.device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=rows), file=sys.stderr)


def result_for(runner: Runner, times: list[float], a: dict, device: torch.device, flops: int | None) -> dict:
    s = runner.setup
    out = summarize(times)
    out["samples_per_s"] = s.info["batch"] / out["s_per_step"]
    out["optimizer_impl"] = {k: runner.opt.defaults.get(k) for k in ("foreach", "fused")}
    out["final_loss"] = float(runner.last_loss)
    if not math.isfinite(out["final_loss"]):
        raise FloatingPointError(f"non-finite loss {out['final_loss']} in the benchmark")
    if flops:
        out["flops_per_step"] = flops
        out["tflops_per_s"] = flops / out["s_per_step"] / 1e12
        peak = peak_tflops(device, a["peak_tflops"])
        out["peak_tflops"] = peak
        out["mfu"] = out["tflops_per_s"] / peak if peak else None
    return out


def main(argv: list[str] | None = None) -> dict:
    a = parse_kv(sys.argv[1:] if argv is None else argv, DEFAULTS)
    device = torch.device(a["device"])
    if device.type == "cpu" and a["threads"]:
        torch.set_num_threads(a["threads"])
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.cuda.reset_peak_memory_stats(device)

    variants = [a]
    if a["compare"]:
        if a["compare"] not in COMPARABLE:
            raise SystemExit(f"compare must be one of {sorted(COMPARABLE)}, got {a['compare']!r}")
        variants = [{**a, a["compare"]: v} for v in COMPARABLE[a["compare"]]]
    runners = [Runner(v, device) for v in variants]
    flops = runners[0].count_flops() if a["flops"] else None
    if a["profile"]:
        profile(runners[0], rows=a["profile"])
    times = time_steps(runners, steps=a["steps"], warmup=a["warmup"], device=device)
    sync(device)

    s = runners[0].setup
    result: dict = {
        "bench": "train_step",
        "stage": s.stage,
        "config": s.config,
        "params": sum(p.numel() for p in s.net.parameters()),
        **s.info,
        "steps": a["steps"],
        "warmup": a["warmup"],
        "precision": a["precision"],
        "compile": a["compile"],
        "channels_last": a["channels_last"],
        "optimizer": a["optimizer"],
        "ema": a["ema"],
    }
    if a["compare"]:
        key = a["compare"]
        rows = {str(v[key]): result_for(r, t, v, device, flops) for v, r, t in zip(variants, runners, times)}
        off, on = (str(v) for v in COMPARABLE[key])
        result.update(compare=key, variants=rows, speedup_on_vs_off=rows[off]["s_per_step"] / rows[on]["s_per_step"])
    else:
        result.update(result_for(runners[0], times[0], a, device, flops))
    result.update(peak_memory(device))
    result.update(machine_info(device))
    if a["result"]:  # a results file (dalle2.results.write_result: the command, git sha, machine)
        from dalle2.results import write_result

        write_result(a["result"], result, notes="the machine may be shared: s_per_step is wall time")
    return emit(result, a["out"])


if __name__ == "__main__":
    main()
