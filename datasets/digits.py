"""
Write scikit-learn's bundled handwritten digits (1797 images of 8x8 pixels, 10 classes) as an
image folder that load_data reads, named "<label>_<index>.png" (see guided_diffusion.data.digits).

    python datasets/digits.py --out_dir data/digits --image_size 32
"""

import argparse
import os

from guided_diffusion.cli.flags import add_flag, script_description
from guided_diffusion.cli.main import run_main
from guided_diffusion.data.digits import RESAMPLE_FILTERS, write_digits


def create_argparser():
    parser = argparse.ArgumentParser(description=script_description(__doc__))
    add_flag(parser, "out_dir", required=True)
    add_flag(parser, "image_size", type=int, default=32)
    add_flag(parser, "limit", type=int, default=None)
    add_flag(parser, "resample", choices=sorted(RESAMPLE_FILTERS), default="bicubic")
    return parser


def main(argv=None):
    args = create_argparser().parse_args(argv)
    out_dir = write_digits(
        args.out_dir, image_size=args.image_size, limit=args.limit, resample=args.resample
    )
    count = len([n for n in os.listdir(out_dir) if n.endswith(".png")])
    print(f"wrote digits to {out_dir} ({count} PNG files there)")


if __name__ == "__main__":
    run_main(main)
