"""Does the super-resolution stage beat bicubic?  Real / bicubic / SR on held-out built-in pictures.

    python eval/sr_table.py --upsampler demo_out/upsampler/checkpoints/last.ckpt --split test --num 256 \
        --out results/sr_table.json [--md sr_table.md] [--steps 7] [--aug-level 0] [--start-t 100] [--whole-chain 7]

The first ``--num`` pictures of the split are read twice through the data loader (``load_rgb``): at the
upsampler's output size (the real high-res pictures) and at its input size, the view the base decoder is trained
on and so the kind of image the pipeline gives the upsampler.  Each low-res picture is upsampled by bicubic and by
the upsampler (EMA weights, DDIM ``--steps``, seeded per picture), and each set is scored against the real pictures
(``dalle2.decoder.sr_eval.compare_upsampling``; an upsampler with a regression mean also gets rows for the other
ways to sample it: the estimate alone ``sr_mean_only``, refined from the noised estimate ``sr_refined``
(``--refined``), the whole chain from noise ``sr_whole_chain`` (``--whole-chain``)): PSNR, the edge blend width (the strict checker's, in px, and its
ratio to the real pictures'), the strict checker (``strict/all``: every attribute, sharpness included) and the
lenient one.  ``--split val`` while choosing settings, ``--split test`` for the figures you report.  Written with
``dalle2.results.write_result`` (the command, git sha, machine, the checkpoint's sha256).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dalle2.data.synthetic import parse_caption  # noqa: E402
from dalle2.decoder.sr_eval import bicubic, compare_upsampling  # noqa: E402
from dalle2.metrics.fidelity import load_val  # noqa: E402
from dalle2.pipeline import STREAM_UPSAMPLER, sample_generators  # noqa: E402
from dalle2.results import write_result  # noqa: E402
from dalle2.stages import load_stage  # noqa: E402

COLUMNS = ("psnr", "edge_width", "edge_width_ratio", "strict/all", "strict/sharp", "strict/shape", "accuracy/all")


def upsample_all(
    stage, low: torch.Tensor, *, steps: int, aug_level: int | None, seed: int, batch_size: int, start_t=None
):
    """``stage.upsample`` of every picture, picture i seeded by (seed, i) whatever the batch size."""
    out = []
    for i in range(0, len(low), batch_size):
        idx = list(range(i, min(len(low), i + batch_size)))
        gens = sample_generators([seed] * len(idx), idx, STREAM_UPSAMPLER)
        up = stage.upsample(low[idx], steps=steps, generator=gens, aug_level=aug_level, start_t=start_t)
        out.append(up.cpu())
    return torch.cat(out)


def markdown(rows: dict[str, dict[str, float]]) -> str:
    head = "| | " + " | ".join(COLUMNS) + " |\n|---|" + "---|" * len(COLUMNS) + "\n"
    fmt = lambda v: "" if v is None else f"{v:.3g}" if abs(v) >= 10 or v == 0 else f"{v:.3f}"  # noqa: E731
    return head + "".join(f"| {k} | " + " | ".join(fmt(r.get(c)) for c in COLUMNS) + " |\n" for k, r in rows.items())


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--upsampler", required=True, help="upsampler .ckpt or export")
    p.add_argument("--data", default="data_builtin", help="built-in data folder (has train/ val/ test/)")
    p.add_argument("--split", default="test", choices=["val", "test"])
    p.add_argument("--urls", default=None, help="shards to read instead of DATA/SPLIT/*.tar")
    p.add_argument("--num", type=int, default=256)
    p.add_argument("--steps", type=int, default=7)
    p.add_argument("--aug-level", type=int, default=None, help="low-res noise level (default: the stage's own)")
    p.add_argument(
        "--start-t",
        type=int,
        default=None,
        help="start the chain at this timestep from the noised estimate (SDEdit; default: the stage's "
        "sample_start_t; -1: the whole chain)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--whole-chain",
        type=int,
        default=7,
        help="an upsampler with a regression mean: also a row sampled by the whole chain from noise, this many "
        "steps (0: no such row)",
    )
    p.add_argument(
        "--refined",
        default="3:100",
        help="STEPS:START_T: also a row refined from the estimate noised to START_T in STEPS steps (0:0: none)",
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", default=None, help="results JSON (dalle2.results.write_result)")
    p.add_argument("--md", default=None, help="also write the table as Markdown")
    a = p.parse_args(argv)

    stage = load_stage(a.upsampler, "upsampler")
    urls = a.urls or str(Path(a.data) / a.split / "{00000..00001}.tar")
    hi = load_val(urls, image_size=stage.image_size, num=a.num)
    lo = load_val(urls, image_size=stage.lowres_size, num=a.num)
    attributes = [parse_caption(c) for c in hi["caption"]]
    t0, cpu0 = time.time(), time.process_time()
    kw = dict(aug_level=a.aug_level, seed=a.seed, batch_size=a.batch_size)
    sr = upsample_all(stage, lo["image"], steps=a.steps, start_t=a.start_t, **kw)
    seconds = {"wall_s": time.time() - t0, "cpu_s": time.process_time() - cpu0}
    candidates = {"bicubic": bicubic(lo["image"], stage.image_size), "sr": sr}
    start_t = stage.sample_start_t if a.start_t is None else a.start_t
    if callable(getattr(stage.net, "regression_mean", None)):  # the other ways to sample it, for comparison
        if a.steps > 0:
            candidates["sr_mean_only"] = upsample_all(stage, lo["image"], steps=0, **kw)
        steps, start = (int(v) for v in a.refined.split(":"))
        if steps > 0 and (a.steps, start_t) != (steps, start):
            candidates["sr_refined"] = upsample_all(stage, lo["image"], steps=steps, start_t=start, **kw)
        if a.whole_chain > 0 and (a.steps == 0 or (start_t is not None and start_t >= 0)):
            candidates["sr_whole_chain"] = upsample_all(stage, lo["image"], steps=a.whole_chain, start_t=-1, **kw)
    rows = compare_upsampling(hi["image"], candidates, attributes)
    figures = {
        "rows": rows,
        "stage": f"{stage.lowres_size} -> {stage.image_size} px",
        "num": len(attributes),
        "steps": a.steps,
        "start_t": start_t,
        "aug_level": stage.sample_aug_level if a.aug_level is None else a.aug_level,
        "sr_seconds_per_image": {k: v / len(attributes) for k, v in seconds.items()},
    }
    table = markdown(rows)
    print(table)
    if a.md:
        Path(a.md).write_text(table)
    if a.out:
        write_result(a.out, figures, checkpoints={"upsampler": a.upsampler}, split=a.split, seeds=[a.seed])
        print(f"[sr_table] wrote {a.out}")
    return figures


if __name__ == "__main__":
    main()
