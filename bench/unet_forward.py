"""Forward+backward time per training step of a decoder UNet preset; prints one JSON object.

    python bench/unet_forward.py --preset bench --batch-size 4 --steps 5 [--device cuda] [--bf16] [--channels-last]

The conditioning is random but has the shapes training uses: CLIP image embedding (+ 4 tokens), text tokens with a
padding mask (when the preset has text), the low-res image and augmentation level (SR presets).  Reports the median
of ``--steps`` timed steps after ``--warmup`` untimed ones.  Not a test.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from dalle2.decoder import PRESET_IMAGE_SIZES, UNET_PRESETS, count_parameters, unet_from_preset


def make_inputs(model, *, batch_size: int, image_size: int, text_len: int, device: torch.device) -> tuple:
    b = batch_size
    x = torch.randn(b, model.in_channels, image_size, image_size, device=device)
    t = torch.randint(0, 1000, (b,), device=device)
    cond: dict[str, torch.Tensor] = {}
    if model.clip_dim is not None:
        cond["image_embed"] = torch.randn(b, model.clip_dim, device=device)
        cond["drop_image_embed"] = torch.rand(b, device=device) < 0.1
    if model.text_dim is not None:
        cond["text_tokens"] = torch.randn(b, text_len, model.text_dim, device=device)
        lengths = torch.randint(1, text_len + 1, (b,), device=device)
        cond["text_mask"] = torch.arange(text_len, device=device)[None] < lengths[:, None]
        cond["drop_text"] = torch.rand(b, device=device) < 0.5
    if model.lowres_cond:
        cond["lowres_image"] = torch.randn(b, model.in_channels, image_size // 4, image_size // 4, device=device)
        cond["lowres_aug_level"] = torch.randint(0, 1000, (b,), device=device)
    return x, t, cond


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny32", choices=sorted(UNET_PRESETS))
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--image-size", type=int, default=None, help="default: the preset's size")
    p.add_argument("--clip-dim", type=int, default=512, help="when the preset leaves it to CLIP (base presets)")
    p.add_argument(
        "--text-dim", type=int, default=None, help="text-token width (default: none unless the preset has one)"
    )
    p.add_argument("--text-len", type=int, default=77)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--bf16", action="store_true", help="autocast to bfloat16")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--grad-checkpointing", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    overrides: dict = {"grad_checkpointing": args.grad_checkpointing}
    preset = UNET_PRESETS[args.preset]
    if "clip_dim" not in preset and not preset.get("lowres_cond"):
        overrides["clip_dim"] = args.clip_dim
    if args.text_dim is not None:
        overrides["text_dim"] = args.text_dim
    torch.manual_seed(0)
    model = unet_from_preset(args.preset, **overrides).to(device).train()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    image_size = args.image_size or PRESET_IMAGE_SIZES[args.preset]
    x, t, cond = make_inputs(
        model, batch_size=args.batch_size, image_size=image_size, text_len=args.text_len, device=device
    )
    if args.channels_last:
        x = x.to(memory_format=torch.channels_last)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    times = []
    for i in range(args.warmup + args.steps):
        sync()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            out = model(x, t, **cond)
        out.float().square().mean().backward()
        model.zero_grad(set_to_none=True)
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)

    med = statistics.median(times)
    result = {
        "bench": "unet_forward_backward",
        "preset": args.preset,
        "params": count_parameters(model),
        "batch_size": args.batch_size,
        "image_size": image_size,
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),
        "bf16": args.bf16,
        "channels_last": args.channels_last,
        "grad_checkpointing": args.grad_checkpointing,
        "steps": args.steps,
        "warmup": args.warmup,
        "median_step_s": med,
        "min_step_s": min(times),
        "images_per_s": args.batch_size / med,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        result["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
