"""
Train a super-resolution diffusion model: it learns large_size images conditioned on their
small_size versions (area-downsampled from the same images).

    mpiexec -n N python scripts/super_res_train.py --data_dir DIR --large_size 256 --small_size 64 ...

Checkpoints and progress.csv go to --log_dir (default $OPENAI_LOGDIR), as for image_train.py.
"""

if __name__ == "__main__":
    # First, before the slow imports: a preemption signal (SIGTERM, SIGUSR1) is recorded from
    # here on instead of killing the process, so one that arrives while the run starts up ends
    # it with exit status 75 before the first step (guided_diffusion/runtime/signals.py).
    from guided_diffusion.runtime.signals import catch_preemption_signals

    catch_preemption_signals()

from guided_diffusion import logger
from guided_diffusion.cli.flags import diffusion_train_defaults
from guided_diffusion.cli.main import run_main
from guided_diffusion.image_datasets import (
    load_superres_data,
)
from guided_diffusion.script_util import (
    args_to_dict,
    script_parser,
    sr_create_model_and_diffusion,
    sr_model_and_diffusion_defaults,
)
from guided_diffusion.train_util import train_from_flags
from guided_diffusion.training.engine import parse_run_args, start_run


def main(argv=None):
    args = parse_run_args(create_argparser(), argv)
    start_run(log_dir=args.log_dir, seed=args.seed, tf32=args.tf32, args=args, script=__file__,
              argv=argv)

    logger.log("creating model...")
    flags = args_to_dict(args, sr_model_and_diffusion_defaults().keys())
    flags.update(
        num_classes=args.num_classes,
        channel_mult=args.channel_mult,
        class_dropout_prob=args.class_dropout_prob,
        in_channels=args.in_channels,
        arch=args.arch,  # refused unless unet: the super-resolution model is a UNet
    )
    model, diffusion = sr_create_model_and_diffusion(**flags)
    # Validation (deterministic) batches are unflipped and in a fixed order.
    fixed = dict(deterministic=True, random_flip=False)
    train_from_flags(args, model, diffusion, flags, lambda folder, deterministic, **kw: load_superres_data(
        folder, args.batch_size, large_size=args.large_size, small_size=args.small_size,
        class_cond=args.class_cond, in_channels=args.in_channels, **(fixed if deterministic else {}),
        **kw,
    ))


def create_argparser():
    return script_parser(
        "Train a super-resolution diffusion model.",
        diffusion_train_defaults(),
        sr_model_and_diffusion_defaults(),
        dict(channel_mult=""),  # "" = by large_size; needed for sizes like 16
    )


if __name__ == "__main__":
    run_main(main)
