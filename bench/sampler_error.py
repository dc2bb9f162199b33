"""Sampler error on an analytic target: ``python bench/sampler_error.py [--out FILE.json] [--result results/F.json]``.

Data x0 ~ mixture of isotropic Gaussians in 2-D (or one Gaussian): the exact denoiser E[x0 | x_t] is closed
form, so sampler error is pure discretisation error.  For every sampler and step count we report
- ``ode_err``: mean |x - x_ref| over samples started from the same x_T, where x_ref is the probability-flow ODE
  solved accurately (Heun over all 1000 training timesteps); deterministic samplers only;
- ``sw2``: sliced 2-Wasserstein distance between the samples and fresh target samples (all samplers; the
  Monte-Carlo floor, target vs target, is printed too);
- ``nfe``: model evaluations.
Timesteps use ``spacing="trailing"`` unless the row says karras; schedule cosine (T=1000), eps objective.
On the 4-mode mixture the sliced-W2 is dominated by mode-weight sampling noise: read the ODE error there.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from dalle2.diffusion import GaussianDiffusion, Schedule, sample
from dalle2.diffusion.gaussian import eps_from_x0, v_from_x0_eps

# (row name, sampler, spacing); euler on "trailing" is algebraically ddim, so it is shown with karras spacing
VARIANTS = [
    ("ddpm", "ddpm", "trailing"),
    ("ddim", "ddim", "trailing"),
    ("dpmpp_2m", "dpmpp_2m", "trailing"),
    ("heun", "heun", "trailing"),
    ("euler_karras", "euler", "karras"),
    ("heun_karras", "heun", "karras"),
]
STEPS = [5, 10, 20, 50]


def mixture(name: str):
    if name == "gaussian":
        return torch.tensor([[0.5, -1.0]], dtype=torch.float64), 0.5
    if name == "mixture":  # 4 well separated modes: the posterior mean bends sharply
        ang = torch.arange(4, dtype=torch.float64) * math.pi / 2
        return torch.stack([ang.cos(), ang.sin()], 1) * 1.5, 0.25
    raise ValueError(name)


def exact_x0(x, abar, means, std):
    a = abar.sqrt()
    var = abar * std**2 + (1 - abar)
    diff = x[:, None, :] - a[:, None] * means[None]
    r = torch.softmax(-(diff**2).sum(-1) / (2 * var), dim=1)
    return (r[..., None] * (means[None] + (a * std**2 / var)[:, None] * diff)).sum(1)


def make_model(diffusion, means, std, counter):
    def model_fn(x, t):
        counter[0] += 1
        abar = diffusion.alphas_cumprod.to(x.dtype)[t][:, None]
        x0 = exact_x0(x, abar, means, std)
        if diffusion.objective == "x0":
            return x0
        eps = eps_from_x0(x, x0, abar)
        return eps if diffusion.objective == "eps" else v_from_x0_eps(x0, eps, abar)

    return model_fn


def sliced_w2(a: torch.Tensor, b: torch.Tensor, n_proj: int = 128, seed: int = 0) -> float:
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(a.shape[1], n_proj, generator=g, dtype=a.dtype)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    pa, pb = (a @ dirs).sort(0).values, (b @ dirs).sort(0).values
    if len(pa) != len(pb):  # compare quantiles
        q = torch.linspace(0, 1, min(len(pa), len(pb)), dtype=a.dtype)
        pa, pb = torch.quantile(pa, q, dim=0), torch.quantile(pb, q, dim=0)
    return ((pa - pb) ** 2).mean().sqrt().item()


def run(target: str, schedule: str, objective: str, n: int, seed: int) -> dict:
    d = GaussianDiffusion(schedule=Schedule.make(schedule, 1000), objective=objective)
    means, std = mixture(target)
    counter = [0]
    model = make_model(d, means, std, counter)
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(n, 2, generator=g, dtype=torch.float64)
    comp = torch.randint(0, len(means), (n,), generator=g)
    ref_data = means[comp] + std * torch.randn(n, 2, generator=g, dtype=torch.float64)
    comp2 = torch.randint(0, len(means), (n,), generator=g)
    floor = sliced_w2(means[comp2] + std * torch.randn(n, 2, generator=g, dtype=torch.float64), ref_data)
    x_ref = sample(model, x_T, diffusion=d, sampler="heun", steps=1000, spacing="uniform", dtype=torch.float64)
    rows = []
    for name, sampler, spacing in VARIANTS:
        for steps in STEPS:
            counter[0] = 0
            t0 = time.perf_counter()
            x = sample(
                model,
                x_T,
                diffusion=d,
                sampler=sampler,
                steps=steps,
                spacing=spacing,
                dtype=torch.float64,
                generator=torch.Generator().manual_seed(seed + 1),
            )
            rows.append(
                {
                    "sampler": name,
                    "spacing": spacing,
                    "steps": steps,
                    "nfe": counter[0],
                    "ode_err": None if sampler == "ddpm" else (x - x_ref).abs().mean().item(),
                    "sw2": sliced_w2(x, ref_data),
                    "seconds": time.perf_counter() - t0,
                }
            )
    return {
        "target": target,
        "schedule": schedule,
        "objective": objective,
        "n": n,
        "sw2_floor": floor,
        "ode_ref": "heun, 1000 uniform steps",
        "rows": rows,
    }


def print_table(res: dict) -> None:
    print(
        f"\n## target={res['target']} schedule={res['schedule']} objective={res['objective']} n={res['n']} "
        f"(sliced-W2 floor {res['sw2_floor']:.4f})"
    )
    print("| sampler | " + " | ".join(f"{s} steps: ODE err / SW2 (NFE)" for s in STEPS) + " |")
    print("|---" * (len(STEPS) + 1) + "|")
    for sampler, _, _ in VARIANTS:
        cells = []
        for r in (r for r in res["rows"] if r["sampler"] == sampler):
            ode = "—" if r["ode_err"] is None else f"{r['ode_err']:.4f}"
            cells.append(f"{ode} / {r['sw2']:.4f} ({r['nfe']})")
        print(f"| {sampler} | " + " | ".join(cells) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--result", default=None, help="write a results file (dalle2.results: figures + provenance)")
    p.add_argument("--targets", default="mixture,gaussian")
    p.add_argument("--schedule", default="cosine", choices=["linear", "cosine", "sigmoid"])
    p.add_argument("--objective", default="eps", choices=["eps", "x0", "v"])
    p.add_argument("--n", type=int, default=4000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    results = [run(t, args.schedule, args.objective, args.n, args.seed) for t in args.targets.split(",")]
    for res in results:
        print_table(res)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
        print(f"\nwrote {args.out}")
    if args.result:
        from dalle2.results import write_result

        # ode_err/<target>: {sampler: {"<steps> steps": mean |x - x_ODE|}} (a docs table), and every run in full
        ode = {
            res["target"]: {
                name: {f"{r['steps']} steps": r["ode_err"] for r in res["rows"] if r["sampler"] == name}
                for name, sampler, _ in VARIANTS
                if sampler != "ddpm"
            }
            for res in results
        }
        runs = [
            {**res, "rows": [{k: v for k, v in r.items() if k != "seconds"} for r in res["rows"]]} for res in results
        ]
        write_result(args.result, {"ode_err": ode, "runs": runs}, seeds=[args.seed])
        print(f"wrote {args.result}")


if __name__ == "__main__":
    main()
