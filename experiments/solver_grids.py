"""
Which grid of noise levels each solver should use: every solver on every grid (karras, logsnr,
time) and DDIM, at a few budgets of model evaluations, on the linear and cosine schedules
(T = 1000), measured as the Wasserstein-1 distance of 20000 samples to a 1-D Gaussian mixture
whose exact denoiser is the model (experiments/oracles.py). Every run starts from the same noise;
the stochastic solvers and DDIM with eta = 1 draw their step noise after torch.manual_seed(seed).

    python experiments/solver_grids.py --out_dir runs/solver_grids

Writes solver_grids.json and solver_grids.md: a table per schedule, the Monte Carlo level (how
far 20000 exact draws are), and per solver the grid that is never far from the best one: the
smallest worst-case ratio of its W1 to the best grid's, over both schedules and the budgets (the
rule that chose DEFAULT_SIGMA_GRID in diffusion/denoiser.py).
"""

import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from experiment_files import write_results  # noqa: E402
from oracles import mixture_model, monte_carlo_level, wasserstein1  # noqa: E402

from guided_diffusion.diffusion import solvers  # noqa: E402
from guided_diffusion.diffusion.denoiser import SIGMA_GRIDS, solver_sample_loop  # noqa: E402
from guided_diffusion.script_util import create_gaussian_diffusion  # noqa: E402
from guided_diffusion.cli.main import run_main  # noqa: E402
from guided_diffusion.script_util import script_parser  # noqa: E402

SCHEDULES = ("linear", "cosine")


def measure(budgets, *, num_samples=20000, seed=0, log=print):
    """
    :return: dict(rows=[{schedule, sampler, grid, budget, w1}], monte_carlo=level).
    """
    noise = torch.randn(num_samples, 1, generator=torch.Generator().manual_seed(seed))
    rows = []
    for schedule in SCHEDULES:
        full = create_gaussian_diffusion(steps=1000, noise_schedule=schedule)
        model = mixture_model(full.alphas_cumprod)
        for eta in (0.0, 1.0):
            for budget in budgets:
                respaced = create_gaussian_diffusion(
                    steps=1000, noise_schedule=schedule, timestep_respacing=str(budget))
                torch.manual_seed(seed + 1)
                out = respaced.ddim_sample_loop(model, noise.shape, noise=noise,
                                                clip_denoised=False, eta=eta)
                rows.append(dict(schedule=schedule, sampler="ddim" if eta == 0 else "ddim_eta1",
                                 grid="", budget=budget, w1=wasserstein1(out)))
        for name in solvers.SOLVERS:
            for grid in SIGMA_GRIDS:
                for budget in budgets:
                    if budget < solvers.MIN_EVALUATIONS[name]:
                        continue
                    torch.manual_seed(seed + 1)
                    out = solver_sample_loop(full, model, noise.shape, sampler=name,
                                             evaluations=budget, noise=noise,
                                             clip_denoised=False, sigma_grid=grid)
                    rows.append(dict(schedule=schedule, sampler=name, grid=grid, budget=budget,
                                     w1=wasserstein1(out)))
            log(f"{schedule} {name} done")
    return dict(rows=rows, monte_carlo=monte_carlo_level(num_samples), num_samples=num_samples)


def best_grids(rows):
    """
    Per solver, the grid with the smallest worst-case ratio of its W1 to the best grid's W1
    at the same schedule and budget.

    :return: {solver: (chosen grid, {grid: worst ratio})}.
    """
    choice = {}
    for name in solvers.SOLVERS:
        mine = [r for r in rows if r["sampler"] == name]
        best = {}
        for r in mine:
            key = (r["schedule"], r["budget"])
            best[key] = min(best.get(key, math.inf), r["w1"])
        worst = {
            grid: max(r["w1"] / best[(r["schedule"], r["budget"])] for r in mine if r["grid"] == grid)
            for grid in SIGMA_GRIDS
        }
        choice[name] = (min(worst, key=worst.get), worst)
    return choice


def report(result):
    rows = result["rows"]
    budgets = sorted({r["budget"] for r in rows})
    lines = []
    for schedule in SCHEDULES:
        lines.append(f"W1 to the mixture, {schedule} schedule (T = 1000), by model evaluations:\n")
        lines.append("| sampler | grid | " + " | ".join(str(b) for b in budgets) + " |")
        lines.append("|---|---|" + "---|" * len(budgets))
        keys = list(dict.fromkeys((r["sampler"], r["grid"]) for r in rows))
        for name, grid in keys:
            cells = []
            for b in budgets:
                hit = [r["w1"] for r in rows if r["schedule"] == schedule and r["sampler"] == name
                       and r["grid"] == grid and r["budget"] == b]
                cells.append(f"{hit[0]:.4f}" if hit else "")
            lines.append(f"| {name} | {grid or '(its steps)'} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append(f"Monte Carlo level ({result['num_samples']} exact draws, mean + 3 sd): "
                 f"{result['monte_carlo']:.4f}\n")
    lines.append("Worst ratio of W1 to the best grid's, over both schedules and the budgets:\n")
    lines.append("| sampler | " + " | ".join(SIGMA_GRIDS) + " | chosen |")
    lines.append("|---|" + "---|" * (len(SIGMA_GRIDS) + 1))
    for name, (grid, scores) in best_grids(rows).items():
        cells = " | ".join(f"{scores[g]:.2f}" for g in SIGMA_GRIDS)
        lines.append(f"| {name} | {cells} | {grid} |")
    return "\n".join(lines) + "\n"


def create_argparser():
    return script_parser("Solver x sigma grid sweep on a Gaussian mixture.",
                         dict(out_dir="runs/solver_grids", budgets="5,10,20,50", num_samples=20000))


def main(argv=None):
    args = create_argparser().parse_args(argv)
    torch.set_num_threads(1)
    budgets = [int(b) for b in args.budgets.split(",")]
    result = measure(budgets, num_samples=args.num_samples)
    write_results(args.out_dir, "solver_grids", result, report(result))


if __name__ == "__main__":
    run_main(main)
