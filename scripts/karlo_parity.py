"""The Karlo parity table: tiny random Karlo-shaped pipelines in diffusers' format (the test configurations of
tests/helpers/karlo.py: head counts, layer counts, channel multipliers, attention levels, widths, both paddings,
both super-resolution time-embedding modes) converted and compared with diffusers' UnCLIPPipeline
(dalle2.convert.karlo_check: every module fp32 on the same inputs, and whole images from the same prompts, weights
and generator with prior and decoder guidance and the super-resolution last-step switch).

    python scripts/karlo_parity.py --out results/karlo_parity.json

Needs diffusers and transformers (the dev extra).  Writes the table with dalle2.results.write_result.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from dalle2.convert.karlo import convert_karlo  # noqa: E402
from dalle2.convert.karlo_check import check_karlo  # noqa: E402
from dalle2.results import write_result  # noqa: E402
from helpers.karlo import CONFIGS, make_karlo_dir  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="results/karlo_parity.json", help="results file to write")
    parser.add_argument("--seed", type=int, default=0, help="weights and sampling seed")
    args = parser.parse_args(argv)
    reports = {}
    with tempfile.TemporaryDirectory() as tmp:
        for cfg in CONFIGS:
            src = make_karlo_dir(Path(tmp) / cfg.name, cfg, seed=args.seed)
            convert_karlo(src, Path(tmp) / cfg.name / "out")
            reports[cfg.name] = check_karlo(src, Path(tmp) / cfg.name / "out", seed=args.seed)
    names = list(next(iter(reports.values()))["modules"])
    rows = [{"component": n, **{f"config {c}": r["modules"][n] for c, r in reports.items()}} for n in names]
    rows.append(
        {"component": "end to end (images in [0, 1])", **{f"config {c}": r["end_to_end"] for c, r in reports.items()}}
    )
    figures = {
        "rows": rows,
        "ok": {c: r["ok"] for c, r in reports.items()},
        "end_to_end": {c: r["end_to_end"] for c, r in reports.items()},
        "settings": {c: r["settings"] for c, r in reports.items()},
        "configs": {c.name: c.__dict__ for c in CONFIGS},
    }
    path = write_result(args.out, figures, seeds=[args.seed], notes="tolerances: modules 1e-4, images 1e-3 (fp32, CPU)")
    print(f"[dalle2] parity {figures['ok']} -> {path}")
    return figures


if __name__ == "__main__":
    main()
