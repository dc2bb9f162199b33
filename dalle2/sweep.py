"""Gather a Hydra multirun's jobs (training sweeps of ``train/train.py``, sampling sweeps of ``eval/sample.py``) into
rows, tables, CSV and plots.

Each job dir (``MULTIRUN_DIR/<n>/``) gives its overrides and metrics: ``final_metrics.json`` (written at the end of
a job by train.py and by eval/sample.py: ``{"metrics", "overrides", "step"[, "settings"]}``), else, for a training
job that crashed or was preempted, the last value of every column of its csv logger's ``metrics.csv`` and the
overrides of ``.hydra/overrides.yaml`` (status ``unfinished``).

Sampling sweeps (``eval/sample.py -m guidance.decoder=1,2,3 sampler.decoder=ddim,dpmpp_2m steps.decoder=10,50``):
:func:`sampling_rows` reads each job's resolved settings of one stage (guidance, sampler, steps) and its scores;
:func:`plot_tradeoff` draws CLIP-FD (or FID) against CLIP score, one curve per (sampler, steps) through the guidance
values (the paper's trade-off curve); :func:`plot_steps` draws quality against steps, one curve per (sampler,
guidance).  Plots need matplotlib (a dependency; imported lazily, Agg backend).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "gather",
    "override_pairs",
    "table",
    "markdown",
    "write_csv",
    "sampling_rows",
    "plot_tradeoff",
    "plot_steps",
    "SAMPLING_COLUMNS",
]


def override_pairs(overrides: Sequence[str]) -> dict[str, str]:
    """Hydra command-line overrides as ``{key: value}`` text; ``+key`` / ``++key`` (add / force-add) are the key
    (what train_all and a sweep compare runs by)."""
    return dict(o.lstrip("+").split("=", 1) for o in overrides if "=" in o)


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


def _is_job(p: Path) -> bool:
    return p.is_dir() and ((p / ".hydra").is_dir() or (p / "final_metrics.json").is_file())


def gather(multirun_dir: str | Path) -> list[dict]:
    """One dict per job: ``{"job", "status", "step", "overrides": {key: value}, "metrics": {name: value},
    "settings": {...} or None, "dir"}``, jobs in number order."""
    root = Path(multirun_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"multirun dir {root} does not exist")
    jobs = sorted(
        (p for p in root.iterdir() if _is_job(p)),
        key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name),
    )
    if not jobs:
        raise FileNotFoundError(f"no Hydra job dirs (<n>/.hydra/ or <n>/final_metrics.json) under {root}")
    rows = []
    for job in jobs:
        final = job / "final_metrics.json"
        settings = None
        if final.is_file():
            data = json.loads(final.read_text())
            metrics, status, step = data.get("metrics", {}), "finished", data.get("step")
            overrides, settings = data.get("overrides") or _overrides(job), data.get("settings")
        else:
            metrics, status, step, overrides = _last_csv_values(job), "unfinished", None, _overrides(job)
        pairs = override_pairs(overrides)
        rows.append(
            {
                "job": job.name,
                "status": status,
                "step": step,
                "overrides": pairs,
                "metrics": metrics,
                "settings": settings,
                "dir": str(job),
            }
        )
    return rows


def table(rows: list[dict], metrics: list[str] | None = None) -> tuple[list[str], list[list[str]]]:
    """Header and cells: job, the overrides that differ between jobs, status, step, then the metrics."""
    keys = sorted({k for r in rows for k in r["overrides"]})
    swept = [k for k in keys if len({r["overrides"].get(k) for r in rows}) > 1] or keys
    names = metrics or sorted({m for r in rows for m in r["metrics"]})
    header = ["job", *swept, "status", "step", *names]
    cells = []
    for r in rows:
        vals = [_fmt(r["metrics"].get(m)) for m in names]
        cells.append([r["job"], *(r["overrides"].get(k, "") for k in swept), r["status"], str(r["step"] or ""), *vals])
    return header, cells


def _fmt(v) -> str:
    if v is None:
        return ""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def markdown(header: list[str], cells: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def write_csv(path: str | Path, header: list[str], cells: list[list]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *cells])
    return path


# --------------------------------------------------------------------------------------------- sampling sweeps

# the columns of a sampling sweep's CSV: the stage's settings, the seeds merged, then the scores (the strict
# checker's strict/all first: the headline, with its bootstrap 95 % interval over the checked images of all seeds)
SAMPLING_COLUMNS = (
    "job",
    "guidance",
    "sampler",
    "steps",
    "seeds",
    "strict_all",
    "strict_all_lo",
    "strict_all_hi",
    "checked",
    "clip_fd",
    "fid",
    "clip_score",
    "checker_all",
    "checker_mean",
    "seconds_per_image",
    "num_images",
)
_METRIC_KEYS = {
    "strict_all": "checker/strict/all",
    "checked": "checker/num_samples",
    "clip_fd": "clip_fd",
    "fid": "fid",
    "clip_score": "clip_score",
    "checker_all": "checker/accuracy/all",
    "checker_mean": "checker/accuracy/mean",
    "seconds_per_image": "seconds_per_image",
    "num_images": "num_images",
}


def sampling_rows(rows: list[dict], stage: str = "decoder") -> list[dict]:
    """Jobs of an ``eval/sample.py`` sweep -> one flat dict per setting with :data:`SAMPLING_COLUMNS`: the
    ``stage``'s resolved guidance / sampler / steps from the job's settings; jobs that differ only in their ``seed``
    override are merged into one row (``job``: their numbers, ``seeds``: how many; scores: the mean over them;
    ``strict_all_lo`` / ``_hi``: the bootstrap 95 % interval of ``strict_all`` over the checked images of all of
    them, ``checked`` their number).  Missing scores are None."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        st = (r.get("settings") or {}).get(stage)
        if r["status"] != "finished" or not isinstance(st, dict):
            continue
        flat = {
            "job": r["job"],
            "guidance": float(st["guidance_scale"]),
            "sampler": str(st["sampler"]),
            "steps": int(st["steps"]),
        }
        flat.update({col: r["metrics"].get(key) for col, key in _METRIC_KEYS.items()})
        rest = tuple(sorted((k, v) for k, v in r["overrides"].items() if k != "seed"))
        groups.setdefault((flat["guidance"], flat["sampler"], flat["steps"], rest), []).append(flat)
    if not groups:
        raise ValueError(f"no finished eval/sample.py job with {stage!r} settings among {len(rows)} jobs")
    return [_merge_seeds(g) for g in groups.values()]


def _merge_seeds(jobs: list[dict]) -> dict:
    """One row from the jobs of one setting (one per seed): means, and strict/all's interval over all images."""
    from dalle2.metrics.bootstrap import fraction_ci

    out = {k: jobs[0][k] for k in ("guidance", "sampler", "steps")}
    out["job"] = ",".join(j["job"] for j in jobs)
    out["seeds"] = len(jobs)
    for col in _METRIC_KEYS:
        vals = [j[col] for j in jobs if isinstance(j.get(col), (int, float))]
        out[col] = (sum(vals) if col in ("checked", "num_images") else sum(vals) / len(vals)) if vals else None
    out["strict_all_lo"] = out["strict_all_hi"] = None
    scored = [j for j in jobs if j.get("strict_all") is not None and j.get("checked")]
    if scored:
        est = fraction_ci([j["strict_all"] for j in scored], [j["checked"] for j in scored])
        out["strict_all"], out["strict_all_lo"], out["strict_all_hi"] = est["mean"], est["lo"], est["hi"]
    return out


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _quality_key(rows: Sequence[dict]) -> str:
    return "fid" if all(r.get("fid") is not None for r in rows) else "clip_fd"


def plot_tradeoff(rows: Sequence[dict], path: str | Path) -> Path | None:
    """CLIP-FD (FID when every job has it) against CLIP score: one curve per (sampler, steps) through its guidance
    values, each point labelled with its guidance scale.  None when no job has both scores."""
    rows = [r for r in rows if r.get("clip_score") is not None and r.get("clip_fd") is not None]
    if not rows:
        return None
    plt = _pyplot()
    y = _quality_key(rows)
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=100)
    for sampler, steps in sorted({(r["sampler"], r["steps"]) for r in rows}):
        pts = sorted((r for r in rows if (r["sampler"], r["steps"]) == (sampler, steps)), key=lambda r: r["guidance"])
        ax.plot([r["clip_score"] for r in pts], [r[y] for r in pts], marker="o", label=f"{sampler}, {steps} steps")
        for r in pts:
            ax.annotate(
                f"{r['guidance']:g}", (r["clip_score"], r[y]), textcoords="offset points", xytext=(4, 4), fontsize=8
            )
    ax.set_xlabel("CLIP score (higher: closer to the prompt)")
    ax.set_ylabel(("FID" if y == "fid" else "CLIP-FD") + " (lower: closer to the data)")
    ax.set_title("guidance trade-off (labels: guidance scale)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, plt, path)


def plot_steps(rows: Sequence[dict], path: str | Path) -> Path | None:
    """Quality against sampling steps, one curve per (sampler, guidance): CLIP-FD (or FID), the strict checker's
    ``strict/all`` and the lenient all-attributes accuracy (panels whose metric no job has are left out)."""
    panels = [
        (_quality_key(rows), "FID" if _quality_key(rows) == "fid" else "CLIP-FD (lower is better)"),
        ("strict_all", "strict checker: strict/all"),
        ("checker_all", "checker: all attributes right"),
        ("seconds_per_image", "seconds per image"),
    ]
    panels = [(k, t) for k, t in panels if any(r.get(k) is not None for r in rows)]
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), dpi=100, squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        for sampler, guidance in sorted({(r["sampler"], r["guidance"]) for r in rows}):
            pts = sorted(
                (r for r in rows if (r["sampler"], r["guidance"]) == (sampler, guidance) and r.get(key) is not None),
                key=lambda r: r["steps"],
            )
            if pts:
                ax.plot(
                    [r["steps"] for r in pts], [r[key] for r in pts], marker="o", label=f"{sampler}, g={guidance:g}"
                )
        ax.set_xscale("log")
        ticks = sorted({r["steps"] for r in rows})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("sampling steps")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, plt, path)


def _save(fig, plt, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
