"""
Generate a large batch of image samples from a model and save them as a large numpy array
(samples_NxHxWx3.npz, with the labels as arr_1 for class-conditional models) plus a PNG grid.

    mpiexec -n N python scripts/image_sample.py --model_path model.pt $MODEL_FLAGS $SAMPLE_FLAGS
"""

import argparse


from guided_diffusion.cli import run_config
from guided_diffusion import dist_util, logger
from guided_diffusion.cli.flags import cfg_defaults, sampling_guidance_defaults
from guided_diffusion.diffusion.guidance import check_guidance_scale, classifier_free_guidance
from guided_diffusion.runtime.perf import set_tf32
from guided_diffusion.sampling.files import to_uint8
from guided_diffusion.sampling.loop import (
    gather_samples,
    output_dir,
    prepare_network,
    write_samples,
)
from guided_diffusion.cli.weights import load_checkpoint_into
from guided_diffusion.cli.flags import network_flags, sampling_extra_defaults
from guided_diffusion.cli.flags import label_choice_defaults, sample_script_defaults
from guided_diffusion.cli.main import run_main
from guided_diffusion.runtime.seeding import seed_sampling
from guided_diffusion.script_util import (
    add_dict_to_argparser,
    args_to_dict,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
)
from guided_diffusion.sampling.loop import (
    check_sampler_flags,
    check_sampling_flags,
    make_sample_fn,
    resolve_sampler,
    sample_steps,
)
from guided_diffusion.sampling.loop import class_labels, sample_shape


def main(argv=None):
    args = run_config.parse_args(create_argparser(), argv)  # flags from a run's args.json too
    check_sampling_flags(args)  # before any work: bad counts, an unwritable --out_dir

    sampler = resolve_sampler(args.sampler, args.use_ddim)
    check_sampler_flags(
        sampler, timestep_respacing=args.timestep_respacing, evaluations=args.evaluations,
        sigma_grid=args.sigma_grid,
    )
    check_guidance_scale(
        args.guidance_scale, class_cond=args.class_cond, class_dropout_prob=args.class_dropout_prob
    )
    dist_util.setup_dist()

    # The model is built and its checkpoint checked before the log folder is made, so a run
    # refused on its flags leaves no folder behind.
    flags = args_to_dict(args, model_and_diffusion_defaults().keys())
    flags["num_classes"] = args.num_classes
    flags["class_dropout_prob"] = args.class_dropout_prob
    flags["in_channels"] = args.in_channels
    model, diffusion = create_model_and_diffusion(**flags)
    sample_fn = make_sample_fn(sampler, diffusion, args.evaluations, args.sigma_grid, eta=args.eta)
    next_labels = class_labels(args, class_cond=args.class_cond)
    load_checkpoint_into(
        model, args.model_path, flags, build=lambda f: create_model_and_diffusion(**f)[0]
    )
    logger.configure(dir=args.log_dir or None)
    set_tf32(args.tf32)
    logger.log(f"loaded the model {args.model_path}")
    prepare_network(model, **network_flags(args))

    seed_sampling(args.seed)
    logger.log(f"sampling with {sampler}...")
    # The null class is label num_classes; with --guidance_scale 1 this is the model itself.
    model_fn = classifier_free_guidance(model, args.guidance_scale, null_label=args.num_classes)
    shape = sample_shape(args.batch_size, args.image_size, args.in_channels)

    def make_batch(bar):
        model_kwargs = {}
        labels = None
        if args.class_cond:
            # Labels are drawn before the batch's noise, as in the reference.
            labels = next_labels()
            model_kwargs["y"] = labels
        sample = sample_fn(
            model_fn,
            shape,
            clip_denoised=args.clip_denoised,
            model_kwargs=model_kwargs,
            device=dist_util.dev(),  # model_fn may be a plain function (guidance)
            progress=bar,
        )
        return to_uint8(sample.float()), labels

    arr, labels = gather_samples(args.num_samples, args.batch_size, make_batch,
                                 progress=args.progress,
                                 steps_per_batch=sample_steps(sampler, diffusion, args.evaluations))
    write_samples(arr, labels, output_dir(args), save_images=args.save_images)
    logger.log("sampling complete")


def create_argparser():
    defaults = dict(
        clip_denoised=True,
        num_samples=10000,
        batch_size=16,
        use_ddim=False,
        model_path="",
    )
    defaults.update(model_and_diffusion_defaults())
    defaults.update(sampling_extra_defaults())
    defaults.update(cfg_defaults())
    defaults.update(sampling_guidance_defaults())
    defaults.update(sample_script_defaults())
    defaults.update(label_choice_defaults())
    parser = argparse.ArgumentParser(description="Sample images from a diffusion model.")
    add_dict_to_argparser(parser, defaults)
    return parser


if __name__ == "__main__":
    run_main(main)
