"""
Edit images with a diffusion model: SDEdit (Meng et al. 2022). Each input is noised to
t0 = --edit_strength * T and denoised with any --sampler (ddpm, ddim, or a solver with
--evaluations), guided or not: by a class (--class_label) through a class-conditional model
(--guidance_scale for classifier-free guidance) or a noisy classifier (--classifier_path,
--classifier_scale). Strength 1 samples from noise; small strengths keep the input. Writes
edited/<name>.png per input and samples_NxHxWx3.npz (arr_1: the labels) plus a grid.

    python scripts/image_edit.py --model_path model.pt --input photos/ --edit_strength 0.5 \
        --use_ddim True --timestep_respacing ddim50 $MODEL_FLAGS
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
from guided_diffusion.diffusion.sdedit import check_edit_strength, sdedit_loop
from guided_diffusion.runtime.seeding import seed_sampling
from guided_diffusion.sampling import editing
from guided_diffusion.sampling.loop import (
    kept_pass_rounds,
    load_guided_model,
    output_dir,
    sampler_from_flags,
)
from guided_diffusion.script_util import script_parser


def main(argv=None):
    # The model's flags from --config or the args.json beside --model_path, as image_sample.py.
    args = run_config.parse_args(create_argparser(), argv)
    check_edit_strength(args.edit_strength)
    sampler = sampler_from_flags(args)
    editing.check_class_label(args.class_label, args.num_classes)
    images, paths = editing.read_edit_images(args.input, args.image_size)
    kept = kept_pass_rounds(
        args, __file__, [None], len(images), what="edited images", item_bytes=images[0].size,
        finished=lambda folder: editing.finished_edits(folder, "edited", paths, images.shape))

    start_single_process_tool("image_edit.py", args)
    open_tool_log(args)
    logger.log(f"read {len(images)} images from {args.input}")
    model_fn, cond_fn, diffusion, classifier = load_guided_model(args)

    def edit(x_start, model_kwargs, _mask):
        return sdedit_loop(
            diffusion, model_fn, x_start, strength=args.edit_strength, sampler=sampler,
            evaluations=args.evaluations or None, sigma_grid=args.sigma_grid or None,
            clip_denoised=args.clip_denoised, cond_fn=cond_fn, model_kwargs=model_kwargs,
            device=x_start.device, eta=args.eta)

    seed_sampling(args.seed)
    out = output_dir(args)
    kept.open(out)
    logger.log(f"editing with {sampler} at strength {args.edit_strength}...")
    edited, labels = editing.run_in_batches(
        images, args.batch_size, edit, labels_needed=args.class_cond or classifier is not None,
        class_label=args.class_label, num_classes=args.num_classes, progress=args.progress,
        kept=kept)
    path = kept.finish(lambda: editing.write_edits(edited, labels, paths, out, "edited"))
    logger.log(f"wrote {path} and edited/*.png")


def create_argparser():
    return script_parser("Edit images with SDEdit.", editing_defaults(),
                         dict(edit_strength=0.5, eta=0.0))


if __name__ == "__main__":
    run_main(main)
