"""
Export an LSUN category's lmdb database (from the LSUN download tools, e.g. bedroom_train_lmdb)
as an image folder of <prefix>_<index>.png at --image_size, resized and cropped as the reference
prepared its LSUN models' data. Needs lmdb: pip install 'guided-diffusion[lsun]'.

    python datasets/lsun.py bedroom_train_lmdb --out_dir data/lsun_bedroom --prefix bedroom
"""

import argparse

from guided_diffusion.cli.flags import add_flag, check_counts, script_description
from guided_diffusion.cli.main import run_main
from guided_diffusion.data.lsun import write_lsun


def create_argparser():
    parser = argparse.ArgumentParser(description=script_description(__doc__))
    add_flag(parser, "lmdb_path", positional=True)
    add_flag(parser, "out_dir", required=True)
    add_flag(parser, "image_size", type=int, default=256)
    add_flag(parser, "prefix", default="bedroom")
    add_flag(parser, "limit", type=int, default=None)
    return parser


def main(argv=None):
    args = create_argparser().parse_args(argv)
    check_counts(args, "limit")
    count = write_lsun(args.lmdb_path, args.out_dir, image_size=args.image_size,
                       prefix=args.prefix, limit=args.limit)
    print(f"wrote {count} images to {args.out_dir}")


if __name__ == "__main__":
    run_main(main)
