"""Acceptance figures of the cascaded decoder on the built-in data (issue #7, "Done means"); JSON out.

    # decoder: samples from the ground-truth CLIP image embeddings of val images, scored by the attribute checker
    python eval/decoder_acceptance.py decoder --ckpt runs/dec/checkpoints/last.ckpt \
        [--clip-ckpt demo_out/clip/checkpoints/last.ckpt] --val 'data_builtin/val/{00000..00001}.tar' \
        --steps 20 --guidance-scale 3 --num 512 --out runs/dec/acceptance.json [--grid runs/dec/acceptance.png]
    # upsampler: PSNR of upsampled val images vs the ground truth, and of bicubic, and the gain in dB
    python eval/decoder_acceptance.py upsampler --ckpt runs/up/checkpoints/last.ckpt \
        --val 'data_builtin/val/{00000..00001}.tar' --steps 20 --num 256 --out runs/up/acceptance.json

Decoder JSON: ``samples`` / ``real`` / ``shuffled``, each the lenient ``{"accuracy/<attr>", "accuracy/all",
"accuracy/mean"}`` and the strict ``strict/all`` (the headline: every strict verdict) and ``strict/<verdict>``
(docs/checker.md) of :func:`dalle2.data.synthetic.check_images` (``strict=True``) against the attributes
:func:`~dalle2.data.synthetic.parse_caption` reads from each val caption:

- ``samples``: decoder samples (EMA weights, ``--sampler`` with ``--steps`` steps, guidance ``--guidance-scale``) from
  the CLIP image embeddings of the val images themselves (``img_emb`` of embedding shards, else the frozen CLIP of
  ``--clip-ckpt`` or of the decoder's own ``clip_ckpt`` hyperparameter);
- ``real``: the val images at the decoder's resolution (the ceiling: the checker on real pictures);
- ``shuffled``: samples given the embeddings of *other* val images (a derangement; the chance-level control).

The checker does not resize: it reads attributes in units of the image side, so 32 px and 64 px images are scored
alike.  Images are loaded with the training pipeline's ``load_rgb`` at the decoder's ``image_size`` (the upsampler:
at its output size; its low-res input is the module's own antialiased downsample).  Sampling is batched
(``--batch-size`` images per call) with one seeded generator: the same arguments give the same figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dalle2.data.synthetic import check_images, parse_caption  # noqa: E402
from dalle2.lit.checkpoints import load_stage_module  # noqa: E402
from dalle2.lit.decoder_module import DecoderModule, UpsamplerModule, psnr  # noqa: E402
from dalle2.metrics.fidelity import derangement, load_val  # noqa: E402

__all__ = ["load_val", "derangement", "decoder_acceptance", "upsampler_acceptance", "main"]


@torch.no_grad()
def _sample_all(decoder: DecoderModule, cond: dict, *, batch_size: int, generator: torch.Generator, **kw) -> Tensor:
    n = cond["image_embed"].shape[0]
    out = []
    for i in range(0, n, batch_size):
        part = {k: (v[i : i + batch_size] if v is not None else None) for k, v in cond.items()}
        out.append(
            decoder.sample(
                part["image_embed"],
                text_tokens=part.get("text_tokens"),
                text_mask=part.get("text_mask"),
                generator=generator,
                **kw,
            ).cpu()
        )
    return torch.cat(out)


@torch.no_grad()
def decoder_acceptance(
    decoder: DecoderModule,
    val: dict,
    *,
    steps: int = 20,
    sampler: str = "ddim",
    guidance_scale: float = 1.0,
    batch_size: int = 128,
    seed: int = 0,
    return_images: bool = False,
) -> dict:
    """Checker accuracy of decoder samples from the val images' own CLIP embeddings, of the real val images, and of
    samples from a derangement of the embeddings (see the module docstring).  ``val`` is :func:`load_val`'s dict
    (images at ``decoder.image_size``)."""
    decoder.eval()
    attrs = [parse_caption(c) for c in val["caption"]]
    n = len(attrs)
    with torch.no_grad():
        emb = torch.cat(
            [
                decoder.image_embeddings(
                    {k: (v[i : i + batch_size] if k != "caption" else None) for k, v in val.items()}
                ).cpu()
                for i in range(0, n, batch_size)
            ]
        )
    cond: dict = {"image_embed": emb}
    if decoder.use_text:
        states, mask = decoder.text_conditioning({k: v for k, v in val.items() if k != "caption"})
        cond["text_tokens"], cond["text_mask"] = states.cpu(), mask.cpu()
    perm = derangement(n, seed=seed + 1)
    shuffled = {k: v[perm] for k, v in cond.items()}
    kw = dict(steps=steps, sampler=sampler, guidance_scale=guidance_scale, batch_size=batch_size)
    t0 = time.perf_counter()
    samples = _sample_all(decoder, cond, generator=torch.Generator(device=decoder.device).manual_seed(seed), **kw)
    t_sample = time.perf_counter() - t0
    control = _sample_all(decoder, shuffled, generator=torch.Generator(device=decoder.device).manual_seed(seed), **kw)
    result = {
        "samples": check_images(samples, attrs, strict=True),
        "real": check_images(val["image"], attrs, strict=True),
        "shuffled": check_images(control, attrs, strict=True),
        "num_samples": n,
        "image_size": int(samples.shape[-1]),
        "steps": steps,
        "sampler": sampler,
        "guidance_scale": guidance_scale,
        "seed": seed,
        "sample_seconds": round(t_sample, 2),
    }
    if return_images:
        result["_images"] = {"real": val["image"], "samples": samples, "shuffled": control}
    return result


@torch.no_grad()
def upsampler_acceptance(
    upsampler: UpsamplerModule,
    images: Tensor,
    *,
    steps: int = 20,
    sampler: str = "ddim",
    batch_size: int = 64,
    seed: int = 0,
    return_images: bool = False,
) -> dict:
    """Mean PSNR (dB) of the upsampled low-res copies of ``images (N, 3, H, W)`` (at the upsampler's output size)
    vs ``images``, of bicubic upsampling vs ``images``, and the gain ``psnr - psnr_bicubic``."""
    upsampler.eval()
    gen = torch.Generator(device=upsampler.device).manual_seed(seed)
    ups, bics = [], []
    for i in range(0, images.shape[0], batch_size):
        hi = images[i : i + batch_size].to(upsampler.device).float()
        lo = upsampler.lowres(hi)
        ups.append(upsampler.upsample(lo, steps=steps, sampler=sampler, generator=gen).cpu())
        bics.append(F.interpolate(lo, size=hi.shape[-2:], mode="bicubic", align_corners=False).clamp(-1, 1).cpu())
    up, bic = torch.cat(ups), torch.cat(bics)
    p_up, p_bic = psnr(up, images.float()), psnr(bic, images.float())
    result = {
        "psnr": float(p_up.mean()),
        "psnr_bicubic": float(p_bic.mean()),
        "psnr_gain_db": float((p_up - p_bic).mean()),
        "frac_better_than_bicubic": float((p_up > p_bic).float().mean()),
        "num_samples": int(images.shape[0]),
        "lowres_size": int(upsampler.hparams.lowres_size),
        "image_size": int(images.shape[-1]),
        "steps": steps,
        "sampler": sampler,
        "seed": seed,
    }
    if return_images:
        result["_images"] = {"reference": images, "upsampled": up, "bicubic": bic}
    return result


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("stage", choices=["decoder", "upsampler"])
    p.add_argument("--ckpt", required=True, help="the stage's Lightning checkpoint")
    p.add_argument(
        "--clip-ckpt",
        default=None,
        help="decoder: CLIP used to embed the val images (default: the "
        "decoder's clip_ckpt hyperparameter); not needed with --embeddings",
    )
    p.add_argument("--val", default="data_builtin/val/{00000..00001}.tar", help="val shards (brace-expanded)")
    p.add_argument("--embeddings", action="store_true", help="decoder: the val shards carry img_emb (embedding shards)")
    p.add_argument("--num", type=int, default=512, help="number of val samples (the first ones)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--guidance-scale", type=float, default=None, help="decoder CFG scale (default 1)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="JSON path")
    p.add_argument(
        "--grid",
        default=None,
        help="PNG of the first 16 (rows: real / samples / shuffled, or reference / upsampled / bicubic)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = _parse(argv)
    module = load_stage_module(args.ckpt, args.stage, map_location="cpu").to(args.device)
    want_images = args.grid is not None
    if args.stage == "decoder":
        if args.clip_ckpt:
            from dalle2.lit.diffusion_base import load_frozen_clip

            module.set_clip(load_frozen_clip(args.clip_ckpt))
        val = load_val(args.val, image_size=module.image_size, num=args.num, load_embeddings=args.embeddings)
        result = decoder_acceptance(
            module,
            val,
            steps=args.steps,
            sampler=args.sampler,
            guidance_scale=1.0 if args.guidance_scale is None else args.guidance_scale,
            batch_size=args.batch_size,
            seed=args.seed,
            return_images=want_images,
        )
    else:
        val = load_val(args.val, image_size=int(module.hparams.image_size), num=args.num)
        result = upsampler_acceptance(
            module,
            val["image"],
            steps=args.steps,
            sampler=args.sampler,
            batch_size=args.batch_size,
            seed=args.seed,
            return_images=want_images,
        )
    result["ckpt"] = str(args.ckpt)
    images = result.pop("_images", None)
    if images is not None:
        from dalle2.lit.sample_grid import save_grid

        save_grid(args.grid, [v[:16] for v in images.values()], val["caption"][:16])
        print(f"[dalle2] wrote {args.grid} (rows: {', '.join(images)})")
    text = json.dumps(result, indent=2, sort_keys=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
        print(f"[dalle2] wrote {args.out}")
    print(text)
    return result


if __name__ == "__main__":
    main()
