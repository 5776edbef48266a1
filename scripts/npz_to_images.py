"""
Write the images of a samples npz (the output of image_sample.py, classifier_sample.py or
super_res_sample.py) as one PNG each: <index>_<label>.png when the npz holds labels (arr_1),
else <index>.png, into a folder named like the npz (or --out_dir).

    python scripts/npz_to_images.py samples_100x64x64x3.npz
"""

import argparse

from guided_diffusion.cli.flags import add_flag, check_counts, script_description
from guided_diffusion.cli.main import run_main
from guided_diffusion.sampling.files import npz_to_image_files


def create_argparser():
    parser = argparse.ArgumentParser(description=script_description(__doc__))
    add_flag(parser, "npz", positional=True)
    add_flag(parser, "out_dir", default="")
    add_flag(parser, "limit", type=int, default=None)
    return parser


def main(argv=None):
    args = create_argparser().parse_args(argv)
    check_counts(args, "limit")
    folder, count = npz_to_image_files(args.npz, folder=args.out_dir or None, limit=args.limit)
    print(f"wrote {count} images to {folder}")


if __name__ == "__main__":
    run_main(main)
