"""
Train a conditional GAN (Mirza & Osindero 2014) on a class-prefixed image folder
("<class>_<anything>.png") or on a folder holding the MNIST IDX files.

    python scripts/cgan_train.py --data_dir data/digits8 --image_size 8 --max_steps 3000

Works as one process, under ``mpiexec -n N`` or under ``torchrun``. Checkpoints cganNNNNNN.pt (both
networks, the generator's EMA, both optimisers, the step and the network flags) go to the logger
folder ($OPENAI_LOGDIR).
"""

import argparse

import torch

from guided_diffusion import dist_util, logger
from guided_diffusion.cgan import (
    cgan_defaults,
    cgan_train_defaults,
    cgan_training_batches,
    CGANTrainLoop,
    count_classes,
    create_cgan,
)
from guided_diffusion.cli.main import exit_with_error
from guided_diffusion.script_util import add_dict_to_argparser, args_to_dict


def create_argparser():
    defaults = cgan_train_defaults()
    defaults.update(cgan_defaults())
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_dict_to_argparser(parser, defaults)
    return parser


def main(args):
    dist_util.setup_dist()
    logger.configure()
    found = count_classes(args.data_dir)
    if found > args.num_classes:
        raise ValueError(f"{args.data_dir} has {found} classes: pass --num_classes {found}")
    model_flags = args_to_dict(args, cgan_defaults().keys())
    # Same initial weights on every rank (rank 0's are broadcast anyway).
    torch.manual_seed(args.seed)
    generator, discriminator = create_cgan(**model_flags)
    generator.to(dist_util.dev())
    discriminator.to(dist_util.dev())
    logger.log(
        f"cGAN {model_flags}: generator {sum(p.numel() for p in generator.parameters())}, "
        f"discriminator {sum(p.numel() for p in discriminator.parameters())} parameters"
    )
    # Per-rank noise, dropout and data order.
    torch.manual_seed(args.seed + dist_util.get_rank())
    data = cgan_training_batches(
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        image_size=args.image_size,
        random_flip=args.random_flip,
        preload=args.preload,
    )
    train_keys = [
        "optimizer", "lr", "adam_beta1", "adam_beta2", "lr_decay", "min_lr", "momentum",
        "final_momentum", "momentum_saturate_steps", "ema_rate", "max_steps", "log_interval",
        "save_interval", "resume_checkpoint",
    ]
    loop = CGANTrainLoop(
        generator=generator,
        discriminator=discriminator,
        data=data,
        arch=args.arch,
        batch_size=args.batch_size,
        model_flags=model_flags,
        **args_to_dict(args, train_keys),
    )
    loop.run_loop()
    logger.log("training complete")


if __name__ == "__main__":
    parsed = create_argparser().parse_args()
    try:
        main(parsed)
    except (ValueError, TypeError, FileNotFoundError, FloatingPointError, OSError) as exc:
        # A full disk or an unwritable folder is one line too; other OSErrors are bugs.
        exit_with_error(exc, "cgan_train.py: error", 1)
