"""
Sample from a diffusion model guided by a noisy-image classifier (Dhariwal & Nichol 2021,
Algorithms 1 and 2) and save samples_NxHxWx3.npz (arr_1: the target labels) plus a PNG grid.

    mpiexec -n N python scripts/classifier_sample.py --model_path model.pt \
        --classifier_path classifier.pt --classifier_scale 1.0 $MODEL_FLAGS $CLASSIFIER_FLAGS
"""

import argparse

import torch

from guided_diffusion import dist_util, logger
from guided_diffusion.sample_files import to_uint8
from guided_diffusion.sampling_cli import (
    ScriptError,
    autocast_context,
    gather_samples,
    load_checkpoint_into,
    make_classifier_cond_fn,
    output_dir,
    run_main,
    sampling_extra_defaults,
    seed_sampling,
    write_samples,
)
from guided_diffusion.script_util import (
    add_dict_to_argparser,
    args_to_dict,
    classifier_defaults,
    create_classifier,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
)


def main(argv=None):
    args = create_argparser().parse_args(argv)

    dist_util.setup_dist()
    logger.configure(dir=args.log_dir or None)

    logger.log("creating model and diffusion...")
    flags = args_to_dict(args, model_and_diffusion_defaults().keys())
    flags["num_classes"] = args.num_classes
    model, diffusion = create_model_and_diffusion(**flags)
    load_checkpoint_into(
        model, args.model_path, flags, build=lambda f: create_model_and_diffusion(**f)[0]
    )
    model.to(dist_util.dev())
    if args.use_fp16:
        model.convert_to_fp16()
    model.eval()

    logger.log("loading classifier...")
    classifier_flags = args_to_dict(args, classifier_defaults().keys())
    classifier_flags["num_classes"] = args.num_classes
    classifier_flags["classifier_channel_mult"] = args.classifier_channel_mult
    classifier = create_classifier(**classifier_flags)
    try:
        load_checkpoint_into(
            classifier,
            args.classifier_path,
            classifier_flags,
            build=lambda f: create_classifier(**f),
        )
    except ScriptError as exc:
        if "pass --image_size" in str(exc) or "positional_embedding" in str(exc):
            raise ScriptError(
                f"the classifier {args.classifier_path} was trained at another image size than "
                f"the model's --image_size {args.image_size}: use a classifier trained at that "
                f"size ({exc})"
            ) from None
        raise
    classifier.to(dist_util.dev())
    if args.classifier_use_fp16:
        classifier.convert_to_fp16()
    classifier.eval()

    cond_fn = make_classifier_cond_fn(classifier, args.classifier_scale)

    def model_fn(x, t, y=None):
        # The labels steer the classifier always, the diffusion model only when it is conditional.
        return model(x, t, y if args.class_cond else None)

    seed_sampling(args.seed)
    logger.log("sampling...")
    sample_fn = diffusion.ddim_sample_loop if args.use_ddim else diffusion.p_sample_loop
    shape = (args.batch_size, 3, args.image_size, args.image_size)

    def make_batch():
        classes = torch.randint(
            low=0, high=args.num_classes, size=(args.batch_size,), device=dist_util.dev()
        )
        with autocast_context(args.use_bf16):
            sample = sample_fn(
                model_fn,
                shape,
                clip_denoised=args.clip_denoised,
                model_kwargs={"y": classes},
                cond_fn=cond_fn,
                device=dist_util.dev(),
            )
        return to_uint8(sample.float()), classes

    arr, labels = gather_samples(args.num_samples, args.batch_size, make_batch, progress=args.progress)
    write_samples(arr, labels, output_dir(args))
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
    # Needed for classifiers at sizes without a built-in channel table (e.g. 16).
    defaults.update(classifier_channel_mult="")
    parser = argparse.ArgumentParser(description="Sample with classifier guidance.")
    add_dict_to_argparser(parser, defaults)
    return parser


if __name__ == "__main__":
    run_main(main)
