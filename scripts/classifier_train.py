"""
Train a noisy-image classifier for classifier guidance: it learns p(y | x_t, t) on images noised
by the diffusion's forward process (or on clean images with --noised False).

    mpiexec -n N python scripts/classifier_train.py --data_dir DIR $CLASSIFIER_FLAGS $TRAIN_FLAGS

Runs on CPU too, with gradients averaged over ranks (the reference required CUDA). Checkpoints
(modelNNNNNN.pt, optNNNNNN.pt) and progress.csv go to --log_dir (default $OPENAI_LOGDIR).
"""

if __name__ == "__main__":
    # First, before the slow imports: a preemption signal (SIGTERM, SIGUSR1) is recorded from
    # here on instead of killing the process, so one that arrives while the run starts up ends
    # it with exit status 75 before the first step (guided_diffusion/runtime/signals.py).
    from guided_diffusion.runtime.signals import catch_preemption_signals

    catch_preemption_signals()

from guided_diffusion import dist_util, logger
from guided_diffusion.cli.flags import classifier_train_defaults
from guided_diffusion.cli.main import run_main
from guided_diffusion.image_datasets import check_dataset_classes, check_validation_classes, load_data
from guided_diffusion.resample import create_named_schedule_sampler
from guided_diffusion.runtime.perf import compile_model, to_channels_last
from guided_diffusion.script_util import (
    args_to_dict,
    classifier_and_diffusion_defaults,
    create_classifier_and_diffusion,
    script_parser,
)
from guided_diffusion.training.classifier import ClassifierTrainLoop
from guided_diffusion.training.engine import TrainOptions, parse_run_args, start_run


def main(argv=None):
    args = parse_run_args(create_argparser(), argv)  # --init_num_classes K sets --num_classes
    start_run(log_dir=args.log_dir, seed=args.seed, tf32=args.tf32, args=args, script=__file__,
              argv=argv)

    # The data folders first: a missing one is refused before any work.
    names = check_dataset_classes(args.data_dir, args.num_classes)
    if args.val_data_dir:
        # Its classes must be the training folder's; its labels are numbered as those.
        check_validation_classes(args.val_data_dir, names)

    logger.log("creating model and diffusion...")
    flags = args_to_dict(args, classifier_and_diffusion_defaults().keys())
    flags.update(num_classes=args.num_classes, classifier_channel_mult=args.classifier_channel_mult,
                 in_channels=args.in_channels)
    model, diffusion = create_classifier_and_diffusion(**flags)
    model.to(dist_util.dev())
    to_channels_last(model, args.channels_last)
    compile_model(model, args.compile)

    logger.log("creating data loader...")
    data = load_data(
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        image_size=args.image_size,
        class_cond=True,
        random_crop=True,
        in_channels=args.in_channels,
    )
    val_data = None
    if args.val_data_dir:
        val_data = load_data(
            data_dir=args.val_data_dir,
            batch_size=args.batch_size,
            image_size=args.image_size,
            class_cond=True,
            in_channels=args.in_channels,
            flag="--val_data_dir",
            class_names=names,
        )

    logger.log("training classifier model...")
    ClassifierTrainLoop(
        model=model,
        diffusion=diffusion,
        data=data,
        val_data=val_data,
        schedule_sampler=(
            create_named_schedule_sampler(args.schedule_sampler, diffusion) if args.noised else None
        ),
        weight_hints=dict(flags=flags, build=lambda f: create_classifier_and_diffusion(**f)[0]),
        use_fp16=args.classifier_use_fp16,
        options=TrainOptions.from_flags(args),
        **args_to_dict(args, ["microbatch", "eval_interval", "init_num_classes", "save_format"]),
    ).run_loop()


def create_argparser():
    return script_parser(
        "Train a noisy-image classifier.",
        classifier_train_defaults(),
        classifier_and_diffusion_defaults(),
    )


if __name__ == "__main__":
    run_main(main)
