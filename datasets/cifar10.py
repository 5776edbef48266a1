"""
Write CIFAR-10 as image folders that load_data reads: the "python version" archive its authors
distribute (cifar-10-python.tar.gz) becomes OUT_DIR/train/<class>_<index>.png (50000 images) and
OUT_DIR/test/<class>_<index>.png (10000), classes airplane ... truck.

    python datasets/cifar10.py cifar-10-python.tar.gz --out_dir data/cifar10
"""

import argparse

from guided_diffusion.cli.flags import add_flag, check_counts, script_description
from guided_diffusion.cli.main import run_main
from guided_diffusion.data.cifar10 import write_cifar10


def create_argparser():
    parser = argparse.ArgumentParser(description=script_description(__doc__))
    add_flag(parser, "archive", positional=True)
    add_flag(parser, "out_dir", required=True)
    add_flag(parser, "limit", type=int, default=None)
    return parser


def main(argv=None):
    args = create_argparser().parse_args(argv)
    check_counts(args, "limit")
    counts = write_cifar10(args.archive, args.out_dir, limit=args.limit)
    print(f"wrote {counts['train']} training and {counts['test']} test images to {args.out_dir}")


if __name__ == "__main__":
    run_main(main)
