"""Write demo_out/report.md from what `make demo` produced (metrics JSON, CSV logs, sample grids).

    python train/demo_report.py demo_out
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path


def last_metrics(csv_path: Path) -> dict[str, str]:
    """The last logged value of every column of a Lightning CSVLogger metrics.csv."""
    last: dict[str, str] = {}
    if not csv_path.is_file():
        return last
    with csv_path.open() as f:
        for row in csv.DictReader(f):
            last.update({k: v for k, v in row.items() if v not in ("", None)})
    return last


def main(out_dir: str) -> None:
    out = Path(out_dir)
    lines = ["# dalle2 demo report", ""]
    retrieval = out / "clip_retrieval.json"
    if retrieval.is_file():
        r = json.loads(retrieval.read_text())
        n = r.get("num_samples", 0)
        lines += ["## CLIP zero-shot retrieval (held-out val shards)", "",
                  f"- samples: {n}; chance R@1 = {1 / max(n, 1):.4f}"]
        lines += [f"- {k}: {v:.4f}" for k, v in sorted(r.items()) if k != "num_samples"]
        lines.append("")
    for stage in ("clip", "decoder"):
        m = last_metrics(out / stage / "csv" / "metrics.csv")
        if m:
            lines += [f"## {stage}: last logged metrics", ""]
            lines += [f"- {k}: {v}" for k, v in sorted(m.items()) if "/" in k]
            lines.append("")
        grids = sorted((out / stage / "samples").glob("*.png")) if (out / stage / "samples").is_dir() else []
        if grids:
            lines += [f"![{stage} samples]({grids[-1].relative_to(out)})", ""]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print(f"[dalle2] wrote {out / 'report.md'}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "demo_out")
