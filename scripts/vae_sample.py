"""
Images from a trained VAE: prior samples, reconstructions of real images, and a latent-space
interpolation between two encoded images.

    python scripts/vae_sample.py --model_path logs/vae003000.pt --image_size 28 \
        --data_dir data/digits --out_dir samples/

Writes samples_NxHxWx3.npz (+ .png grid); with --data_dir also reconstructions.npz/.png and
interpolation.npz/.png. Pass the same architecture flags as for training.
"""

import argparse
import sys

import torch

from guided_diffusion import dist_util, logger
from guided_diffusion.runtime.checkpoints import load_checkpoint
from guided_diffusion.script_util import add_dict_to_argparser, args_to_dict
from guided_diffusion.vae import (
    ARCH_FLAGS,
    load_vae,
    sample_from_prior,
    save_interpolation,
    save_reconstructions,
    vae_defaults,
)


def create_argparser():
    defaults = dict(
        model_path="",
        data_dir="",
        num_samples=64,
        batch_size=64,
        num_recon=16,
        interp_steps=10,
        out_dir="",
        seed=0,
    )
    defaults.update(vae_defaults())
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_dict_to_argparser(parser, defaults)
    return parser


def main(args):
    dist_util.setup_dist()
    logger.configure(dir=args.out_dir or None)
    out_dir = logger.get_dir()
    if not args.model_path:
        raise ValueError("pass --model_path, a vaeNNNNNN.pt file written by scripts/vae_train.py")
    flags = args_to_dict(args, ARCH_FLAGS)
    model = load_vae(load_checkpoint(args.model_path), flags, args.model_path)
    model.to(dist_util.dev()).eval()

    torch.manual_seed(args.seed + dist_util.get_rank())
    path = sample_from_prior(
        model, num_samples=args.num_samples, batch_size=args.batch_size, out_dir=out_dir
    )
    if path:
        logger.log(f"wrote {path}")
    if args.data_dir and dist_util.is_main_process():
        logger.log(f"wrote {save_reconstructions(model, args.data_dir, args.num_recon, out_dir)}")
        logger.log(f"wrote {save_interpolation(model, args.data_dir, args.interp_steps, out_dir)}")
    dist_util.barrier()


if __name__ == "__main__":
    parsed = create_argparser().parse_args()
    try:
        main(parsed)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"vae_sample.py: error: {str(exc).strip().splitlines()[0]}", file=sys.stderr)
        sys.exit(1)
