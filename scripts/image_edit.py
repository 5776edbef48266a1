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

import argparse

from guided_diffusion import logger
from guided_diffusion.cli.flags import editing_defaults, network_flags
from guided_diffusion.cli.main import run_main, start_single_process_tool
from guided_diffusion.cli.weights import load_checkpoint_into
from guided_diffusion.diffusion.guidance import check_guidance_scale
from guided_diffusion.diffusion.sdedit import check_edit_strength, sdedit_loop
from guided_diffusion.runtime.seeding import seed_sampling
from guided_diffusion.sampling import editing
from guided_diffusion.sampling.loop import (
    check_sampler_flags,
    load_guidance_classifier,
    output_dir,
    prepare_network,
    resolve_sampler,
)
from guided_diffusion.script_util import (
    add_dict_to_argparser,
    args_to_dict,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
)


def main(argv=None):
    args = create_argparser().parse_args(argv)
    check_edit_strength(args.edit_strength)
    sampler = resolve_sampler(args.sampler, args.use_ddim)
    check_sampler_flags(sampler, timestep_respacing=args.timestep_respacing,
                        evaluations=args.evaluations, sigma_grid=args.sigma_grid)
    check_guidance_scale(args.guidance_scale, class_cond=args.class_cond,
                         class_dropout_prob=args.class_dropout_prob)
    editing.check_class_label(args.class_label, args.num_classes)
    images, paths = editing.read_edit_images(args.input, args.image_size)

    start_single_process_tool("image_edit.py", args)
    logger.log(f"read {len(images)} images from {args.input}")
    flags = args_to_dict(args, model_and_diffusion_defaults().keys())
    flags.update(num_classes=args.num_classes, class_dropout_prob=args.class_dropout_prob)
    model, diffusion = create_model_and_diffusion(**flags)
    load_checkpoint_into(model, args.model_path, flags,
                         build=lambda f: create_model_and_diffusion(**f)[0])
    prepare_network(model, **network_flags(args))
    classifier = load_guidance_classifier(args) if args.classifier_path else None
    model_fn, cond_fn = editing.guided_model(
        model, class_cond=args.class_cond, guidance_scale=args.guidance_scale,
        num_classes=args.num_classes, classifier=classifier,
        classifier_scale=args.classifier_scale)

    def edit(x_start, model_kwargs, _mask):
        return sdedit_loop(
            diffusion, model_fn, x_start, strength=args.edit_strength, sampler=sampler,
            evaluations=args.evaluations or None, sigma_grid=args.sigma_grid or None,
            clip_denoised=args.clip_denoised, cond_fn=cond_fn, model_kwargs=model_kwargs,
            device=x_start.device, eta=args.eta)

    seed_sampling(args.seed)
    logger.log(f"editing with {sampler} at strength {args.edit_strength}...")
    edited, labels = editing.run_in_batches(
        images, args.batch_size, edit, labels_needed=args.class_cond or classifier is not None,
        class_label=args.class_label, num_classes=args.num_classes, progress=args.progress)
    path = editing.write_edits(edited, labels, paths, output_dir(args), "edited")
    logger.log(f"wrote {path} and edited/*.png")


def create_argparser():
    defaults = editing_defaults()
    defaults.update(edit_strength=0.5, eta=0.0)
    parser = argparse.ArgumentParser(description="Edit images with SDEdit.")
    add_dict_to_argparser(parser, defaults)
    return parser


if __name__ == "__main__":
    run_main(main)
