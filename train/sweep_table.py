"""Gather a Hydra multirun's jobs into one table: the swept values and each job's final metrics.

    python train/train.py -m stage=decoder module.diffusion.objective=eps,v trainer.max_steps=2000
    python train/sweep_table.py runs/decoder/multirun_2025-01-01_12-00-00              # Markdown to stdout
    python train/sweep_table.py MULTIRUN_DIR --metrics val/loss train/loss --csv sweep.csv

Each job dir (``MULTIRUN_DIR/<n>/``) gives its overrides (``.hydra/overrides.yaml``) and metrics: the
``final_metrics.json`` that train.py writes at the end, else the last value of every column of the csv
logger's ``metrics.csv`` (a job that crashed or was preempted; its status says so).  The gathering lives in
``dalle2/sweep.py`` (shared with ``eval/sweep_gather.py``, which also plots sampling sweeps).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dalle2.sweep import gather, markdown, table, write_csv  # noqa: E402

__all__ = ["gather", "table", "markdown", "main"]


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("multirun_dir")
    p.add_argument("--metrics", nargs="*", default=None, help="metric names to show (default: all)")
    p.add_argument("--csv", default=None, help="also write the table as CSV here")
    a = p.parse_args(argv)
    header, cells = table(gather(a.multirun_dir), a.metrics)
    text = markdown(header, cells)
    print(text)
    if a.csv:
        write_csv(a.csv, header, cells)
    return text


if __name__ == "__main__":
    sys.exit(main() and 0)
