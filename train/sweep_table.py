"""Gather a Hydra multirun's jobs into one table: the swept values and each job's final metrics.

    python train/train.py -m stage=decoder module.diffusion.objective=eps,v trainer.max_steps=2000
    python train/sweep_table.py runs/decoder/multirun_2025-01-01_12-00-00              # Markdown to stdout
    python train/sweep_table.py MULTIRUN_DIR --metrics val/loss train/loss --csv sweep.csv

Each job dir (``MULTIRUN_DIR/<n>/``) gives its overrides (``.hydra/overrides.yaml``) and metrics: the
``final_metrics.json`` that train.py writes at the end, else the last value of every column of the csv
logger's ``metrics.csv`` (a job that crashed or was preempted; its status says so).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path


def _overrides(job: Path) -> list[str]:
    path = job / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    import yaml

    return [str(o) for o in (yaml.safe_load(path.read_text()) or [])]


def _last_csv_values(job: Path) -> dict[str, float]:
    out: dict[str, float] = {}
    for path in sorted(job.glob("**/metrics.csv")):
        with open(path) as f:
            for row in csv.DictReader(f):
                for k, v in row.items():
                    if k not in ("step", "epoch") and v not in (None, ""):
                        try:
                            out[k] = float(v)
                        except ValueError:
                            pass
    return out


def gather(multirun_dir: str | Path) -> list[dict]:
    """One dict per job: ``{"job", "status", "step", "overrides": {key: value}, "metrics": {name: value}}``."""
    root = Path(multirun_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"multirun dir {root} does not exist")
    jobs = sorted((p for p in root.iterdir() if p.is_dir() and (p / ".hydra").is_dir()),
                  key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name))  # fmt: skip
    if not jobs:
        raise FileNotFoundError(f"no Hydra job dirs (<n>/.hydra/) under {root}")
    rows = []
    for job in jobs:
        final = job / "final_metrics.json"
        if final.is_file():
            data = json.loads(final.read_text())
            metrics, status, step = data.get("metrics", {}), "finished", data.get("step")
            overrides = data.get("overrides") or _overrides(job)
        else:
            metrics, status, step, overrides = _last_csv_values(job), "unfinished", None, _overrides(job)
        pairs = dict(o.split("=", 1) for o in overrides if "=" in o)
        rows.append({"job": job.name, "status": status, "step": step, "overrides": pairs, "metrics": metrics})
    return rows


def table(rows: list[dict], metrics: list[str] | None = None) -> tuple[list[str], list[list[str]]]:
    """Header and cells: job, the overrides that differ between jobs, status, step, then the metrics."""
    keys = sorted({k for r in rows for k in r["overrides"]})
    swept = [k for k in keys if len({r["overrides"].get(k) for r in rows}) > 1] or keys
    names = metrics or sorted({m for r in rows for m in r["metrics"]})
    header = ["job", *swept, "status", "step", *names]
    cells = []
    for r in rows:
        vals = [f"{r['metrics'][m]:.4g}" if m in r["metrics"] else "" for m in names]
        cells.append([r["job"], *(r["overrides"].get(k, "") for k in swept), r["status"], str(r["step"] or ""), *vals])
    return header, cells


def markdown(header: list[str], cells: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


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
        with open(a.csv, "w", newline="") as f:
            csv.writer(f).writerows([header, *cells])
    return text


if __name__ == "__main__":
    sys.exit(main() and 0)
