"""
How close RePaint's inpainted pixels come to their exact conditional law, as the number of
resamplings grows: four strongly correlated Gaussian "pixels" (images [N, 1, 1, 4]) whose exact
denoiser is the model (experiments/oracles.py), two pixels kept at fixed values, two inpainted.

    python experiments/inpaint_gaussian.py --out_dir runs/inpaint_gaussian

For each sampler (ddpm, ddim), respacing (50, 100 steps of a T = 1000 linear schedule), jump
length and number of resamplings: the Wasserstein-2 distance between the Gaussian fitted to
4000 inpainted samples and the exact conditional, and its mean and covariance errors. Writes
inpaint_gaussian.json and inpaint_gaussian.md.
"""

import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from experiment_files import write_results  # noqa: E402
from oracles import GaussianData, gaussian_w2  # noqa: E402

from guided_diffusion.diffusion.inpaint import inpaint_loop  # noqa: E402
from guided_diffusion.script_util import create_gaussian_diffusion  # noqa: E402
from guided_diffusion.cli.main import run_main  # noqa: E402
from guided_diffusion.script_util import script_parser  # noqa: E402

DIM = 4
KEEP = torch.tensor([True, True, False, False])
VALUES = torch.tensor([0.7, 0.6])


def gaussian_data():
    """The data of tests/test_editing.py: a smooth covariance plus a little white noise."""
    index = torch.arange(DIM, dtype=torch.float64)
    cov = 0.25 * torch.exp(-((index[:, None] - index[None, :]) ** 2) / (2 * 1.5**2))
    return GaussianData(torch.tensor([0.2, -0.1, 0.0, 0.1]),
                        cov + 0.01 * torch.eye(DIM, dtype=torch.float64))


def monte_carlo_level(mean, cov, n, repeats=8, seed=5):
    gen = torch.Generator().manual_seed(seed)
    chol = torch.linalg.cholesky(cov)
    levels = []
    for _ in range(repeats):
        z = mean + torch.randn(n, len(mean), generator=gen, dtype=torch.float64) @ chol.T
        levels.append(gaussian_w2(z.mean(0), torch.cov(z.T), mean, cov))
    return float(np.mean(levels) + 3 * np.std(levels))


def measure(num_samples=4000, respacings=("50", "100"), samplers=("ddpm", "ddim"),
            jumps=(1, 10), resamplings=(1, 2, 5, 10, 20, 50), log=print):
    data = gaussian_data()
    full = create_gaussian_diffusion(steps=1000, noise_schedule="linear")
    model = data.model(full.alphas_cumprod)
    mean, cov = data.conditional(KEEP, VALUES)
    known = torch.zeros(num_samples, 1, 1, DIM)
    known[..., KEEP] = VALUES.float()
    rows = []
    for respacing in respacings:
        diffusion = create_gaussian_diffusion(steps=1000, noise_schedule="linear",
                                              timestep_respacing=respacing)
        for sampler in samplers:
            for jump in jumps:
                for count in resamplings:
                    torch.manual_seed(0)
                    start = time.time()
                    out = inpaint_loop(diffusion, model, known.shape, known=known,
                                       mask=KEEP.view(1, 1, 1, DIM), sampler=sampler,
                                       jump_length=jump, resamplings=count, clip_denoised=False)
                    filled = out.view(num_samples, DIM)[:, ~KEEP].double()
                    row = dict(steps=int(respacing), sampler=sampler, jump_length=jump,
                               resamplings=count,
                               w2=gaussian_w2(filled.mean(0), torch.cov(filled.T), mean, cov),
                               mean_error=float((filled.mean(0) - mean).norm()),
                               cov_error=float((torch.cov(filled.T) - cov).norm()),
                               seconds=round(time.time() - start, 2))
                    rows.append(row)
                    log(json.dumps(row))
    return dict(rows=rows, monte_carlo=monte_carlo_level(mean, cov, num_samples),
                conditional_mean=mean.tolist(), conditional_cov=cov.tolist(),
                num_samples=num_samples)


def report(result):
    rows = result["rows"]
    counts = sorted({r["resamplings"] for r in rows})
    lines = ["W2 between the inpainted pixels' fitted Gaussian and their exact conditional law "
             "(mean error, covariance error in brackets), by number of resamplings:\n",
             "| steps | sampler | jump length | " + " | ".join(str(c) for c in counts) + " |",
             "|---|---|---|" + "---|" * len(counts)]
    keys = list(dict.fromkeys((r["steps"], r["sampler"], r["jump_length"]) for r in rows))
    for steps, sampler, jump in keys:
        cells = []
        for count in counts:
            hit = [r for r in rows if (r["steps"], r["sampler"], r["jump_length"],
                                       r["resamplings"]) == (steps, sampler, jump, count)]
            cells.append(f"{hit[0]['w2']:.3f} ({hit[0]['mean_error']:.3f}, "
                         f"{hit[0]['cov_error']:.3f})" if hit else "")
        lines.append(f"| {steps} | {sampler} | {jump} | " + " | ".join(cells) + " |")
    lines.append(f"\nMonte Carlo level ({result['num_samples']} exact draws, mean + 3 sd): "
                 f"{result['monte_carlo']:.3f}")
    return "\n".join(lines) + "\n"


def create_argparser():
    return script_parser("RePaint against an exact Gaussian conditional.",
                         dict(out_dir="runs/inpaint_gaussian"))


def main(argv=None):
    args = create_argparser().parse_args(argv)
    torch.set_num_threads(1)
    result = measure()
    write_results(args.out_dir, "inpaint_gaussian", result, report(result))


if __name__ == "__main__":
    run_main(main)
