"""
Make a reference batch of your own data for evaluations/evaluator.py: the images of a folder
resized and centre-cropped to --image_size exactly as training reads them, saved as an npz
(arr_0: uint8 N x H x W x 3, arr_1: labels with --class_cond True), with the Inception statistics
of the whole folder when --stats True.

    python evaluations/make_ref_batch.py data/train ref_batch.npz --image_size 64 --stats True \
        --inception_path pt_inception-2015-12-05-6726825d.pth
"""

import argparse

import torch

from guided_diffusion.cli.flags import add_flag, script_description
from guided_diffusion.cli.main import run_main
from guided_diffusion.evaluation.evaluator import Evaluator, default_inception_path
from guided_diffusion.evaluation.inception import HOW_TO_GET_WEIGHTS, WEIGHTS_FILENAME, load_inception
from guided_diffusion.evaluation.reference_batch import make_reference_batch
from guided_diffusion.runtime.shapes import parse_image_size
from guided_diffusion.script_util import str2bool


def create_argparser():
    parser = argparse.ArgumentParser(description=script_description(__doc__))
    add_flag(parser, "folder", positional=True)
    add_flag(parser, "out_npz", positional=True)
    add_flag(parser, "image_size", type=parse_image_size, required=True)
    add_flag(parser, "class_cond", type=str2bool, default=False)
    add_flag(parser, "max_images", type=int, default=0)
    add_flag(parser, "stats", type=str2bool, default=False)
    add_flag(parser, "inception_path", default=None)
    add_flag(parser, "batch_size", type=int, default=64)
    add_flag(parser, "device", default=None)
    add_flag(parser, "progress", type=str2bool, default=True)
    return parser


def main(argv=None):
    args = create_argparser().parse_args(argv)
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be positive, got {args.batch_size}")
    if args.max_images < 0:
        raise ValueError(f"--max_images must be 0 (all) or positive, got {args.max_images}")
    if not args.out_npz.endswith(".npz"):
        raise ValueError(f"the output must be an .npz file, got {args.out_npz}")
    evaluator = None
    if args.stats:
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        path = args.inception_path or default_inception_path()
        if path is None:
            raise FileNotFoundError(
                f"--stats True needs the Inception weights and no {WEIGHTS_FILENAME} is in the "
                f"torch hub cache or the current directory: {HOW_TO_GET_WEIGHTS}"
            )
        evaluator = Evaluator(model=load_inception(path, device=device), device=device,
                              batch_size=args.batch_size, progress=False)
    path, kept, counted = make_reference_batch(
        args.folder, args.out_npz, args.image_size, class_cond=args.class_cond,
        max_images=args.max_images, evaluator=evaluator, batch_size=args.batch_size,
        progress=args.progress,
    )
    stats = f", statistics of {counted} images" if counted else ""
    print(f"wrote {path}: {kept} images{stats}")


if __name__ == "__main__":
    run_main(main)
