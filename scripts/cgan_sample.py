"""
Draw class-conditional samples from a trained conditional GAN.

    python scripts/cgan_sample.py --model_path logs/cgan003000.pt --num_samples 100

Writes samples_NxHxWx3.npz (arr_0: uint8 NHWC images, arr_1: int64 class labels) to --out_dir
(default: the log folder, --log_dir or $OPENAI_LOGDIR) and a PNG grid next to it with one row
per class. The network flags (--arch, --image_size, --num_classes, --z_dim, --conv_channels,
--dropout) are read from the checkpoint; passing other values is refused.
"""

if __name__ == "__main__":
    # First, before the slow imports: a stop signal (SIGTERM, SIGUSR1, SIGINT) is recorded from
    # here on instead of killing the process; the run then stops after its current batch with
    # that batch kept (guided_diffusion/runtime/kept_rounds.py).
    from guided_diffusion.runtime.signals import catch_preemption_signals

    catch_preemption_signals()

import torch

from guided_diffusion import dist_util, logger
from guided_diffusion.cgan import cgan_defaults, generate_samples, generator_flags, load_generator
from guided_diffusion.cli.flags import explicit_flags, output_defaults, script_description
from guided_diffusion.cli.main import run_main
from guided_diffusion.errors import ScriptError
from guided_diffusion.sampling.files import save_samples, to_uint8
from guided_diffusion.sampling.loop import check_sampling_flags, keep_sample_rounds, output_dir
from guided_diffusion.script_util import script_parser


def create_argparser():
    return script_parser(
        script_description(__doc__),
        dict(
            model_path="",
            num_samples=100,
            batch_size=100,
            class_label=-1,
            use_ema=True,
            grid_per_class=10,
            save_images=False,
            sample_dropout=False,
            seed=0,
            log_dir="",
            out_dir="",
        ),
        output_defaults(),
        cgan_defaults(),
    )


def main(argv=None):
    parser = create_argparser()
    args = parser.parse_args(argv)
    check_sampling_flags(args)  # before any work: bad counts, an unwritable --out_dir
    # Everything that can refuse the flags comes before the log folder is made.
    model_flags = generator_flags(args, explicit_flags(parser, argv))
    if args.grid_per_class < 1:
        raise ScriptError(f"--grid_per_class must be at least 1, got {args.grid_per_class}")
    dist_util.setup_dist()
    # The output folder is checked now; the rounds keep float32 images.
    kept = keep_sample_rounds(args, __file__, model_flags["image_size"], round_itemsize=4)
    logger.configure(dir=args.log_dir or None)
    generator = load_generator(args.model_path, model_flags, use_ema=args.use_ema)
    generator.to(dist_util.dev())
    out = output_dir(args)
    kept.open(out)
    torch.manual_seed(args.seed + dist_util.get_rank())
    images, labels = generate_samples(
        generator,
        num_samples=args.num_samples,
        num_classes=args.num_classes,
        class_label=args.class_label,
        batch_size=args.batch_size,
        progress=True,
        keep_dropout=args.sample_dropout,
        kept=kept,
    )

    def write():
        return save_samples(
            to_uint8(images), labels, out,
            grid_max_images=args.grid_per_class * args.num_classes,
            grid_per_class=args.grid_per_class,
            save_images=args.save_images,
        )

    path = kept.finish(write)
    if path:
        logger.log(f"saved {path} and its grid (one row per class)")
    logger.log("sampling complete")


if __name__ == "__main__":
    run_main(main)
