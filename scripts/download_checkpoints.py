"""
Download the reference's released checkpoints by name (or all), resumably: an interrupted
download continues from where it stopped when run again, and a file is renamed into place only
once its length is verified. --list shows the names, sizes and the flags each checkpoint needs.

    python scripts/download_checkpoints.py 64x64_diffusion 64x64_classifier --out_dir models
"""

import argparse

from guided_diffusion.cli.flags import add_flag, script_description
from guided_diffusion.cli.main import run_main
from guided_diffusion.data.released import approx_size, checkpoints, fetch_checkpoints, format_bytes
from guided_diffusion.script_util import str2bool


def create_argparser():
    parser = argparse.ArgumentParser(description=script_description(__doc__))
    add_flag(parser, "names", positional=True, nargs="*")
    add_flag(parser, "out_dir", default="models")
    add_flag(parser, "base_url", default="")
    add_flag(parser, "list", type=str2bool, default=False)
    add_flag(parser, "progress", type=str2bool, default=True)
    return parser


def main(argv=None):
    args = create_argparser().parse_args(argv)
    if args.list:
        for entry in checkpoints().values():
            print(f"{entry['name']}: {entry['what']}, about {format_bytes(approx_size(entry))}; "
                  f"{entry['script']} {entry['flags']}")
        return
    fetch_checkpoints(args.names, args.out_dir, base_url=args.base_url or None,
                      progress=args.progress)


if __name__ == "__main__":
    run_main(main)
