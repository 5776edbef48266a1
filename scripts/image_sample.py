"""
Generate a large batch of image samples from a model and save them as a large numpy array
(samples_NxHxWx3.npz, with the labels as arr_1 for class-conditional models) plus a PNG grid.

    mpiexec -n N python scripts/image_sample.py --model_path model.pt $MODEL_FLAGS $SAMPLE_FLAGS
"""

import argparse

import torch

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
from guided_diffusion.cli.main import run_main
from guided_diffusion.runtime.seeding import seed_sampling
from guided_diffusion.script_util import (
    add_dict_to_argparser,
    args_to_dict,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
)
from guided_diffusion.sampling.loop import (
    check_sampling_flags,
    make_sample_fn,
    resolve_sampler,
    sample_steps,
)


def main(argv=None):
    args = create_argparser().parse_args(argv)
    check_sampling_flags(args)  # before any work: bad counts, an unwritable --out_dir

    sampler = resolve_sampler(args.sampler, args.use_ddim)
    check_guidance_scale(
        args.guidance_scale, class_cond=args.class_cond, class_dropout_prob=args.class_dropout_prob
    )
    dist_util.setup_dist()

    # The model is built and its checkpoint checked before the log folder is made, so a run
    # refused on its flags leaves no folder behind.
    flags = args_to_dict(args, model_and_diffusion_defaults().keys())
    flags["num_classes"] = args.num_classes
    flags["class_dropout_prob"] = args.class_dropout_prob
    model, diffusion = create_model_and_diffusion(**flags)
    sample_fn = make_sample_fn(sampler, diffusion, flags)
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
    shape = (args.batch_size, 3, args.image_size, args.image_size)

    def make_batch(bar):
        model_kwargs = {}
        labels = None
        if args.class_cond:
            # Labels are drawn before the batch's noise, as in the reference.
            labels = torch.randint(
                low=0, high=args.num_classes, size=(args.batch_size,), device=dist_util.dev()
            )
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
                                 steps_per_batch=sample_steps(sampler, diffusion))
    write_samples(arr, labels, output_dir(args))
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
    parser = argparse.ArgumentParser(description="Sample images from a diffusion model.")
    add_dict_to_argparser(parser, defaults)
    return parser


if __name__ == "__main__":
    run_main(main)
