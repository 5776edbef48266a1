"""
Evaluate a conditional GAN as in the paper's Table 1 (Parzen-window log-likelihood of held-out
images) and by the accuracy of a classifier, trained on real images, on samples of each class.

    python scripts/cgan_eval.py --model_path logs/cgan003000.pt \
        --data_dir data/digits8_train --test_dir data/digits8_test

The samples come from --model_path (drawn here, balanced over classes) or from --sample_path (an
npz written by cgan_sample.py). --data_dir holds real training images (the classifier learns from
them); --test_dir holds real held-out images, split alternately into a validation half (chooses
the Parzen kernel width) and a test half (is scored). A --data_dir with the MNIST IDX files uses
the papers' MNIST split instead. The network flags come from the checkpoint (it records them;
other values are refused); with --sample_path, --num_classes says how many classes there are.
Figures are logged and written to cgan_eval.json in the log folder (--log_dir, else
$OPENAI_LOGDIR).
"""

import json
import os

import numpy as np
import torch

from guided_diffusion import dist_util, logger
from guided_diffusion.cgan import (
    cgan_defaults,
    default_sigmas,
    evaluate_samples,
    generate_samples,
    generator_flags,
    is_grayscale,
    is_mnist_dir,
    load_generator,
    load_labeled_images,
    read_mnist,
    to_eval_space,
)
from guided_diffusion.cli.flags import explicit_flags, script_description
from guided_diffusion.cli.main import run_main
from guided_diffusion.errors import ScriptError
from guided_diffusion.sampling.files import to_uint8
from guided_diffusion.script_util import script_parser


def create_argparser():
    return script_parser(
        script_description(__doc__),
        dict(
            model_path="",
            sample_path="",
            data_dir="",
            test_dir="",
            num_samples=10000,
            batch_size=100,
            use_ema=True,
            sample_dropout=False,
            sigma_start=-1.0,
            sigma_end=0.0,
            sigma_steps=10,
            valid_limit=1000,
            classifier_steps=1000,
            seed=0,
            log_dir="",
        ),
        cgan_defaults(),
    )


def check_inputs(args, given):
    """
    Refuse bad flags before anything is written; with --model_path, take the checkpoint's
    network flags.

    :return: the generator's flags, or None with --sample_path.
    """
    if bool(args.model_path) == bool(args.sample_path):
        raise ScriptError(
            "pass exactly one of --model_path (a cgan checkpoint) or --sample_path (an npz)"
        )
    if not args.data_dir:
        raise ScriptError("pass --data_dir with the real training images (or the MNIST IDX files)")
    for flag in ("data_dir", "test_dir"):
        folder = getattr(args, flag)
        if folder and not os.path.isdir(folder):
            raise FileNotFoundError(f"--{flag} {folder} is not a folder")
    if args.sample_path:
        if not os.path.isfile(args.sample_path):
            raise FileNotFoundError(f"--sample_path {args.sample_path} does not exist")
        return None
    return generator_flags(args, given)


def load_samples(args, model_flags):
    if args.sample_path:
        with np.load(args.sample_path) as data:
            if "arr_1" not in data:
                raise ScriptError(
                    f"{args.sample_path} has no labels (arr_1): write it with cgan_sample.py"
                )
            return data["arr_0"], data["arr_1"]
    generator = load_generator(args.model_path, model_flags, use_ema=args.use_ema)
    generator.to(dist_util.dev())
    torch.manual_seed(args.seed + dist_util.get_rank())
    images, labels = generate_samples(
        generator, num_samples=args.num_samples, num_classes=args.num_classes,
        batch_size=args.batch_size, progress=True, keep_dropout=args.sample_dropout,
    )
    return to_uint8(images).numpy(), labels.numpy()


def real_splits(args, image_size):
    """(train, valid, test) pairs of uint8 NHWC images and labels."""
    if is_mnist_dir(args.data_dir):
        if image_size != 28:
            raise ValueError(f"samples are {image_size}x{image_size} but MNIST is 28x28")
        split = read_mnist(args.data_dir)
        return split["train"], split["valid"], split["test"]
    train_x, train_y, _ = load_labeled_images(args.data_dir, image_size=image_size)
    if args.test_dir:
        held_x, held_y, _ = load_labeled_images(args.test_dir, image_size=image_size)
        return (train_x, train_y), (held_x[0::2], held_y[0::2]), (held_x[1::2], held_y[1::2])
    logger.warn(
        "no --test_dir: holding out 20% of --data_dir; if the GAN trained on these images the "
        "Parzen estimate is optimistic"
    )
    order = np.random.RandomState(0).permutation(len(train_x))
    tenth = max(1, len(order) // 10)
    valid, test, train = order[:tenth], order[tenth : 2 * tenth], order[2 * tenth :]
    return tuple((train_x[idx], train_y[idx]) for idx in (train, valid, test))


def main(argv=None):
    parser = create_argparser()
    args = parser.parse_args(argv)
    model_flags = check_inputs(args, explicit_flags(parser, argv))
    dist_util.setup_dist()
    logger.configure(dir=args.log_dir or None)
    samples, sample_labels = load_samples(args, model_flags)
    if not dist_util.is_main_process():
        return
    if int(sample_labels.max()) >= args.num_classes:
        raise ValueError(
            f"samples have labels up to {int(sample_labels.max())}: raise --num_classes"
        )
    sigmas = default_sigmas(args.sigma_start, args.sigma_end, args.sigma_steps)
    gray = is_grayscale(samples)
    train, valid, test = real_splits(args, samples.shape[1])
    valid = (valid[0][: args.valid_limit], valid[1][: args.valid_limit])
    to_eval = lambda pair: (to_eval_space(pair[0], grayscale=gray), pair[1])
    figures, _ = evaluate_samples(
        to_eval_space(samples, grayscale=gray),
        sample_labels,
        train=to_eval(train),
        valid=to_eval(valid),
        test=to_eval(test),
        num_classes=args.num_classes,
        sigmas=sigmas,
        classifier_steps=args.classifier_steps,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    logger.log(
        f"Parzen log-likelihood of {len(test[0])} test images: {figures['parzen_mean']:.2f} "
        f"+- {figures['parzen_stderr']:.2f} (sigma {figures['parzen_sigma']:.4f}, "
        f"{figures['num_samples']} samples)"
    )
    logger.log(
        f"classifier accuracy: real test images {figures['classifier_real_test_accuracy']:.3f}, "
        f"samples {figures['sample_accuracy']:.3f}; per class "
        + " ".join(f"{a:.2f}" for a in figures["sample_accuracy_per_class"])
    )
    if len(sigmas) > 1 and figures["parzen_sigma"] in (sigmas[0], sigmas[-1]):
        logger.warn("the chosen sigma is at the edge of the grid: widen --sigma_start/--sigma_end")
    out = os.path.join(logger.get_dir(), "cgan_eval.json")
    with open(out, "w") as f:
        json.dump(figures, f, indent=2)
    logger.log(f"wrote {out}")


if __name__ == "__main__":
    run_main(main)
