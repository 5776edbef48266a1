"""
Train a VAE (Kingma & Welling 2013) on a folder of images.

    python scripts/vae_train.py --data_dir data/digits --image_size 28 --iterations 3000

Works as one process, under ``mpiexec -n N`` or under ``torchrun``. Checkpoints vaeNNNNNN.pt go
to the logger folder ($OPENAI_LOGDIR); losses are logged in nats per image.
"""

import argparse

import torch

from guided_diffusion import dist_util, logger
from guided_diffusion.image_datasets import load_data
from guided_diffusion.cli.main import exit_with_error
from guided_diffusion.script_util import add_dict_to_argparser, args_to_dict
from guided_diffusion.vae import (
    ARCH_FLAGS,
    create_vae,
    vae_defaults,
    VAETrainLoop,
)


def create_argparser():
    defaults = dict(
        data_dir="",
        lr=1e-3,
        beta=1.0,
        batch_size=100,
        iterations=10000,
        log_interval=100,
        save_interval=1000,
        resume_checkpoint="",
        weight_decay=0.0,
        random_flip=False,
        seed=0,
    )
    defaults.update(vae_defaults())
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_dict_to_argparser(parser, defaults)
    return parser


def main(args):
    dist_util.setup_dist()
    logger.configure()
    flags = args_to_dict(args, ARCH_FLAGS)
    # Same initial weights on every rank; then per-rank noise and data order.
    torch.manual_seed(args.seed)
    model = create_vae(**flags)
    logger.log(f"VAE {flags}: {sum(p.numel() for p in model.parameters())} parameters")
    data = load_data(
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        image_size=args.image_size,
        class_cond=args.class_cond,
        random_flip=args.random_flip,
    )
    loop = VAETrainLoop(
        model=model,
        data=data,
        flags=flags,
        lr=args.lr,
        beta=args.beta,
        iterations=args.iterations,
        log_interval=args.log_interval,
        save_interval=args.save_interval,
        resume_checkpoint=args.resume_checkpoint,
        weight_decay=args.weight_decay,
    )
    torch.manual_seed(args.seed + dist_util.get_rank())
    loop.run_loop()
    logger.log("training complete")


if __name__ == "__main__":
    parsed = create_argparser().parse_args()
    try:
        main(parsed)
    except (ValueError, FileNotFoundError, FloatingPointError, RuntimeError, OSError) as exc:
        # A full disk or an unwritable folder is one line too; other OSErrors are bugs.
        exit_with_error(exc, "vae_train.py: error", 1)
