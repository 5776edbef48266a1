"""
Train a diffusion model on a folder of images.

    mpiexec -n N python scripts/image_train.py --data_dir DIR $MODEL_FLAGS $DIFFUSION_FLAGS $TRAIN_FLAGS

Also runs under torchrun or as one plain process. Checkpoints (modelNNNNNN.pt, ema_<rate>_NNNNNN.pt,
optNNNNNN.pt, stateNNNNNN.pt) and progress.csv go to --log_dir (default $OPENAI_LOGDIR).
"""

if __name__ == "__main__":
    # First, before the slow imports: a preemption signal (SIGTERM, SIGUSR1) is recorded from
    # here on instead of killing the process, so one that arrives while the run starts up ends
    # it with exit status 75 before the first step (guided_diffusion/runtime/signals.py).
    from guided_diffusion.runtime.signals import catch_preemption_signals

    catch_preemption_signals()

from guided_diffusion import logger
from guided_diffusion.cli.flags import (
    arch_defaults,
    augmentation_defaults,
    diffusion_train_defaults,
    fid_train_defaults,
)
from guided_diffusion.cli.main import run_main
from guided_diffusion.image_datasets import load_data
from guided_diffusion.script_util import (
    args_to_dict,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
    script_parser,
)
from guided_diffusion.train_util import train_from_flags
from guided_diffusion.training.engine import parse_run_args, start_run


def main(argv=None):
    args = parse_run_args(create_argparser(), argv)
    start_run(log_dir=args.log_dir, seed=args.seed, tf32=args.tf32, args=args, script=__file__,
              argv=argv)

    logger.log("creating model and diffusion...")
    flags = args_to_dict(args, model_and_diffusion_defaults().keys())
    model, diffusion = create_model_and_diffusion(
        **flags,
        num_classes=args.num_classes,
        class_dropout_prob=args.class_dropout_prob,
        in_channels=args.in_channels,
        **{name: getattr(args, name) for name in arch_defaults()},  # --arch and its flags
    )
    train_from_flags(args, model, diffusion, flags, lambda folder, deterministic, **kw: load_data(
        data_dir=folder,
        batch_size=args.batch_size,
        image_size=args.image_size,
        class_cond=args.class_cond,
        deterministic=deterministic,
        random_flip=args.random_flip and not deterministic,
        random_crop=args.random_crop and not deterministic,
        in_channels=args.in_channels,
        **kw,
    ))


def create_argparser():
    return script_parser(
        "Train a diffusion model on a folder of images.",
        diffusion_train_defaults(),
        model_and_diffusion_defaults(),
        augmentation_defaults(),
        fid_train_defaults(),
    )


if __name__ == "__main__":
    run_main(main)
