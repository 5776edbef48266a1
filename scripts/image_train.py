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

from guided_diffusion import dist_util, logger
from guided_diffusion.cli.flags import augmentation_defaults, diffusion_train_defaults
from guided_diffusion.cli.main import run_main
from guided_diffusion.image_datasets import check_dataset_classes, load_data, with_label_dropout
from guided_diffusion.resample import create_named_schedule_sampler
from guided_diffusion.runtime.perf import compile_model, to_channels_last
from guided_diffusion.script_util import (
    args_to_dict,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
    script_parser,
)
from guided_diffusion.train_util import TRAIN_LOOP_FLAGS, TrainLoop
from guided_diffusion.training.engine import parse_run_args, start_run
from guided_diffusion.training.watch import watch_keywords


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
    )
    model.to(dist_util.dev())
    to_channels_last(model, args.channels_last)
    compile_model(model, args.compile)

    logger.log("creating data loader...")
    if args.class_cond:
        check_dataset_classes(args.data_dir, args.num_classes)
    data = load_data(
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        image_size=args.image_size,
        class_cond=args.class_cond,
        random_flip=args.random_flip,
        random_crop=args.random_crop,
        in_channels=args.in_channels,
    )
    # Classifier-free guidance: labels become the null class (index num_classes) at this rate.
    data = with_label_dropout(data, prob=args.class_dropout_prob, null_label=args.num_classes)

    logger.log("training...")
    TrainLoop(
        model=model,
        diffusion=diffusion,
        data=data,
        schedule_sampler=create_named_schedule_sampler(args.schedule_sampler, diffusion),
        **args_to_dict(args, TRAIN_LOOP_FLAGS),
        # --sample_interval grids and --val_data_dir losses (docs/runs.md)
        **watch_keywords(args, flags, lambda folder: load_data(
            data_dir=folder, batch_size=args.batch_size, image_size=args.image_size,
            class_cond=args.class_cond, deterministic=True, random_flip=False)),
    ).run_loop()


def create_argparser():
    return script_parser(
        "Train a diffusion model on a folder of images.",
        diffusion_train_defaults(),
        model_and_diffusion_defaults(),
        augmentation_defaults(),
    )


if __name__ == "__main__":
    run_main(main)
