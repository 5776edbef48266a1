"""
Sample from a diffusion model guided by a noisy-image classifier (Dhariwal & Nichol 2021,
Algorithms 1 and 2) and save samples_NxHxWx3.npz (arr_1: the target labels) plus a PNG grid.

    mpiexec -n N python scripts/classifier_sample.py --model_path model.pt \
        --classifier_path classifier.pt --classifier_scale 1.0 $MODEL_FLAGS $CLASSIFIER_FLAGS
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
    load_guidance_classifier,
    output_dir,
    prepare_network,
    write_samples,
)
from guided_diffusion.cli.weights import load_checkpoint_into
from guided_diffusion.cli.flags import network_flags, sampling_extra_defaults
from guided_diffusion.cli.flags import label_choice_defaults, sample_script_defaults
from guided_diffusion.diffusion.guidance import make_classifier_cond_fn
from guided_diffusion.cli.main import run_main
from guided_diffusion.runtime.seeding import seed_sampling
from guided_diffusion.script_util import (
    add_dict_to_argparser,
    args_to_dict,
    classifier_defaults,
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

    # Both networks are built and their checkpoints checked before the log folder is made, so
    # a run refused on its flags leaves no folder behind.
    flags = args_to_dict(args, model_and_diffusion_defaults().keys())
    flags["num_classes"] = args.num_classes
    flags["class_dropout_prob"] = args.class_dropout_prob
    flags["in_channels"] = args.in_channels
    model, diffusion = create_model_and_diffusion(**flags)
    sample_fn = make_sample_fn(sampler, diffusion, args.evaluations, args.sigma_grid, eta=args.eta)
    next_labels = class_labels(args)
    load_checkpoint_into(
        model, args.model_path, flags, build=lambda f: create_model_and_diffusion(**f)[0]
    )

    classifier = load_guidance_classifier(args)
    logger.configure(dir=args.log_dir or None)
    set_tf32(args.tf32)
    logger.log(f"loaded the model {args.model_path} and the classifier {args.classifier_path}")
    prepare_network(model, **network_flags(args))

    cond_fn = make_classifier_cond_fn(classifier, args.classifier_scale)

    # Classifier-free guidance on top of classifier guidance; the model itself at scale 1.
    guided = classifier_free_guidance(model, args.guidance_scale, null_label=args.num_classes)

    def model_fn(x, t, y=None):
        # The labels steer the classifier always, the diffusion model only when it is conditional.
        if args.class_cond:
            return guided(x, t, y=y)
        return model(x, t, None)

    seed_sampling(args.seed)
    logger.log(f"sampling with {sampler}...")
    shape = sample_shape(args.batch_size, args.image_size, args.in_channels)

    def make_batch(bar):
        classes = next_labels()
        sample = sample_fn(
            model_fn,
            shape,
            clip_denoised=args.clip_denoised,
            model_kwargs={"y": classes},
            cond_fn=cond_fn,
            device=dist_util.dev(),
            progress=bar,
        )
        return to_uint8(sample.float()), classes

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
        classifier_path="",
        classifier_scale=1.0,
    )
    defaults.update(model_and_diffusion_defaults())
    defaults.update(classifier_defaults())
    defaults.update(sampling_extra_defaults())
    defaults.update(cfg_defaults())
    defaults.update(sampling_guidance_defaults())
    defaults.update(sample_script_defaults())
    defaults.update(label_choice_defaults())
    # Needed for classifiers at sizes without a built-in channel table (e.g. 16).
    defaults.update(classifier_channel_mult="")
    parser = argparse.ArgumentParser(description="Sample with classifier guidance.")
    add_dict_to_argparser(parser, defaults)
    return parser


if __name__ == "__main__":
    run_main(main)
