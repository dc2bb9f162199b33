"""The strict checker's cost: seconds (process CPU time and wall) to judge N calibration pictures per size, one thread.

    python bench/strict_checker.py --num 256 --sizes 32 64 256 --result results/strict_checker_speed.json

Rendering is not timed.  Shapes are fitted at no more than 64 px (``dalle2.data.strict_checker.WORK_SIZE``), so
256 px costs about what 64 px costs plus the full-resolution mattes, objects and edge widths.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dalle2.data.checker_calibration import calibration_images  # noqa: E402
from dalle2.data.strict_checker import judge  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num", type=int, default=256)
    p.add_argument("--sizes", nargs="+", type=int, default=[32, 64, 256])
    p.add_argument("--case", default="clean")
    p.add_argument("--result", default=None, help="results JSON (dalle2.results.write_result)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    results = []
    for size in a.sizes:
        images, attrs = calibration_images(a.case, a.num, size, seed=0)
        judge(images[:4], attrs[:4])  # warm-up
        cpu, wall = time.process_time(), time.perf_counter()
        v = judge(images, attrs)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        results.append(
            {
                "image_size": size,
                "num": a.num,
                "cpu_s": round(cpu, 2),
                "wall_s": round(wall, 2),
                "ms_per_image_cpu": round(1000 * cpu / a.num, 1),
                "strict/all": float(v["all"].mean()),
            }
        )
        print(json.dumps(results[-1]))
    out = {"case": a.case, "threads": 1, "results": {str(r["image_size"]): r for r in results}}
    if a.result:
        from dalle2.results import write_result

        write_result(a.result, out, notes="one thread; the machine may be shared (cpu_s is the process's own time)")
        print(f"[bench] wrote {a.result}")
    return out


if __name__ == "__main__":
    main()
