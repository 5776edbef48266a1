"""
Draw class-conditional samples from a trained conditional GAN.

    python scripts/cgan_sample.py --model_path logs/cgan003000.pt --image_size 8 --num_samples 100

Writes samples_NxHxWx3.npz (arr_0: uint8 NHWC images, arr_1: int64 class labels) to the logger
folder ($OPENAI_LOGDIR) and a PNG grid next to it with one row per class. The network flags
(--arch, --image_size, --num_classes, --z_dim, --conv_channels) must be those of training.
"""

import argparse
import os
import sys

import torch

from guided_diffusion import dist_util, logger
from guided_diffusion.cgan import (
    cgan_defaults,
    class_grid,
    generate_samples,
    load_generator,
)
from guided_diffusion.sampling.files import make_grid_png, save_samples, to_uint8
from guided_diffusion.script_util import add_dict_to_argparser, args_to_dict


def create_argparser():
    defaults = dict(
        model_path="",
        num_samples=100,
        batch_size=100,
        class_label=-1,
        use_ema=True,
        grid_per_class=10,
        sample_dropout=False,
        seed=0,
    )
    defaults.update(cgan_defaults())
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_dict_to_argparser(parser, defaults)
    return parser


def main(args):
    dist_util.setup_dist()
    logger.configure()
    if not args.model_path:
        raise ValueError("pass --model_path pointing to a cgan%06d.pt checkpoint")
    generator = load_generator(
        args.model_path, args_to_dict(args, cgan_defaults().keys()), use_ema=args.use_ema
    ).to(dist_util.dev())
    torch.manual_seed(args.seed + dist_util.get_rank())
    images, labels = generate_samples(
        generator,
        num_samples=args.num_samples,
        num_classes=args.num_classes,
        class_label=args.class_label,
        batch_size=args.batch_size,
        progress=True,
        keep_dropout=args.sample_dropout,
    )
    if dist_util.is_main_process():
        images = to_uint8(images)
        path = save_samples(images, labels, logger.get_dir(), grid_max_images=0)
        grid, per_row = class_grid(images, labels, per_class=args.grid_per_class)
        make_grid_png(grid, os.path.splitext(path)[0] + ".png", nrow=per_row)
        logger.log(f"saved {path} and its grid (one row per class)")
    dist_util.barrier()
    logger.log("sampling complete")


if __name__ == "__main__":
    parsed = create_argparser().parse_args()
    try:
        main(parsed)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"cgan_sample.py: error: {str(exc).strip().splitlines()[0]}", file=sys.stderr)
        sys.exit(1)
