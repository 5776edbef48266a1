"""
Judge sampled digits with a classifier trained on the real digits (independent of any guiding
classifier): print the class accuracy of each samples file (the fraction of samples that show the
class they were generated for) and write each file's samples as a grid with one row per requested
class, <name>_by_class.png beside the npz.

    python experiments/digits_report.py runs/quickstart/unguided/samples_100x8x8x3.npz \
        runs/quickstart/guided/samples_100x8x8x3.npz

The npz files are those of classifier_sample.py / image_sample.py with class labels (arr_1).
"""

import argparse
import os

import numpy as np
from PIL import Image

from guided_diffusion import logger
from guided_diffusion.cli.flags import add_flag
from guided_diffusion.cli.main import run_main
from guided_diffusion.errors import ScriptError

from guidance_eval import RealDigitsJudge, grid_by_class


def main(argv=None):
    args = create_argparser().parse_args(argv)
    loaded = []
    for path in args.samples:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no such samples file: {path}")
        with np.load(path) as data:
            if "arr_1" not in data:
                raise ScriptError(f"{path} has no class labels (arr_1): sample a class-conditional "
                                  "model or with classifier_sample.py")
            loaded.append((path, data["arr_0"], data["arr_1"]))
    sizes = {images.shape[1] for _, images, _ in loaded}
    if len(sizes) != 1:
        raise ScriptError(f"the files hold different image sizes {sorted(sizes)}: judge them in "
                          "separate runs")
    # The report goes to the terminal, and to log.txt too when --log_dir (or $OPENAI_LOGDIR)
    # names a folder; nothing else is written there (the grids go beside the npz files), so
    # without one no dated folder is made.
    say = print
    log_dir = args.log_dir or os.environ.get("OPENAI_LOGDIR")
    if log_dir:
        logger.configure(dir=log_dir, format_strs=["stdout", "log"])
        say = logger.log
    judge = RealDigitsJudge(sizes.pop(), steps=args.judge_steps, seed=args.seed)
    say(f"judge: a classifier trained on real digits, {judge.heldout_accuracy:.3f} accuracy on "
        "held-out real digits")
    for path, images, labels in loaded:
        accuracy = judge.accuracy(images, labels)
        grid_path = os.path.splitext(path)[0] + "_by_class.png"
        Image.fromarray(grid_by_class(images, labels, upscale=args.upscale).squeeze()).save(
            grid_path
        )
        say(f"class accuracy {accuracy:.3f} ({len(images)} samples) for {path}; "
            f"grid, one row per requested class: {grid_path}")


def create_argparser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    add_flag(parser, "samples", positional=True, nargs="+")
    add_flag(parser, "judge_steps", type=int, default=1000)
    add_flag(parser, "upscale", type=int, default=4)
    add_flag(parser, "seed", type=int, default=0)
    add_flag(parser, "log_dir", default="")
    return parser


if __name__ == "__main__":
    run_main(main)
