"""Which stage of the cascade loses fidelity?  Strict and lenient checker scores per stage, and the checker's
own calibration; JSON and a Markdown table out.

    # per stage on the first 256 test captions of a train_all.py run (clip/prior/decoder/upsampler last.ckpt);
    # --split val while choosing settings (the sweep), --split test for the figures you report
    python eval/fidelity_ablation.py run --run-dir demo_out --split test --num 256 \
        [--sweep] [--sweep-num 128] --out abl.json --md abl.md
    # the strict checker's calibration: thresholds chosen on val pictures, the acceptance table on test pictures
    python eval/fidelity_ablation.py calibrate --out results/checker_calibration.json --md cal.md

``run`` (``dalle2.metrics.fidelity.stage_fidelity``): real val images (the ceiling); (a) decoder samples from the
val images' own CLIP image embeddings; (b) those upsampled by the upsampler and by bicubic; (c) decoder samples
from the prior's embeddings of the captions; (d) the full pipeline (= (c) upsampled).  A run without an upsampler
checkpoint (the 64 px demo decoder) has no (b), and its (d) is (c).  ``--sweep``: (d) again on
the first ``--sweep-num`` captions (same prior embeddings) for each decoder sampler x steps at the default guidance,
and each other guidance scale at the default sampler and steps (``--samplers``, ``--steps-list``,
``--guidance-list``).  Sampling settings are
``SamplingSettings``' defaults unless given (``--prior-steps``, ``--decoder-steps``, ...).  The same arguments give
the same figures.

``calibrate`` (``dalle2.metrics.strict_calibration``): the strict checker's bars chosen on ``--num-val`` pictures per
case and size of the val stream (``choose_thresholds``: halfway between what must pass and what must fail), then
the acceptance of every calibration case (``dalle2.data.checker_calibration``) at 32, 64 and 256 px on ``--num``
pictures per seed of the test stream, ``strict/all`` and each verdict with bootstrap 95 % intervals over
``--seeds``; written with ``dalle2.results.write_result`` (``--out``).  It says whether the bars it chose are the
ones in the code (``dalle2.data.strict_checker.STRICT``); ``--use-code-thresholds`` reports with those instead.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dalle2.pipeline import SamplingSettings, StageSettings, UnCLIPPipeline  # noqa: E402


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="strict / lenient fidelity per stage of a trained cascade")
    r.add_argument("--run-dir", default=None, help="a train_all.py out_dir (its <stage>/checkpoints/last.ckpt)")
    for stage in ("clip", "prior", "decoder", "upsampler"):
        r.add_argument(f"--{stage}", default=None, help=f"{stage} checkpoint (default: from --run-dir)")
    r.add_argument(
        "--split", choices=["val", "test"], default="test", help="built-in split: val to choose, test to report"
    )
    r.add_argument("--data-dir", default="data_builtin", help="the built-in data (python -m dalle2.data.synthetic)")
    r.add_argument("--val", default=None, help="captioned shards instead of DATA_DIR/SPLIT/{00000..00001}.tar")
    r.add_argument("--num", type=int, default=256, help="the first NUM val samples")
    r.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="sampling seeds (>= 3 for reporting)")
    r.add_argument("--batch-size", type=int, default=64)
    r.add_argument("--prior-steps", type=int, default=None)
    r.add_argument("--prior-guidance", type=float, default=None)
    r.add_argument("--n-prior-samples", type=int, default=None)
    r.add_argument("--decoder-steps", type=int, default=None)
    r.add_argument("--decoder-sampler", default=None)
    r.add_argument("--decoder-guidance", type=float, default=None)
    r.add_argument("--upsampler-steps", type=int, default=None)
    r.add_argument("--sweep", action="store_true", help="also (d) per decoder sampler / steps / guidance")
    r.add_argument("--sweep-num", type=int, default=128, help="captions for the sweep (the first ones)")
    r.add_argument("--samplers", nargs="+", default=["ddim", "dpmpp_2m"])
    r.add_argument("--steps-list", nargs="+", type=int, default=[10, 25, 50])
    r.add_argument("--guidance-list", nargs="+", type=float, default=[1.0, 3.0, 5.0])
    r.add_argument("--out", default=None, help="JSON path")
    r.add_argument("--md", default=None, help="Markdown table path")
    c = sub.add_parser("calibrate", help="the strict checker's bars (val) and acceptance per calibration case (test)")
    c.add_argument("--num", type=int, default=128, help="test pictures per case, size and seed")
    c.add_argument("--num-val", type=int, default=128, help="val pictures per case and size (choosing the bars)")
    c.add_argument("--sizes", nargs="+", type=int, default=[32, 64, 256])
    c.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="test streams' seeds")
    c.add_argument("--cases", nargs="+", default=None, help="calibration cases (default: all)")
    c.add_argument("--use-code-thresholds", action="store_true", help="report with STRICT, choose nothing")
    c.add_argument("--out", default=None, help="results JSON (dalle2.results.write_result)")
    c.add_argument("--md", default=None)
    return p.parse_args(argv)


def settings_from_args(a: argparse.Namespace) -> SamplingSettings:
    base = SamplingSettings()

    def stage(st: StageSettings, **kw) -> StageSettings:
        return StageSettings(**{**st.__dict__, **{k: v for k, v in kw.items() if v is not None}})

    return SamplingSettings(
        prior=stage(base.prior, steps=a.prior_steps, guidance_scale=a.prior_guidance),
        decoder=stage(
            base.decoder, steps=a.decoder_steps, sampler=a.decoder_sampler, guidance_scale=a.decoder_guidance
        ),
        upsampler=stage(base.upsampler, steps=a.upsampler_steps),
        n_prior_samples=a.n_prior_samples or base.n_prior_samples,
        threshold=base.threshold,
    )


def sweep_settings(a: argparse.Namespace, default: StageSettings) -> list[dict]:
    """Sampler x steps at the default guidance, then the other guidance scales at the default sampler and steps."""
    out = [{"sampler": s, "steps": n} for s in a.samplers for n in a.steps_list]
    out += [{"guidance_scale": g} for g in a.guidance_list if g != default.guidance_scale]
    return out


def _checkpoints(a: argparse.Namespace) -> dict[str, str]:
    """The stages' checkpoints; the upsampler is optional (a run without one, e.g. the 64 px demo decoder)."""
    out = {}
    for stage in ("clip", "prior", "decoder", "upsampler"):
        path = getattr(a, stage) or (Path(a.run_dir) / stage / "checkpoints" / "last.ckpt" if a.run_dir else None)
        if path is None or not Path(path).is_file():
            if stage == "upsampler" and not a.upsampler:
                continue
            raise SystemExit(f"error: no {stage} checkpoint: give --{stage} or --run-dir (looked for {path})")
        out[stage] = str(path)
    return out


def run(a: argparse.Namespace) -> dict:
    from dalle2.metrics.fidelity import load_val, stage_fidelity_seeds

    ckpts = _checkpoints(a)
    pipe = UnCLIPPipeline.from_checkpoints(
        clip=ckpts["clip"], prior=ckpts["prior"], decoder=ckpts["decoder"], upsamplers=ckpts.get("upsampler", [])
    )
    settings = settings_from_args(a)
    urls = a.val or f"{a.data_dir}/{a.split}/{{00000..00001}}.tar"
    val_low, *val_high = (load_val(urls, image_size=s, num=a.num) for s in pipe.sizes[:2])
    t0 = time.perf_counter()
    sweep = sweep_settings(a, settings.decoder) if a.sweep else ()
    rows = stage_fidelity_seeds(
        pipe,
        val_low,
        val_high[0] if val_high else None,
        settings=settings,
        seeds=a.seeds,
        batch_size=a.batch_size,
        sweep=sweep,
        sweep_num=a.sweep_num,
    )
    return {
        "rows": rows,
        "num": len(val_low["caption"]),
        "val": urls,
        "split": None if a.val else a.split,
        "seeds": a.seeds,
        "checkpoints": ckpts,
        "settings": settings.to_dict(),
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def calibrate(a: argparse.Namespace) -> dict:
    import dataclasses

    from dalle2.data.checker_calibration import CASES
    from dalle2.data.strict_checker import STRICT
    from dalle2.metrics.strict_calibration import (
        calibration_display,
        calibration_table,
        choose_thresholds,
        measure_cases,
    )

    cases = tuple(a.cases or CASES)
    t0 = time.perf_counter()
    if a.use_code_thresholds:
        th, why = STRICT, None
    else:
        print(f"[calibrate] choosing the bars on {a.num_val} val pictures per case and size {a.sizes}")
        th, why = choose_thresholds(measure_cases(CASES, a.sizes, a.num_val, seed=0, stream="val"))
    same = dataclasses.asdict(th) == dataclasses.asdict(STRICT)
    note = "the code's" if same else "NOT the code's: put them into dalle2.data.strict_checker.StrictThresholds"
    print(f"[calibrate] bars: {dataclasses.asdict(th)} ({note})")
    rows = calibration_table(th, cases=cases, sizes=a.sizes, n=a.num, seeds=a.seeds, stream="test", log=print)
    for r in rows:
        r["stage"], r["what"], r["size"] = "calibration", r["case"], r["image_size"]
    return {
        "thresholds": dataclasses.asdict(th),
        "thresholds_are_the_code_s": same,
        "chosen_on_val": why,
        "num_val": a.num_val,
        "rows": rows,
        **calibration_display(rows, why),
        "num": a.num,
        "seeds": a.seeds,
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def main(argv: list[str] | None = None) -> dict:
    from dalle2.metrics.fidelity import fidelity_table
    from dalle2.metrics.strict_calibration import calibration_markdown
    from dalle2.results import write_result

    a = _parse(argv)
    torch.set_grad_enabled(False)
    result = run(a) if a.cmd == "run" else calibrate(a)
    table = fidelity_table(result["rows"]) if a.cmd == "run" else calibration_markdown(result["rows"])
    if a.out:
        split = result.get("split") if a.cmd == "run" else "test"  # run --val URLS: not a built-in split
        write_result(
            a.out,
            result,
            checkpoints=result.get("checkpoints") if a.cmd == "run" else None,
            split=split,
            seeds=list(a.seeds),
            notes=None if a.cmd == "run" else "bars chosen on the val stream, table on the test stream",
        )
        print(f"[dalle2] wrote {a.out}")
    if a.md:
        Path(a.md).parent.mkdir(parents=True, exist_ok=True)
        Path(a.md).write_text(table + "\n")
        print(f"[dalle2] wrote {a.md}")
    print(table)
    return result


if __name__ == "__main__":
    main()
