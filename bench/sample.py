"""Sampling latency per stage and sampler: seconds per sampling step and per image; prints one JSON object.

    python bench/sample.py                                   # prior/bench, decoder/bench, upsampler/bench
    python bench/sample.py stages=decoder samplers=ddim,dpmpp_2m steps=25 batch=8 guidance=3.0
    python bench/sample.py stages=prior,decoder device=cuda precision=bf16 compile=1 --out bench/sample.json

Arguments (``key=value`` or ``--key value``): stages (comma list of prior, decoder, upsampler); samplers (comma list
of ddpm, ddim, dpmpp_2m, euler, heun); steps (sampling steps); batch (default: each stage's training bench batch);
guidance (classifier-free guidance scale; != 1 doubles the network batch); prior_cache 0|1 (text positions of the
prior computed once per sampling run, as ``sample_prior`` does; 0 = every step); precision fp32|bf16 (autocast); compile
0|1; channels_last 0|1 (UNets); threads; device; prior_config / decoder_config / upsampler_config (presets).
Each (stage, sampler) runs one untimed warm-up sampling of 2 steps, then ``repeats`` timed samplings (median).
Networks have random weights: the figures are about speed, not image quality.  Not a test.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time

import torch

from common import DEFAULT_CONFIG, emit, machine_info, parse_kv, peak_memory, setup_stage, sync
from dalle2.diffusion import cfg_model_fn, sample
from dalle2.prior import CachedTextPrior

DEFAULTS = {
    "stages": "prior,decoder,upsampler",
    "samplers": "ddim,dpmpp_2m,euler,heun,ddpm",
    "steps": 10,
    "batch": 0,
    "guidance": 1.0,
    "precision": "fp32",
    "compile": False,
    "channels_last": False,
    "threads": 2,
    "device": "cpu",
    "repeats": 1,
    "prior_config": DEFAULT_CONFIG["prior"],
    "decoder_config": DEFAULT_CONFIG["decoder"],
    "upsampler_config": DEFAULT_CONFIG["upsampler"],
    "seed": 0,
    "out": None,
    "prior_cache": True,
}
CALLS_PER_STEP = {"heun": 2}  # model calls per step (heun: 1 on the last step)


def main(argv: list[str] | None = None) -> dict:
    a = parse_kv(sys.argv[1:] if argv is None else argv, DEFAULTS)
    device = torch.device(a["device"])
    if device.type == "cpu" and a["threads"]:
        torch.set_num_threads(a["threads"])
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if a["precision"] == "bf16" else contextlib.nullcontext()
    )
    rows = []
    for stage in [s for s in a["stages"].split(",") if s]:
        torch.manual_seed(a["seed"])
        s = setup_stage(stage, a[f"{stage}_config"], a["batch"] or None, device, channels_last=a["channels_last"])
        net = s.net.eval().requires_grad_(False)
        b = s.info["batch"]
        model = torch.compile(net) if a["compile"] else net
        if stage == "prior" and a["prior_cache"]:  # what sample_prior does: text positions computed once per run
            model = CachedTextPrior(model)
        if a["guidance"] != 1.0 and stage != "upsampler":  # the SR UNets have no conditioning to drop
            model = cfg_model_fn(model, guidance_scale=a["guidance"], learned_variance=s.diffusion.learned_variance)
        kwargs = s.conditioning(s.make_batch())
        for sampler in [x for x in a["samplers"].split(",") if x]:
            gen = torch.Generator(device).manual_seed(a["seed"])

            def run(steps: int) -> torch.Tensor:
                with torch.inference_mode(), autocast:
                    return sample(
                        model,
                        s.sample_shape,
                        diffusion=s.diffusion,
                        sampler=sampler,
                        steps=steps,
                        generator=gen,
                        model_kwargs=kwargs,
                        device=device,
                    )

            run(2)  # warm-up (and compilation)
            times = []
            for _ in range(a["repeats"]):
                sync(device)
                t0 = time.perf_counter()
                out = run(a["steps"])
                sync(device)
                times.append(time.perf_counter() - t0)
            if not torch.isfinite(out).all():
                raise FloatingPointError(f"{stage}/{sampler}: non-finite samples")
            total = statistics.median(times)
            calls = a["steps"] * CALLS_PER_STEP.get(sampler, 1) - (1 if sampler == "heun" else 0)
            rows.append(
                {
                    "stage": stage,
                    "config": s.config,
                    "sampler": sampler,
                    **({"prior_cache": a["prior_cache"]} if stage == "prior" else {}),
                    "batch": b,
                    "steps": a["steps"],
                    "model_calls": calls,
                    "seconds": total,
                    "s_per_step": total / a["steps"],
                    "s_per_model_call": total / calls,
                    "s_per_image": total / b,
                    "images_per_s": b / total,
                    "params": sum(p.numel() for p in net.parameters()),
                    "shape": list(s.sample_shape),
                }
            )
            print(
                f"[bench] {stage}/{sampler}: {total / a['steps']:.4f} s/step, {total / b:.4f} s/image", file=sys.stderr
            )
    result = {
        "bench": "sample",
        "precision": a["precision"],
        "compile": a["compile"],
        "guidance": a["guidance"],
        "channels_last": a["channels_last"],
        "results": rows,
        **peak_memory(device),
        **machine_info(device),
    }
    return emit(result, a["out"])


if __name__ == "__main__":
    main()
