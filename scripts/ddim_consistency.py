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
from guided_diffusion.diffusion.inversion import consistency_distances, decode_in_batches
from guided_diffusion.runtime.files import write_json
from guided_diffusion.runtime.kept_rounds import run_passes
from guided_diffusion.runtime.seeding import seed_sampling
from guided_diffusion.sampling.files import load_latents, make_grid_png, save_images_npz, to_uint8
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
    step_counts = parse_step_counts(args.steps)

    start_single_process_tool("ddim_consistency.py", args)

    if args.latents:
        x_T, labels, _ = load_latents(args.latents, args.image_size, class_cond=args.class_cond,
                                      channels=args.in_channels)
        x_T = x_T[: args.num_samples]
        labels = None if labels is None else labels[: args.num_samples]
    count = len(x_T) if args.latents else args.num_samples
    item = args.in_channels * args.image_size ** 2
    kept = kept_pass_rounds(
        args, __file__, step_counts, count, what="decodings", item_bytes=item,
        finished=finished_files("consistency.npz", "consistency.png", "consistency.json"))
    model, diffusions = load_ddim_tool_model(args, step_counts)
    open_tool_log(args)
    out = output_dir(args)
    kept.open(out)
    if not args.latents:
        seed_sampling(args.seed)
        labels = None
        if args.class_cond:
            labels = torch.randint(0, args.num_classes, (args.num_samples,), device=dist_util.dev()).cpu()
        shape = (args.num_samples, args.in_channels, args.image_size, args.image_size)
        x_T = torch.randn(*shape, device=dist_util.dev()).cpu()

    def decode(steps, items):
        if items.start == 0:
            logger.log(f"decoding {len(x_T)} latents with {steps} DDIM steps...")
        images = decode_in_batches(
            diffusions[steps], model, x_T[items], labels=None if labels is None else labels[items],
            batch_size=args.batch_size, clip_denoised=args.clip_denoised, progress=args.progress,
            device=dist_util.dev(),
        )
        return {"images": to_uint8(images)}

    done = run_passes(kept, step_counts, len(x_T), args.batch_size, decode)
    decoded = {steps: done[steps]["images"] for steps in step_counts}
    distances = consistency_distances(decoded)

    def write():
        grid = np.concatenate([decoded[steps] for steps in step_counts])
        grid_labels = None if labels is None else labels.repeat(len(step_counts))
        save_images_npz(os.path.join(out, "consistency.npz"), grid, grid_labels)
        make_grid_png(grid, os.path.join(out, "consistency.png"), nrow=len(x_T))
        write_json(os.path.join(out, "consistency.json"),
                   {"reference_steps": max(step_counts), "num_samples": len(x_T),
                    "steps": distances})

    kept.finish(write)
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
        output_defaults(),
    )


if __name__ == "__main__":
    run_main(main)
