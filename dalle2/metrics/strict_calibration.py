"""The strict checker's calibration: thresholds chosen on pictures of the val stream, the acceptance table reported on
pictures of the test stream (:mod:`dalle2.data.checker_calibration` draws both).

:func:`choose_thresholds` applies one rule to every measurement: the bar lies halfway between the accepted cases'
0.5th percentile (``clean`` and ``jpeg95`` renders: they must pass) and the 99.5th percentile of the cases that must
fail on that measurement (:data:`REJECT_POOLS`), each pooled over the picture sizes (for "lower is better"
measurements the other way round).  Where the two overlap (small objects at 32 px carry little shape information),
the midpoint splits the overlap: the table shows the price on both sides.

:func:`calibration_table` gives, per case and picture size, ``strict/all`` and every verdict's acceptance with a
bootstrap 95 % interval over the pictures of all seeds (:mod:`dalle2.metrics.bootstrap`), the lenient reader's
``accuracy/all``, and for ``shuffled`` the chance levels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from dalle2.data.checker import checker_rows, summarize_rows
from dalle2.data.checker_calibration import EXPECT, available, calibration_images, chance_levels
from dalle2.data.strict_checker import STRICT, VERDICTS, StrictThresholds, decide, measure
from dalle2.metrics.bootstrap import over_seeds

__all__ = [
    "ACCEPT",
    "REJECT_POOLS",
    "RULES",
    "measure_cases",
    "choose_thresholds",
    "calibration_table",
    "calibration_markdown",
    "calibration_display",
]

ACCEPT = ("clean", "jpeg95")  # the pictures every bar must let through
# threshold field -> (measurement, "ge" (pass when >=) or "le", the cases whose pictures it must reject)
RULES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "iou": ("iou", "ge", ("skew",)),
    "margin": ("margin", "ge", ("superellipse25", "superellipse3", "superellipse4")),
    "color_de": ("color_de", "le", ("hue_off", "shuffled")),
    "background_de": ("background_de", "le", ("shuffled",)),
    "size_tol": ("size_error", "le", ("size_off", "shuffled")),
    "position_tol": ("position_error", "le", ("position_off", "shuffled")),
    "edge_width": ("edge_width", "le", ("blur1", "blur2", "blur3", "bicubic_x4")),
}
REJECT_POOLS = {field: pool for field, (_, _, pool) in RULES.items()}
_ATTR_OF = {"color_de": "color", "background_de": "background", "size_error": "size", "position_error": "position"}


def measure_cases(
    cases: Sequence[str], sizes: Sequence[int], n: int, seed: int = 0, stream: str = "val"
) -> dict[tuple[str, int], dict]:
    """:func:`~dalle2.data.strict_checker.measure` of ``n`` pictures of every (case, size) (skipping a case a size
    cannot draw), plus ``attrs`` (the prompts' attributes) and ``drawn`` (what the pictures show)."""
    out = {}
    for case in cases:
        for size in sizes:
            if not available(case, size):
                continue
            images, attrs = calibration_images(case, n, size, seed, stream)
            m = measure(images, attrs)
            m["attrs"] = attrs
            m["drawn"] = calibration_images("clean", n, size, seed, stream)[1] if case == "shuffled" else attrs
            out[(case, size)] = m
    return out


def _values(m: dict, key: str, case: str) -> np.ndarray:
    """The measurement ``key`` of ``case``'s pictures that the rule looks at: for ``shuffled``, only the pictures
    whose prompt names a different value of the measured attribute than the one drawn (the others are right)."""
    x = np.asarray(m[key], dtype=np.float64)
    if case == "shuffled":
        attr = _ATTR_OF.get(key)
        wrong = np.array([a.get(attr) != d.get(attr) for a, d in zip(m["attrs"], m["drawn"])], dtype=bool)
        x = x[wrong] if attr else x[:0]
    return x[np.isfinite(x)]


def choose_thresholds(
    measured: dict[tuple[str, int], dict], base: StrictThresholds = STRICT
) -> tuple[StrictThresholds, dict[str, dict]]:
    """The bars of :data:`RULES` from ``measured`` (:func:`measure_cases` on the val stream) and, per bar, how it
    was chosen: ``{"accept_q": the accepted cases' 0.5th / 99.5th percentile, "reject_q": the rejected pool's
    99.5th / 0.5th, "separable": whether they leave a gap, "value": the bar}``."""
    chosen, why = {}, {}
    for field, (key, sense, pool) in RULES.items():
        acc = np.concatenate([_values(m, key, c) for (c, _), m in measured.items() if c in ACCEPT] or [np.zeros(0)])
        rej = np.concatenate([_values(m, key, c) for (c, _), m in measured.items() if c in pool] or [np.zeros(0)])
        if not len(acc) or not len(rej):
            raise ValueError(f"choose_thresholds: no pictures of {ACCEPT} or of {pool} to place the {field} bar")
        if sense == "ge":
            a, r = float(np.quantile(acc, 0.005)), float(np.quantile(rej, 0.995))
            separable = a > r
        else:
            a, r = float(np.quantile(acc, 0.995)), float(np.quantile(rej, 0.005))
            separable = a < r
        value = round((a + r) / 2.0, 3)
        chosen[field] = value
        why[field] = {
            "measurement": key,
            "pass_when": ">=" if sense == "ge" else "<=",
            "accept_q": a,
            "reject_q": r,
            "reject_cases": list(pool),
            "separable": bool(separable),
            "value": value,
        }
    return dataclasses.replace(base, **chosen), why


def calibration_table(
    thresholds: StrictThresholds = STRICT,
    *,
    cases: Sequence[str] = tuple(EXPECT),
    sizes: Sequence[int] = (32, 64, 256),
    n: int = 128,
    seeds: Sequence[int] = (0, 1, 2),
    stream: str = "test",
    log=None,
) -> list[dict]:
    """One row per (case, size): the expectation, ``strict/all`` and each ``strict/<verdict>`` acceptance with its
    bootstrap 95 % interval (``<key>_ci``: [lo, hi]) over the ``n`` pictures of each of ``seeds`` (test stream),
    the lenient ``accuracy/all``, the IoU 1st percentile and the median edge width; for ``shuffled`` also
    ``chance/<attr>`` (the fraction of prompts that name what is drawn anyway)."""
    rows = []
    for case in cases:
        for size in sizes:
            if not available(case, size):
                continue
            per_seed: dict[str, list[np.ndarray]] = {}
            lenient, ious, widths, chance = [], [], [], []
            for seed in seeds:
                images, attrs = calibration_images(case, n, size, seed, stream)
                v = decide(measure(images, attrs, min_object_frac=thresholds.min_object_frac), thresholds)
                for key in ("all", *VERDICTS):
                    per_seed.setdefault(key, []).append(v[key].astype(np.float64))
                lenient.append(summarize_rows(checker_rows(images, attrs, strict=False))["accuracy/all"])
                ious.append(v["iou"])
                widths.append(v["edge_width"])
                if case == "shuffled":
                    chance.append(chance_levels(n, size, seed, stream))
            expect, verdict = EXPECT[case]
            row = {"case": case, "image_size": size, "expect": expect, "fails_on": verdict}
            for key, groups in per_seed.items():
                est = over_seeds(groups)
                row[f"strict/{key}"] = est["mean"]
                row[f"strict/{key}_ci"] = [est["lo"], est["hi"]]
            row["n"], row["seeds"] = n * len(seeds), list(seeds)
            row["accuracy/all"] = float(np.mean(lenient))
            row["strict/iou_p01"] = float(np.quantile(np.concatenate(ious), 0.01))
            width = np.concatenate(widths)
            row["strict/edge_width_median"] = float(np.median(width[np.isfinite(width)])) if len(width) else None
            if chance:
                for key in chance[0]:
                    row[key] = float(np.mean([c[key] for c in chance]))
            rows.append(row)
            if log:
                log(f"[calibration] {case} {size} px: strict/all {100 * row['strict/all']:.1f} %")
    return rows


def calibration_markdown(rows: Sequence[dict]) -> str:
    """A Markdown table of :func:`calibration_table` rows: case, px, expectation, ``strict/all`` with its 95 %
    interval, the verdict a rejected case must fail and its acceptance, the lenient ``accuracy/all``."""
    head = ["case", "px", "expect", "strict/all [95 % CI]", "failing verdict: accepted", "lenient all", "n (seeds)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lo, hi = r["strict/all_ci"]
        verdict = r.get("fails_on")
        tail = f"{verdict}: {100 * r[f'strict/{verdict}']:.1f}" if verdict else ""
        if r["case"] == "shuffled":
            tail = f"chance/all {100 * r['chance/all']:.1f}"
        cells = [
            r["case"],
            str(r["image_size"]),
            r["expect"],
            f"{100 * r['strict/all']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]",
            tail,
            f"{100 * r['accuracy/all']:.1f}",
            f"{r['n']} ({len(r['seeds'])})",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def calibration_display(rows: Sequence[dict], why: dict | None = None) -> dict:
    """What docs/checker.md shows (``dalle2.results`` renders it): ``table``, one display row per
    :func:`calibration_table` row (percentages, the interval as text, the verdict a rejected case must fail and its
    acceptance, the chance level of ``shuffled``), ``chance`` (per size, the shuffled prompts' chance level of each
    attribute beside its strict verdict's acceptance), and ``bars`` (per threshold of :func:`choose_thresholds`: the
    bar, the rule's two percentiles on the val stream, the rejected cases, whether they leave a gap)."""
    table = []
    for r in rows:
        lo, hi = r["strict/all_ci"]
        verdict = r.get("fails_on")
        table.append(
            {
                "case": r["case"],
                "px": r["image_size"],
                "expect": r["expect"] + (f" ({verdict})" if verdict else ""),
                "strict/all %": 100 * r["strict/all"],
                "95 % CI": f"{100 * lo:.1f}-{100 * hi:.1f}",
                "that verdict %": 100 * r[f"strict/{verdict}"] if verdict else "",
                "chance %": 100 * r["chance/all"] if "chance/all" in r else "",
                "lenient all %": 100 * r["accuracy/all"],
                "n": r["n"],
            }
        )
    out = {"table": table}
    attrs = ("shape", "color", "background", "size", "position")
    out["chance"] = [
        {
            "px": r["image_size"],
            **{f"{a}: chance %": 100 * r[f"chance/{a}"] for a in attrs},
            **{f"{a}: strict %": 100 * r[f"strict/{a}"] for a in attrs},
            "all: chance %": 100 * r["chance/all"],
            "all: strict %": 100 * r["strict/all"],
        }
        for r in rows
        if r["case"] == "shuffled"
    ]
    if why:
        out["bars"] = {
            field: {
                "bar": w["value"],
                "pass when": f"{w['measurement']} {w['pass_when']} bar",
                "accepted (val)": w["accept_q"],
                "rejected (val)": w["reject_q"],
                "rejected cases": ", ".join(w["reject_cases"]),
                "gap": "yes" if w["separable"] else "no: overlap split",
            }
            for field, w in why.items()
        }
    return out
