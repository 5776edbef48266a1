"""
Train a conditional GAN (Mirza & Osindero 2014) on a class-prefixed image folder
("<class>_<anything>.png") or on a folder holding the MNIST IDX files.

    python scripts/cgan_train.py --data_dir data/digits8 --image_size 8 --iterations 3000 \
        --log_dir runs/cgan

Works as one process, under ``mpiexec -n N`` or under ``torchrun``. Checkpoints cganNNNNNN.pt (both
networks, the generator's EMA, both optimisers, the step and the network flags) and progress.csv
go to --log_dir (default $OPENAI_LOGDIR).
"""

if __name__ == "__main__":
    # First, before the slow imports: a preemption signal (SIGTERM, SIGUSR1) is recorded from
    # here on instead of killing the process, so one that arrives while the run starts up ends
    # it with exit status 75 before the first step (guided_diffusion/runtime/signals.py).
    from guided_diffusion.runtime.signals import catch_preemption_signals

    catch_preemption_signals()

import torch

from guided_diffusion import dist_util, logger
from guided_diffusion.cgan import (
    CGANTrainLoop,
    cgan_defaults,
    cgan_train_defaults,
    cgan_training_batches,
    count_classes,
    create_cgan,
)
from guided_diffusion.cli.flags import script_description
from guided_diffusion.cli.main import run_main
from guided_diffusion.script_util import args_to_dict, script_parser
from guided_diffusion.cgan.training import check_sgd_schedule
from guided_diffusion.training.engine import TrainOptions, start_run

# Flags handled here rather than by CGANTrainLoop.
_SCRIPT_FLAGS = ("data_dir", "random_flip", "preload", "seed", "log_dir", "log_format")


def create_argparser():
    return script_parser(script_description(__doc__), cgan_train_defaults(), cgan_defaults())


def main(argv=None):
    args = create_argparser().parse_args(argv)
    check_sgd_schedule(args.optimizer, TrainOptions.from_flags(args))  # before the log folder
    start_run(log_dir=args.log_dir, seed=args.seed, args=args, script=__file__, argv=argv)
    found = count_classes(args.data_dir)
    if found > args.num_classes:
        raise ValueError(f"{args.data_dir} has {found} classes: pass --num_classes {found}")
    model_flags = args_to_dict(args, cgan_defaults().keys())
    # The same initial weights on every rank (rank 0's are broadcast anyway), then per-rank
    # noise, dropout and data order.
    torch.manual_seed(args.seed)
    generator, discriminator = create_cgan(**model_flags)
    generator.to(dist_util.dev())
    discriminator.to(dist_util.dev())
    logger.log(
        f"cGAN {model_flags}: generator {sum(p.numel() for p in generator.parameters())}, "
        f"discriminator {sum(p.numel() for p in discriminator.parameters())} parameters"
    )
    torch.manual_seed(args.seed + dist_util.get_rank())
    data = cgan_training_batches(
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        image_size=args.image_size,
        random_flip=args.random_flip,
        preload=args.preload,
    )
    loop_flags = [k for k in cgan_train_defaults() if k not in _SCRIPT_FLAGS]
    CGANTrainLoop(
        generator=generator,
        discriminator=discriminator,
        data=data,
        arch=args.arch,
        model_flags=model_flags,
        **args_to_dict(args, loop_flags),
    ).run_loop()
    logger.log("training complete")


if __name__ == "__main__":
    run_main(main)
