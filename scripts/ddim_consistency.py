"""
Sample consistency of DDIM (Song et al. 2021, section 5.2): decode the same latents x_T with
several numbers of steps and measure how far each result is from the one with the most steps.

    python scripts/ddim_consistency.py --model_path model.pt --steps 10,20,50,100 --num_samples 8 $MODEL_FLAGS
    python scripts/ddim_consistency.py --model_path model.pt --latents latents.npz $MODEL_FLAGS

The latents are drawn with --seed (labels first, as the sampling scripts, then x_T), or the first
--num_samples entries of --latents (from ddim_invert.py). Writes, in --out_dir (default: the log
folder):
    consistency.npz    arr_0 uint8 [len(steps) * N, H, W, 3], one block of N per step count in
                       increasing order; arr_1 labels (class_cond)
    consistency.png    one row per step count (fewest steps on top), one column per latent
    consistency.json   {"reference_steps": most steps, "steps": {S: {"mean_abs_pixel_distance":
                       mean |difference| in 0..255 to the most-steps decoding, "mse": the same
                       as a mean squared error with pixels in [0, 1]}}}
"""

import os

import numpy as np
import torch

from guided_diffusion import dist_util, logger
from guided_diffusion.cli.flags import ddim_tool_defaults, parse_step_counts
from guided_diffusion.cli.main import open_tool_log, run_main, start_single_process_tool, step_table
from guided_diffusion.diffusion.inversion import consistency_distances, decode_in_batches
from guided_diffusion.runtime.files import write_json
from guided_diffusion.runtime.seeding import seed_sampling
from guided_diffusion.sampling.files import load_latents, make_grid_png, save_images_npz, to_uint8
from guided_diffusion.sampling.loop import load_ddim_tool_model, output_dir, parse_sampling_flags
from guided_diffusion.script_util import script_parser


def main(argv=None):
    args = parse_sampling_flags(create_argparser(), argv)
    step_counts = parse_step_counts(args.steps)

    start_single_process_tool("ddim_consistency.py", args)

    if args.latents:
        x_T, labels, _ = load_latents(args.latents, args.image_size, class_cond=args.class_cond,
                                      channels=args.in_channels)
        x_T = x_T[: args.num_samples]
        labels = None if labels is None else labels[: args.num_samples]
    model, diffusions = load_ddim_tool_model(args, step_counts)
    open_tool_log(args)
    if not args.latents:
        seed_sampling(args.seed)
        labels = None
        if args.class_cond:
            labels = torch.randint(0, args.num_classes, (args.num_samples,), device=dist_util.dev()).cpu()
        shape = (args.num_samples, args.in_channels, args.image_size, args.image_size)
        x_T = torch.randn(*shape, device=dist_util.dev()).cpu()

    decoded = {}
    for steps, diffusion in diffusions.items():
        logger.log(f"decoding {len(x_T)} latents with {steps} DDIM steps...")
        images = decode_in_batches(
            diffusion, model, x_T, labels=labels, batch_size=args.batch_size,
            clip_denoised=args.clip_denoised, progress=args.progress, device=dist_util.dev(),
        )
        decoded[steps] = to_uint8(images).numpy()
    distances = consistency_distances(decoded)

    out = output_dir(args)
    grid = np.concatenate([decoded[steps] for steps in step_counts])
    grid_labels = None if labels is None else labels.repeat(len(step_counts))
    save_images_npz(os.path.join(out, "consistency.npz"), grid, grid_labels)
    make_grid_png(grid, os.path.join(out, "consistency.png"), nrow=len(x_T))
    write_json(os.path.join(out, "consistency.json"),
               {"reference_steps": max(step_counts), "num_samples": len(x_T), "steps": distances})
    logger.log(step_table(distances, [
        (f"mean |pixel difference| to {max(step_counts)} steps (0..255)", "mean_abs_pixel_distance", 3),
        ("mse (pixels in [0, 1])", "mse", 6),
    ]))
    logger.log(f"wrote consistency.npz, consistency.png and consistency.json to {out}")


def create_argparser():
    return script_parser(
        "Decode the same DDIM latents with several step counts.",
        ddim_tool_defaults(),
        dict(
            latents="",
            num_samples=8,
            steps="10,20,50,100",
        ),
    )


if __name__ == "__main__":
    run_main(main)
