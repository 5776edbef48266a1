"""
Interpolate between pairs of DDIM latents x_T along great circles (the slerp of Song et al. 2021,
section 5.3) and decode every point with deterministic DDIM: one grid row per pair.

    python scripts/ddim_interpolate.py --model_path model.pt --num_pairs 4 --num_points 8 --steps 50 $MODEL_FLAGS
    python scripts/ddim_interpolate.py --model_path model.pt --latents latents.npz $MODEL_FLAGS

Pairs are drawn with --seed (labels first, as the sampling scripts, then the two ends), or taken
from --latents (entries 0 and 1, 2 and 3, ...; the row uses the label of its first entry).
Writes, in --out_dir (default: the log folder):
    interpolation.npz   arr_0 uint8 [num_pairs * num_points, H, W, 3] row by row, arr_1 labels
                        (class_cond)
    interpolation.png   one row per pair, from its first latent (left) to its second (right)
"""

if __name__ == "__main__":
    # First, before the slow imports: a stop signal (SIGTERM, SIGUSR1, SIGINT) is recorded from
    # here on instead of killing the process; the run then stops after its current batch with
    # that batch kept (guided_diffusion/runtime/kept_rounds.py).
    from guided_diffusion.runtime.signals import catch_preemption_signals

    catch_preemption_signals()

import os

import torch

from guided_diffusion import dist_util, logger
from guided_diffusion.cli.flags import ddim_tool_defaults, output_defaults, parse_step_counts
from guided_diffusion.cli.main import open_tool_log, run_main, start_single_process_tool
from guided_diffusion.diffusion.inversion import decode_in_batches, slerp_pairs
from guided_diffusion.errors import ScriptError
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
    steps = parse_step_counts(args.steps)
    if len(steps) != 1:
        raise ScriptError(f"--steps takes one step count here, got {args.steps!r}")
    if args.num_points < 2:
        raise ScriptError(f"--num_points must be at least 2 (the two ends), got {args.num_points}")

    start_single_process_tool("ddim_interpolate.py", args)

    if args.latents:
        starts, ends, labels = pairs_from_file(args)
    count = (len(starts) if args.latents else args.num_pairs) * args.num_points
    kept = kept_pass_rounds(
        args, __file__, steps, count, what="decoded points",
        item_bytes=args.in_channels * args.image_size ** 2,
        finished=finished_files("interpolation.npz", "interpolation.png"))
    model, diffusions = load_ddim_tool_model(args, steps)
    open_tool_log(args)
    out = output_dir(args)
    kept.open(out)
    diffusion = diffusions[steps[0]]
    if not args.latents:
        seed_sampling(args.seed)
        starts, ends, labels = draw_pairs(args)

    path = slerp_pairs(starts, ends, args.num_points)
    path_labels = None if labels is None else labels.repeat_interleave(args.num_points)
    logger.log(f"decoding {len(starts)} pairs x {args.num_points} points with {steps[0]} DDIM steps...")

    def decode(_steps, items):
        images = decode_in_batches(
            diffusion, model, path[items],
            labels=None if path_labels is None else path_labels[items],
            batch_size=args.batch_size, clip_denoised=args.clip_denoised, progress=args.progress,
            device=dist_util.dev(),
        )
        return {"images": to_uint8(images)}

    images = run_passes(kept, steps, len(path), args.batch_size, decode)[steps[0]]["images"]

    def write():
        save_images_npz(os.path.join(out, "interpolation.npz"), images, path_labels)
        make_grid_png(images, os.path.join(out, "interpolation.png"), nrow=args.num_points)

    kept.finish(write)
    logger.log(f"wrote interpolation.npz and interpolation.png to {out}")


def draw_pairs(args):
    """Labels first (class_cond), then both ends of every pair: (starts, ends, labels)."""
    shape = (args.num_pairs, args.in_channels, args.image_size, args.image_size)
    labels = None
    if args.class_cond:
        labels = torch.randint(0, args.num_classes, (args.num_pairs,), device=dist_util.dev()).cpu()
    starts = torch.randn(*shape, device=dist_util.dev()).cpu()
    ends = torch.randn(*shape, device=dist_util.dev()).cpu()
    return starts, ends, labels


def pairs_from_file(args):
    """Entries 0-1, 2-3, ... of --latents (at most --num_pairs): (starts, ends, labels)."""
    x_T, labels, _ = load_latents(args.latents, args.image_size, class_cond=args.class_cond,
                                  channels=args.in_channels)
    count = min(args.num_pairs, len(x_T) // 2)
    if count < 1:
        raise ScriptError(f"{args.latents} holds {len(x_T)} latents; a pair needs 2")
    starts, ends = x_T[0 : 2 * count : 2], x_T[1 : 2 * count : 2]
    return starts, ends, None if labels is None else labels[0 : 2 * count : 2]


def create_argparser():
    return script_parser(
        "Decode slerp paths between DDIM latents.",
        ddim_tool_defaults(),
        dict(
            latents="",
            num_pairs=4,
            num_points=8,
            steps="50",
        ),
        output_defaults(),
    )


if __name__ == "__main__":
    run_main(main)
