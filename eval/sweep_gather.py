"""Gather an ``eval/sample.py -m`` sweep (guidance x sampler x steps) into a CSV, a Markdown table and PNG plots.

    python eval/sample.py -m ckpt.clip=... ckpt.prior=... ckpt.decoder=... prompts=prompts.txt \
        score.reference_urls='data_builtin/val/{00000..00001}.tar' \
        guidance.decoder=1,2,3 sampler.decoder=ddim,dpmpp_2m steps.decoder=10,25,50 hydra.sweep.dir=sweeps/decoder
    python eval/sweep_gather.py sweeps/decoder --out sweeps/decoder/gathered [--stage decoder]

Writes ``OUT/sweep.csv`` (one row per finished job: guidance, sampler, steps, CLIP-FD, FID, CLIP score, lenient and
strict checker accuracies, seconds per image), ``OUT/sweep.md`` and, with at least one scored job,
``OUT/tradeoff.png`` (CLIP-FD or FID against CLIP score per guidance: the trade-off curve) and ``OUT/steps.png``
(quality against steps per sampler).  Reading and plotting live in ``dalle2/sweep.py``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dalle2.sweep import SAMPLING_COLUMNS, gather, markdown, plot_steps, plot_tradeoff, sampling_rows, write_csv  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("multirun_dir")
    p.add_argument("--out", required=True, help="output folder for sweep.csv, sweep.md, tradeoff.png, steps.png")
    p.add_argument("--stage", default="decoder", help="whose settings were swept: prior | decoder | upsampler")
    a = p.parse_args(argv)
    try:
        rows = sampling_rows(gather(a.multirun_dir), a.stage)
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from None
    rows.sort(key=lambda r: (r["sampler"], r["steps"], r["guidance"]))
    out = Path(a.out)
    header = list(SAMPLING_COLUMNS)
    cells = [["" if r.get(c) is None else r[c] for c in header] for r in rows]
    written = {"csv": write_csv(out / "sweep.csv", header, cells)}
    text = markdown(header, [[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row] for row in cells])
    (out / "sweep.md").write_text(text + "\n")
    written["md"] = out / "sweep.md"
    for name, fn in (("tradeoff", plot_tradeoff), ("steps", plot_steps)):
        path = fn(rows, out / f"{name}.png")
        if path is None:
            print(f"[dalle2] {name}.png skipped: no job was scored (score.reference_urls=... in eval/sample.py)")
        else:
            written[name] = path
    print(text)
    print(f"[dalle2] {len(rows)} jobs -> " + ", ".join(str(v) for v in written.values()))
    return {k: str(v) for k, v in written.items()}


if __name__ == "__main__":
    main()
