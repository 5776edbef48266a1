"""
Encode images into DDIM latents x_T by running the deterministic DDIM sampler backwards
(Song et al. 2021, section 5.4), decode them again, and report how well each number of steps
reconstructs the images.

    python scripts/ddim_invert.py --model_path model.pt --input images/ --steps 10,20,50,100 $MODEL_FLAGS

Writes, in --out_dir (default: the log folder):
    latents.npz           x_T [N, C, H, W] float32 from the most steps, labels (class_cond),
                          steps, images (the uint8 originals)
    reconstructions.png   the originals in the first row, then one row per step count
    reconstruction.json   {"steps": {S: {"mse": ..., "psnr": ...}}, "num_images": N}
"""

import os

import numpy as np
import torch

from guided_diffusion import dist_util, logger
from guided_diffusion.cli.flags import ddim_tool_defaults, parse_step_counts
from guided_diffusion.cli.main import open_tool_log, run_main, start_single_process_tool, step_table
from guided_diffusion.diffusion.inversion import psnr, reconstruction_mse, round_trip_in_batches
from guided_diffusion.diffusion.sampling import check_invertible_eta
from guided_diffusion.runtime.files import write_json
from guided_diffusion.sampling.files import (
    make_grid_png,
    read_images,
    save_latents,
    to_uint8,
    uint8_to_model_input,
)
from guided_diffusion.sampling.loop import load_ddim_tool_model, output_dir, parse_sampling_flags
from guided_diffusion.script_util import script_parser


def main(argv=None):
    args = parse_sampling_flags(create_argparser(), argv)
    check_invertible_eta(args.eta)
    step_counts = parse_step_counts(args.steps)

    start_single_process_tool("ddim_invert.py", args)

    images, labels = read_images(args.input, args.image_size, args.class_cond, limit=args.num_images,
                                 channels=args.in_channels)
    model, diffusions = load_ddim_tool_model(args, step_counts)
    open_tool_log(args)
    logger.log(f"read {len(images)} images from {args.input}")

    x_start = uint8_to_model_input(images)
    y = None if labels is None else torch.from_numpy(labels)
    results, rows, latents = {}, [], None
    for steps, diffusion in diffusions.items():
        logger.log(f"inverting and reconstructing with {steps} DDIM steps...")
        x_T, recon = round_trip_in_batches(
            diffusion, model, x_start, labels=y, batch_size=args.batch_size,
            clip_denoised=args.clip_denoised, progress=args.progress, device=dist_util.dev(),
        )
        mse = reconstruction_mse(x_start, recon)
        results[steps] = {"mse": float(mse.mean()), "psnr": psnr(mse.mean())}
        rows.append(to_uint8(recon[: args.grid_images]).numpy())
        latents = x_T

    out = output_dir(args)
    save_latents(os.path.join(out, "latents.npz"), latents, labels=y, steps=max(step_counts), images=images)
    grid = np.concatenate([images[: args.grid_images]] + rows)
    make_grid_png(grid, os.path.join(out, "reconstructions.png"), nrow=min(len(images), args.grid_images))
    report = {"num_images": len(images), "clip_denoised": args.clip_denoised, "steps": results}
    write_json(os.path.join(out, "reconstruction.json"), report)
    logger.log(step_table(results, [("mse (pixels in [0, 1])", "mse", 6), ("psnr (dB)", "psnr", 2)]))
    logger.log(f"wrote latents.npz (x_T from {max(step_counts)} steps), reconstructions.png and "
               f"reconstruction.json to {out}")


def create_argparser():
    return script_parser(
        "Encode images into DDIM latents and reconstruct them.",
        ddim_tool_defaults(seed=False),  # nothing random happens
        dict(
            input="",
            num_images=0,
            steps="10,20,50,100",
            eta=0.0,
            grid_images=16,
        ),
    )


if __name__ == "__main__":
    run_main(main)
