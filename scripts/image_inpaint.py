"""
Inpaint images with a diffusion model: RePaint (Lugmayr et al. 2022). The pixels a mask keeps
(white by default) are kept, the others are sampled so that they fit them; --resamplings and
--jump_length set RePaint's resampling. Writes inpainted/<name>.png per input and
samples_NxHxWx3.npz (arr_1: the labels, when class-conditional or classifier-guided) plus a grid.

    python scripts/image_inpaint.py --model_path model.pt --input photos/ --mask masks/ \
        --timestep_respacing 250 --resamplings 10 --jump_length 10 $MODEL_FLAGS
"""

if __name__ == "__main__":
    # First, before the slow imports: a stop signal (SIGTERM, SIGUSR1, SIGINT) is recorded from
    # here on instead of killing the process; the run then stops after its current batch with
    # that batch kept (guided_diffusion/runtime/kept_rounds.py).
    from guided_diffusion.runtime.signals import catch_preemption_signals

    catch_preemption_signals()

from guided_diffusion import logger
from guided_diffusion.cli import run_config
from guided_diffusion.cli.flags import editing_defaults
from guided_diffusion.cli.main import open_tool_log, run_main, start_single_process_tool
from guided_diffusion.diffusion.inpaint import INPAINT_SAMPLERS, inpaint_loop, repaint_schedule
from guided_diffusion.errors import ScriptError
from guided_diffusion.runtime.seeding import seed_sampling
from guided_diffusion.sampling import editing
from guided_diffusion.sampling.loop import (
    kept_pass_rounds,
    load_guided_model,
    output_dir,
    sampler_from_flags,
)
from guided_diffusion.script_util import script_parser


def check_inpaint_sampler(sampler):
    """:raises ScriptError: for a sampler RePaint cannot run (an ODE solver)."""
    if sampler not in INPAINT_SAMPLERS:
        raise ScriptError(
            f"inpainting runs RePaint on the diffusion's own steps: use --sampler ddpm or ddim "
            f"(with --timestep_respacing), not {sampler}"
        )


def main(argv=None):
    # The model's flags from --config or the args.json beside --model_path, as image_sample.py.
    args = run_config.parse_args(create_argparser(), argv)
    sampler = sampler_from_flags(args, check=check_inpaint_sampler)
    editing.check_class_label(args.class_label, args.num_classes)
    images, masks, paths = editing.read_inpainting_inputs(
        args.input, args.mask, args.image_size, invert_mask=args.invert_mask)
    repaint_schedule(1, args.jump_length, args.resamplings)  # refuses values below 1, now
    kept = kept_pass_rounds(
        args, __file__, [None], len(images), what="inpainted images", item_bytes=images[0].size,
        finished=lambda folder: editing.finished_edits(folder, "inpainted", paths, images.shape))

    start_single_process_tool("image_inpaint.py", args)
    open_tool_log(args)
    logger.log(f"read {len(images)} images and masks from {args.input}, {args.mask}")
    model_fn, cond_fn, diffusion, classifier = load_guided_model(args)

    def inpaint(x_start, model_kwargs, mask):
        return inpaint_loop(
            diffusion, model_fn, tuple(x_start.shape), known=x_start, mask=mask,
            sampler=sampler, jump_length=args.jump_length, resamplings=args.resamplings,
            clip_denoised=args.clip_denoised, cond_fn=cond_fn, model_kwargs=model_kwargs,
            device=x_start.device, eta=args.eta)

    seed_sampling(args.seed)
    out = output_dir(args)
    kept.open(out)
    logger.log(f"inpainting with {sampler}, {args.resamplings} resamplings, jump length "
               f"{args.jump_length}...")
    edited, labels = editing.run_in_batches(
        images, args.batch_size, inpaint, labels_needed=args.class_cond or classifier is not None,
        class_label=args.class_label, num_classes=args.num_classes, masks=masks,
        progress=args.progress, kept=kept)
    path = kept.finish(lambda: editing.write_edits(edited, labels, paths, out, "inpainted"))
    logger.log(f"wrote {path} and inpainted/*.png")


def create_argparser():
    return script_parser("Inpaint images with RePaint.", editing_defaults(),
                         dict(mask="", invert_mask=False, jump_length=1, resamplings=1, eta=0.0))


if __name__ == "__main__":
    run_main(main)
