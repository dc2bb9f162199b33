"""Write out_dir/report.md and report.html from what train/train_all.py left in out_dir.

    python train/demo_report.py demo_out

Reads, when present: <stage>/DONE.json (wall times), <stage>/csv/metrics.csv (loss curves, val metrics),
retrieval/metrics.json (CLIP R@1), prior val cosines, sample/grid.png + manifest.jsonl (generated images and
their prompts), evaluate/metrics.json (FID / CLIP-FD / CLIP score / attribute-checker accuracy), the decoder's and
upsampler's sample grids, a sampling sweep gathered by eval/sweep_gather.py into out_dir/sweep/ (sweep.csv,
tradeoff.png, steps.png) and each stage's offline wandb run dir (<stage>/wandb/offline-run-*). Anything missing is
reported as "not run". Plots go to out_dir/report/*.png.
"""

from __future__ import annotations

import csv
import html
import json
import math
import sys
from pathlib import Path

STAGES = ("clip", "retrieval", "embeddings", "prior", "decoder", "upsampler", "sample", "score_clip", "evaluate")
TRAINED = ("clip", "prior", "decoder", "upsampler")
NOT_RUN = "not run"


# --------------------------------------------------------------------------------------------- reading


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_metrics_csv(path: Path) -> dict[str, list[tuple[int, float]]]:
    """Every numeric column of a Lightning CSVLogger metrics.csv as ``{column: [(step, value), ...]}``."""
    series: dict[str, list[tuple[int, float]]] = {}
    if not path.is_file():
        return series
    with path.open() as f:
        for row in csv.DictReader(f):
            try:
                step = int(float(row.get("step") or 0))
            except ValueError:
                continue
            for k, v in row.items():
                if k in ("step", "epoch") or v in ("", None):
                    continue
                try:
                    series.setdefault(k, []).append((step, float(v)))
                except ValueError:
                    pass
    return series


def last(series: dict, key: str) -> float | None:
    return series[key][-1][1] if series.get(key) else None


def fmt(v, digits: int = 4) -> str:
    if v is None:
        return NOT_RUN
    if isinstance(v, float):
        return f"{v:.{digits}f}" if math.isfinite(v) else str(v)
    return str(v)


def attempts_note(attempts: list[dict] | None) -> str:
    """``1``, or ``3 (killed, failed (exit status 1), finished)``: how many attempts a stage took and how each
    ended (DONE.json's ``attempts``; none recorded: one)."""
    if not attempts or len(attempts) == 1:
        return "1"
    return f"{len(attempts)} ({', '.join(str(a.get('ended', '?')) for a in attempts)})"


def fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return NOT_RUN
    m, s = divmod(int(round(seconds)), 60)
    return f"{m} min {s:02d} s" if m else f"{s} s"


def checker_from_samples(sample_dir: Path) -> dict | None:
    """Attribute-checker figures (lenient ``accuracy/*`` and strict ``strict/*``, ``strict/all`` the headline) of the
    generated images vs the attributes their prompts name (built-in data), with ``strict/all``'s bootstrap 95 %
    interval over the images of all the seeds the manifest holds (``strict/all_ci``, ``num_images``, ``seeds``)."""
    manifest = sample_dir / "manifest.jsonl"
    if not manifest.is_file():
        return None
    try:
        import numpy as np
        from PIL import Image

        from dalle2.data.checker import CHECKER_COLUMNS, checker_rows, summarize_rows
        from dalle2.data.synthetic import parse_caption
        from dalle2.metrics.bootstrap import over_seeds

        images, attrs, seeds = [], [], []
        for line in manifest.read_text().splitlines():
            item = json.loads(line)
            want = parse_caption(item["prompt"], strict=False)
            if want and (sample_dir / item["file"]).is_file():
                images.append(np.asarray(Image.open(sample_dir / item["file"]).convert("RGB")))
                attrs.append(want)
                seeds.append(item.get("seed", 0))
        if not images:
            return None
        rows = checker_rows(np.stack(images), attrs)
        col = rows[:, CHECKER_COLUMNS.index("strict/all")]
        seeds = np.array(seeds)
        est = over_seeds([col[seeds == s] for s in sorted(set(seeds.tolist()))])
        return {
            **summarize_rows(rows),
            "strict/all": est["mean"],
            "strict/all_ci": [est["lo"], est["hi"]],
            "num_images": len(images),
            "seeds": est["seeds"],
        }
    except Exception as e:  # noqa: BLE001 - a report must not fail on one section
        print(f"[demo_report] attribute check skipped: {e}")
        return None


def strict_headline(checker: dict | None) -> str:
    """``strict/all`` as "X % [lo, hi] (n=N, k seeds)": the interval from the file when it holds one, else the
    percentile bootstrap of the ``num_samples`` / ``num_images`` 0/1 verdicts the fraction stands for."""
    value = pick(checker, "strict/all")
    if not isinstance(value, (int, float)):
        return NOT_RUN
    from dalle2.metrics.bootstrap import format_estimate, fraction_ci

    n = pick(checker, "num_images") or pick(checker, "num_samples")
    ci = pick(checker, "strict/all_ci")
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and n:
        est = {"mean": value, "lo": ci[0], "hi": ci[1], "n": int(n), "seeds": int(pick(checker, "seeds") or 1)}
    elif n:
        est = fraction_ci([value], [int(n)])
    else:
        return pct(value)
    return format_estimate(est)


# --------------------------------------------------------------------------------------------- plots


def plot_series(path: Path, title: str, curves: dict[str, list[tuple[int, float]]], *, smooth: int = 1) -> Path | None:
    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for name, pts in curves.items():
        steps = [p[0] for p in pts]
        vals = [p[1] for p in pts]
        if smooth > 1 and len(vals) > smooth:
            k = smooth
            vals = [
                sum(vals[max(0, i - k + 1) : i + 1]) / len(vals[max(0, i - k + 1) : i + 1]) for i in range(len(vals))
            ]
        ax.plot(steps, vals, marker="o" if len(pts) < 15 else None, label=name)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------- document


class Doc:
    """A tiny document model rendered both as Markdown and as HTML (no extra dependency)."""

    def __init__(self, root: Path):
        self.root, self.blocks = root, []

    def h(self, level: int, text: str):
        self.blocks.append(("h", level, text))

    def p(self, text: str):
        self.blocks.append(("p", text))

    def bullets(self, items: list[str]):
        if items:
            self.blocks.append(("ul", items))

    def table(self, header: list[str], rows: list[list[str]]):
        self.blocks.append(("table", header, rows))

    def img(self, path: Path | None, alt: str):
        if path is not None and path.is_file():
            self.blocks.append(("img", path.relative_to(self.root).as_posix(), alt))

    def markdown(self) -> str:
        out = []
        for b in self.blocks:
            if b[0] == "h":
                out += ["#" * b[1] + " " + b[2], ""]
            elif b[0] == "p":
                out += [b[1], ""]
            elif b[0] == "ul":
                out += [f"- {x}" for x in b[1]] + [""]
            elif b[0] == "table":
                out += ["| " + " | ".join(b[1]) + " |", "|" + "---|" * len(b[1])]
                out += ["| " + " | ".join(r) + " |" for r in b[2]] + [""]
            elif b[0] == "img":
                out += [f"![{b[2]}]({b[1]})", ""]
        return "\n".join(out)

    def html(self, title: str) -> str:
        e = html.escape
        out = [
            f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>"
            "body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:2px 8px}img{max-width:100%}</style></head><body>"
        ]
        for b in self.blocks:
            if b[0] == "h":
                out.append(f"<h{b[1]}>{e(b[2])}</h{b[1]}>")
            elif b[0] == "p":
                out.append(f"<p>{e(b[1])}</p>")
            elif b[0] == "ul":
                out.append("<ul>" + "".join(f"<li>{e(x)}</li>" for x in b[1]) + "</ul>")
            elif b[0] == "table":
                out.append("<table><tr>" + "".join(f"<th>{e(x)}</th>" for x in b[1]) + "</tr>")
                out += ["<tr>" + "".join(f"<td>{e(x)}</td>" for x in r) + "</tr>" for r in b[2]]
                out.append("</table>")
            elif b[0] == "img":
                out.append(f"<p><img src='{e(b[1])}' alt='{e(b[2])}'></p>")
        return "\n".join(out + ["</body></html>"])


# --------------------------------------------------------------------------------------------- report


def clip_score_scorer(evaluation: dict | None, out: Path) -> str:
    """Which CLIP gave the CLIP score, in words (the evaluation JSON's ``clip_score_clip``)."""
    path = ((evaluation or {}).get("clip_score_clip") or {}).get("path")
    if not path:
        return f"scoring CLIP {NOT_RUN}"
    p = Path(path).resolve()
    if (out / "score_clip").resolve() in p.parents:
        return "scored by an independent CLIP (stage score_clip: another seed, the other half of the train shards)"
    if (out / "clip").resolve() in p.parents:
        return "scored by the generator's own CLIP (it scores its own samples too kindly)"
    return f"scored by {path}"


def write_report(out_dir: str | Path, from_samples: dict | None = None) -> Path:
    """Write ``out_dir/report.md`` and ``report.html``; returns the Markdown path.  ``from_samples``: the
    :func:`checker_from_samples` figures when the caller has them already (computed here otherwise)."""
    out = Path(out_dir)
    figs = out / "report"
    doc = Doc(out)
    done = {s: read_json(out / s / "DONE.json") for s in STAGES}
    logs = {s: read_metrics_csv(out / s / "csv" / "metrics.csv") for s in TRAINED}
    retrieval = read_json(out / "retrieval" / "metrics.json") or read_json(out / "clip_retrieval.json")
    evaluation = read_json(out / "evaluate" / "metrics.json")
    checker = None
    if evaluation:
        checker = {k: v for k, v in flat_items(evaluation) if _is_checker_key(k)} or None
    if from_samples is None:  # with strict/all's interval over the seeds sampled
        from_samples = checker_from_samples(out / "sample")
    if checker is None:
        checker = from_samples
    elif from_samples:
        checker.update({k: from_samples[k] for k in ("strict/all_ci", "num_images", "seeds") if k in from_samples})
    prior = logs["prior"]
    cos = {k: last(prior, f"val/{k}") for k in ("cos_sampled", "cos_text_baseline", "cos_shuffled")}
    r1 = (retrieval or {}).get("image_to_text_R@1"), (retrieval or {}).get("text_to_image_R@1")

    doc.h(1, "dalle2: the whole unCLIP stack, trained, sampled and scored")
    doc.p(
        f"Output directory: `{out}`. Every figure below is read from the files the stages wrote; "
        f'"{NOT_RUN}" marks a stage or metric that is missing.'
    )

    # -- summary
    doc.h(2, "Summary")
    acc_all = pick(checker, "accuracy/all")
    acc_mean = pick(checker, "accuracy/mean")
    verdicts = ("shape", "color", "background", "size", "position", "sharp", "one_object", "inside")
    per_verdict = ", ".join(f"{v} {pct(pick(checker, f'strict/{v}'))}" for v in verdicts)
    doc.bullets(
        [
            f"strict fidelity of generated images vs their prompts (strict/all: every attribute judged strictly, "
            f"docs/checker.md): {strict_headline(checker)}; per verdict: {per_verdict}",
            f"lenient attribute reader: all attributes right {pct(acc_all)}, mean over attributes {pct(acc_mean)}",
            f"CLIP zero-shot retrieval R@1 on held-out shards: image->text {pct(r1[0])}, text->image {pct(r1[1])}"
            + (f" (chance {pct(1 / retrieval['num_samples'])})" if retrieval and retrieval.get("num_samples") else ""),
            f"prior val cosine(sampled, true image emb) {fmt(cos['cos_sampled'])} vs text-embedding baseline "
            f"{fmt(cos['cos_text_baseline'])} vs shuffled-caption control {fmt(cos['cos_shuffled'])}",
            f"FID {fmt(find(evaluation, 'fid')) if find(evaluation, 'fid') is not None or not evaluation else 'skipped (no Inception weights file: inception=...)'}, CLIP-FD {fmt(find(evaluation, 'clip_fd', 'fd_clip'))}, "
            f"CLIP score {fmt(find(evaluation, 'clip_score'))} (real images: "
            f"{fmt(find(evaluation, 'reference_clip_score'))}), {clip_score_scorer(evaluation, out)}",
        ]
    )

    # -- wall times
    doc.h(2, "Wall time per stage")
    total, total_cpu = 0.0, 0.0
    rows = []
    for s in STAGES:
        w, c = (done[s] or {}).get("wall_s"), (done[s] or {}).get("cpu_s")
        total, total_cpu = total + (w or 0.0), total_cpu + (c or 0.0)
        unknown = "n/a" if done[s] else NOT_RUN
        rows.append(
            [
                s,
                fmt_time(w) if w is not None else unknown,
                fmt_time(c) if c is not None else unknown,
                attempts_note((done[s] or {}).get("attempts")) if done[s] else "",
                (done[s] or {}).get("finished", ""),
            ]
        )
    ran = any(done.values())
    any_cpu = any((d or {}).get("cpu_s") is not None for d in done.values())
    rows.append(["total", fmt_time(total if ran else None), fmt_time(total_cpu) if any_cpu else "n/a", "", ""])
    doc.table(["stage", "wall time", "CPU time (all processes)", "attempts", "finished"], rows)
    doc.p(
        "CPU time is the stage's processes' user + system time: on a loaded machine it tells the cost better "
        "than the wall time (on N otherwise idle cores, wall ~ CPU / N). A stage killed (or failed) and resumed "
        "counts every attempt: its loss curves are one history, its times the sum of the attempts."
    )

    # -- samples
    doc.h(2, "Generated samples (prompts: held-out captions)")
    grid = out / "sample" / "grid.png"
    if grid.is_file():
        doc.img(grid, "samples with their prompts")
    else:
        doc.p(f"Samples: {NOT_RUN}.")
    prompts = out / "sample" / "prompts.txt"
    if prompts.is_file():
        lines = [x for x in prompts.read_text().splitlines() if x.strip()]
        doc.p(f"{len(lines)} prompts (sample/prompts.txt), e.g.: " + "; ".join(f'"{x}"' for x in lines[:4]))
    if checker:
        doc.table(
            ["attribute-checker metric", "value"],
            [
                [k, pct(v) if isinstance(v, float) and not k.endswith(("iou_mean", "_median")) else fmt(v, 3)]
                for k, v in sorted(checker.items())
                if not isinstance(v, (list, tuple))
            ],
        )
    else:
        doc.p(f"Attribute-checker accuracy: {NOT_RUN}.")

    # -- evaluation
    doc.h(2, "Image metrics (eval/evaluate.py task=samples)")
    if evaluation:
        doc.table(
            ["metric", "value"],
            [[k, "skipped" if v is None else fmt(v)] for k, v in flat_items(evaluation) if not _is_checker_key(k)],
        )
    else:
        doc.p(f"Evaluation: {NOT_RUN}.")

    # -- CLIP
    doc.h(2, "CLIP")
    if retrieval:
        doc.table(["retrieval (held-out shards)", "value"], [[k, fmt(v)] for k, v in sorted(retrieval.items())])
    else:
        doc.p(f"Retrieval: {NOT_RUN}.")
    loss_plot(doc, figs, "clip", logs["clip"])

    # -- prior
    doc.h(2, "Diffusion prior")
    if any(v is not None for v in cos.values()):
        doc.table(
            ["val cosine with the true CLIP image embedding", "value"],
            [
                ["sampled (prior)", fmt(cos["cos_sampled"])],
                ["text embedding (baseline)", fmt(cos["cos_text_baseline"])],
                ["sampled from shuffled captions (control)", fmt(cos["cos_shuffled"])],
            ],
        )
        doc.img(
            plot_series(
                figs / "prior_cosine.png",
                "prior: val cosine with the true image embedding",
                {k: prior.get(f"val/{k}", []) for k in cos},
            ),
            "prior cosines",
        )
    else:
        doc.p(f"Prior validation: {NOT_RUN}.")
    loss_plot(doc, figs, "prior", logs["prior"])

    # -- decoder and upsampler
    for s, title in (("decoder", "Decoder"), ("upsampler", "Upsampler")):
        doc.h(2, title)
        if not logs[s] and not done[s]:
            doc.p(f"{title}: {NOT_RUN}.")
            continue
        if s == "upsampler" and last(logs[s], "val/psnr") is not None:
            doc.p(
                f"val PSNR {fmt(last(logs[s], 'val/psnr'), 2)} dB vs bicubic {fmt(last(logs[s], 'val/psnr_bicubic'), 2)} dB"
            )
        loss_plot(doc, figs, s, logs[s])
        grids = sorted((out / s / "samples").glob("*.png")) if (out / s / "samples").is_dir() else []
        if grids:
            doc.p(
                f"Training-time sample grid ({grids[-1].stem}; "
                + ("rows: reference / upsampled / bicubic" if s == "upsampler" else "from val CLIP image embeddings")
                + ")"
            )
            doc.img(grids[-1], f"{s} samples")

    sweep_section(doc, out / "sweep")
    wandb_section(doc, out)

    md = out / "report.md"
    md.write_text(doc.markdown())
    (out / "report.html").write_text(doc.html("dalle2 report"))
    print(f"[dalle2] wrote {md} and {out / 'report.html'}")
    return md


def sweep_section(doc: Doc, sweep: Path) -> None:
    """The sampling sweep (``eval/sweep_gather.py MULTIRUN --out out_dir/sweep``): its table and plots."""
    doc.h(2, "Sampling sweep: guidance x sampler x steps")
    table_csv = sweep / "sweep.csv"
    if not table_csv.is_file():
        doc.p(
            f"Sweep: {NOT_RUN} (`python eval/sample.py -m ... guidance.decoder=1,2,3 sampler.decoder=ddim,dpmpp_2m "
            "steps.decoder=10,25,50`, then `python eval/sweep_gather.py MULTIRUN_DIR --out OUT_DIR/sweep`)."
        )
        return
    with table_csv.open() as f:
        rows = list(csv.reader(f))
    doc.table(rows[0], [[fmt(float(v)) if _is_number(v) else v for v in r] for r in rows[1:]])
    for name, alt in (
        ("tradeoff", "CLIP-FD against CLIP score per guidance scale"),
        ("steps", "quality against sampling steps per sampler"),
    ):
        if (sweep / f"{name}.png").is_file():
            doc.img(sweep / f"{name}.png", alt)


def _is_number(v: str) -> bool:
    try:
        float(v)
    except ValueError:
        return False
    return "." in v or "e" in v


def wandb_section(doc: Doc, out: Path) -> None:
    """Each trained stage's offline wandb run dirs (``logger=wandb``), with how to upload them."""
    doc.h(2, "wandb runs")
    runs = [(s, d) for s in TRAINED for d in sorted((out / s / "wandb").glob("offline-run-*"))]
    if not runs:
        doc.p(f"wandb: {NOT_RUN} (the stages logged with logger=csv; train with logger=wandb to get offline runs).")
        return
    doc.table(["stage", "offline wandb run"], [[s, f"`{d.relative_to(out)}`"] for s, d in runs])
    doc.p("Upload them with `wandb sync <dir>` (or `wandb sync " + str(out) + "/*/wandb/offline-run-*`).")


def loss_plot(doc: Doc, figs: Path, stage: str, series: dict) -> None:
    curves = {k: v for k, v in series.items() if k in ("train/loss", "val/loss")}
    smooth = max(1, len(series.get("train/loss", [])) // 30)
    path = plot_series(figs / f"loss_{stage}.png", f"{stage}: loss", curves, smooth=smooth)
    if path:
        doc.img(path, f"{stage} loss")
    else:
        doc.p(f"{stage} loss curve: {NOT_RUN}.")


def flat_items(d: dict, prefix: str = "") -> list[tuple[str, object]]:
    items = []
    for k, v in d.items():
        if isinstance(v, dict):
            items += flat_items(v, f"{prefix}{k}.")
        elif isinstance(v, (int, float, str, bool)) or v is None:
            items.append((f"{prefix}{k}", v))
    return items


def find(d: dict | None, *names: str):
    """The first numeric value whose (flattened) key ends with one of ``names``."""
    if not d:
        return None
    for k, v in flat_items(d):
        key = k.lower().replace("-", "_")
        if any(key == n or key.endswith("." + n) or key.endswith("/" + n) for n in names) and isinstance(
            v, (int, float)
        ):
            return float(v)
    return None


def pick(d: dict | None, key: str):
    if not d:
        return None
    for k, v in d.items():
        if k == key or k.endswith("." + key) or k.endswith(key):
            return v
    return None


def _is_checker_key(key: str) -> bool:
    return "accuracy" in key or "strict/" in key or key.startswith("checker.")


def pct(v) -> str:
    return f"{100 * v:.1f} %" if isinstance(v, (int, float)) else NOT_RUN


def demo_figures(out_dir: str | Path, from_samples: dict | None = None) -> dict:
    """The run's headline figures, as the report shows them: strict/all (with its interval, images and seeds), the
    strict verdicts, the lenient reader, CLIP R@1, FID / CLIP-FD / CLIP score (samples and real images), and each
    stage's wall and CPU seconds with their totals."""
    out = Path(out_dir)
    evaluation = read_json(out / "evaluate" / "metrics.json") or {}
    retrieval = read_json(out / "retrieval" / "metrics.json") or {}
    checker = (checker_from_samples(out / "sample") if from_samples is None else from_samples) or {}
    figures: dict = {k: v for k, v in checker.items() if not isinstance(v, dict)}
    for key, names in (
        ("fid", ("fid",)),
        ("clip_fd", ("clip_fd", "fd_clip")),
        ("clip_score", ("clip_score",)),
        ("reference_clip_score", ("reference_clip_score",)),
    ):
        figures[key] = find(evaluation, *names)
    for key in ("image_to_text_R@1", "text_to_image_R@1", "num_samples"):
        figures[f"retrieval/{key}"] = retrieval.get(key)
    stages, total_wall, total_cpu = {}, 0.0, 0.0
    for s in STAGES:
        done = read_json(out / s / "DONE.json")
        if done:
            stages[s] = {"wall_s": done.get("wall_s"), "cpu_s": done.get("cpu_s")}
            total_wall += done.get("wall_s") or 0.0
            total_cpu += done.get("cpu_s") or 0.0
    figures.update({"stages": stages, "total_wall_min": total_wall / 60, "total_cpu_min": total_cpu / 60})
    return figures


def main(argv: list[str]) -> None:
    """``demo_report.py OUT_DIR [--result results/demo.json]``: the report, and with ``--result`` the headline
    figures as a results file (dalle2.results.write_result: the command, git sha, machine, checkpoint sha256s)."""
    args = list(argv)
    result = None
    if "--result" in args:
        i = args.index("--result")
        result = args[i + 1]
        del args[i : i + 2]
    out = args[0] if args else "demo_out"
    from_samples = checker_from_samples(Path(out) / "sample")  # once, for the report and the results file
    write_report(out, from_samples)
    if result:
        from dalle2.results import write_result

        ckpts = {
            s: Path(out) / s / "checkpoints" / "last.ckpt"
            for s in ("clip", "prior", "decoder", "upsampler", "score_clip")
        }
        path = write_result(
            result,
            demo_figures(out, from_samples),
            checkpoints={s: str(p) for s, p in ckpts.items() if p.is_file()},
            split="test",
            seeds=sorted(
                {
                    int(json.loads(x).get("seed", 0))
                    for x in (Path(out) / "sample" / "manifest.jsonl").read_text().splitlines()
                    if x.strip()
                }
            )
            if (Path(out) / "sample" / "manifest.jsonl").is_file()
            else None,
            notes=f"train_all run in {out} (its train_all.yaml holds the settings)",
        )
        print(f"[dalle2] wrote {path}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main(sys.argv[1:])
