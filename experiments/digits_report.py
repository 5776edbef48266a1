"""
Judge sampled digits with a classifier trained on the real digits (independent of any guiding
classifier): print the class accuracy of each samples file (the fraction of samples that show the
class they were generated for) and write each file's samples as a grid with one row per requested
class, <name>_by_class.png beside the npz.

    python scripts/digits_report.py runs/quickstart/unguided/samples_100x8x8x3.npz \
        runs/quickstart/guided/samples_100x8x8x3.npz

The npz files are those of classifier_sample.py / image_sample.py with class labels (arr_1).
"""

import argparse
import os
import sys

import numpy as np
from PIL import Image

from guidance_eval import RealDigitsJudge, grid_by_class


def main(argv=None):
    args = create_argparser().parse_args(argv)
    loaded = []
    for path in args.samples:
        with np.load(path) as data:
            if "arr_1" not in data:
                print(f"error: {path} has no class labels (arr_1): sample a class-conditional "
                      "model or with classifier_sample.py", file=sys.stderr)
                return 1
            loaded.append((path, data["arr_0"], data["arr_1"]))
    sizes = {images.shape[1] for _, images, _ in loaded}
    if len(sizes) != 1:
        print(f"error: the files hold different image sizes {sorted(sizes)}", file=sys.stderr)
        return 1
    judge = RealDigitsJudge(sizes.pop(), steps=args.judge_steps, seed=args.seed)
    print(f"judge: a classifier trained on real digits, {judge.heldout_accuracy:.3f} accuracy on "
          "held-out real digits")
    for path, images, labels in loaded:
        accuracy = judge.accuracy(images, labels)
        grid_path = os.path.splitext(path)[0] + "_by_class.png"
        Image.fromarray(grid_by_class(images, labels, upscale=args.upscale).squeeze()).save(
            grid_path
        )
        print(f"class accuracy {accuracy:.3f} ({len(images)} samples) for {path}; "
              f"grid, one row per requested class: {grid_path}")
    return 0


def create_argparser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("samples", nargs="+", help="samples_*.npz files with labels (arr_1)")
    parser.add_argument("--judge_steps", type=int, default=1000,
                        help="training steps of the real-digits classifier")
    parser.add_argument("--upscale", type=int, default=4,
                        help="nearest-neighbour magnification of the grids")
    parser.add_argument("--seed", type=int, default=0, help="seed of the judge's training")
    return parser


if __name__ == "__main__":
    sys.exit(main())
