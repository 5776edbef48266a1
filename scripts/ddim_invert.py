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

if __name__ == "__main__":
    # First, before the slow imports: a stop signal (SIGTERM, SIGUSR1, SIGINT) is recorded from
    # here on instead of killing the process; the run then stops after its current batch with
    # that batch kept (guided_diffusion/runtime/kept_rounds.py).
    from guided_diffusion.runtime.signals import catch_preemption_signals

    catch_preemption_signals()

import os

import numpy as np
import torch

from guided_diffusion import dist_util, logger
from guided_diffusion.cli.flags import ddim_tool_defaults, output_defaults, parse_step_counts
from guided_diffusion.cli.main import open_tool_log, run_main, start_single_process_tool, step_table
from guided_diffusion.diffusion.inversion import psnr, reconstruction_mse, round_trip_in_batches
from guided_diffusion.diffusion.sampling import check_invertible_eta
from guided_diffusion.runtime.files import write_json
from guided_diffusion.runtime.kept_rounds import run_passes
from guided_diffusion.sampling.files import (
    make_grid_png,
    read_images,
    save_latents,
    to_uint8,
    uint8_to_model_input,
)
from guided_diffusion.sampling.loop import (
    finished_files,
    kept_pass_rounds,
    load_ddim_tool_model,
    output_dir,
    parse_sampling_flags,
)
from guided_diffusion.script_util import script_parser


def main(argv=None):
    args = parse_sampling_flags(create_argparser(), argv)
    check_invertible_eta(args.eta)
    step_counts = parse_step_counts(args.steps)

    start_single_process_tool("ddim_invert.py", args)

    images, labels = read_images(args.input, args.image_size, args.class_cond, limit=args.num_images,
                                 channels=args.in_channels)
    outputs = ("latents.npz", "reconstructions.png", "reconstruction.json")
    kept = kept_pass_rounds(args, __file__, step_counts, len(images), what="round trips",
                            item_bytes=8 * images[0].size, finished=finished_files(*outputs))
    model, diffusions = load_ddim_tool_model(args, step_counts)
    open_tool_log(args)
    logger.log(f"read {len(images)} images from {args.input}")
    out = output_dir(args)
    kept.open(out)

    x_start = uint8_to_model_input(images)
    y = None if labels is None else torch.from_numpy(labels)

    def round_trip(steps, items):
        if items.start == 0:
            logger.log(f"inverting and reconstructing with {steps} DDIM steps...")
        x_T, recon = round_trip_in_batches(
            diffusions[steps], model, x_start[items], labels=None if y is None else y[items],
            batch_size=args.batch_size, clip_denoised=args.clip_denoised, progress=args.progress,
            device=dist_util.dev(),
        )
        return {"x_T": x_T, "recon": recon}

    done = run_passes(kept, step_counts, len(images), args.batch_size, round_trip)
    results, rows = {}, []
    for steps in step_counts:
        recon = torch.from_numpy(done[steps]["recon"])
        mse = reconstruction_mse(x_start, recon)
        results[steps] = {"mse": float(mse.mean()), "psnr": psnr(mse.mean())}
        rows.append(to_uint8(recon[: args.grid_images]).numpy())
    latents = done[max(step_counts)]["x_T"]

    def write():
        save_latents(os.path.join(out, "latents.npz"), latents, labels=y, steps=max(step_counts),
                     images=images)
        grid = np.concatenate([images[: args.grid_images]] + rows)
        make_grid_png(grid, os.path.join(out, "reconstructions.png"),
                      nrow=min(len(images), args.grid_images))
        report = {"num_images": len(images), "clip_denoised": args.clip_denoised, "steps": results}
        write_json(os.path.join(out, "reconstruction.json"), report)

    kept.finish(write)
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
        output_defaults(),
    )


if __name__ == "__main__":
    run_main(main)
