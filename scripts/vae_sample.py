"""
Images from a trained VAE: prior samples, reconstructions of real images, and a latent-space
interpolation between two encoded images.

    python scripts/vae_sample.py --model_path logs/vae003000.pt --data_dir data/digits \
        --out_dir runs/vae/samples

Writes samples_NxHxWx3.npz (+ .png grid); with --data_dir also reconstructions.npz/.png and
interpolation.npz/.png, to --out_dir (default: the log folder, --log_dir or $OPENAI_LOGDIR; with
--out_dir alone the log goes there too). The architecture flags come from the checkpoint, which
records them; passing other values is refused.
"""

if __name__ == "__main__":
    # First, before the slow imports: a stop signal (SIGTERM, SIGUSR1, SIGINT) is recorded from
    # here on instead of killing the process; the run then stops after its current batch with
    # that batch kept (guided_diffusion/runtime/kept_rounds.py).
    from guided_diffusion.runtime.signals import catch_preemption_signals

    catch_preemption_signals()

import os

import torch

from guided_diffusion import dist_util, logger
from guided_diffusion.cli.flags import explicit_flags, output_defaults, script_description
from guided_diffusion.cli.main import run_main
from guided_diffusion.sampling.files import finished_samples
from guided_diffusion.sampling.loop import check_sampling_flags, finished_files, keep_sample_rounds
from guided_diffusion.script_util import script_parser
from guided_diffusion.vae import (
    sample_from_prior,
    save_interpolation,
    save_reconstructions,
    vae_from_checkpoint,
    vae_tool_defaults,
)


def create_argparser():
    return script_parser(
        script_description(__doc__),
        vae_tool_defaults(
            num_samples=64,
            batch_size=64,
            num_recon=16,
            interp_steps=10,
            save_images=False,
            seed=0,
            **output_defaults(),
        ),
    )


def main(argv=None):
    parser = create_argparser()
    args = parser.parse_args(argv)
    check_sampling_flags(args)  # before any work: bad counts, an unwritable --out_dir
    # The checkpoint and the data folder are checked before any folder is made.
    model = vae_from_checkpoint(args.model_path, args, explicit_flags(parser, argv))
    if args.data_dir and not os.path.isdir(args.data_dir):
        raise FileNotFoundError(f"--data_dir {args.data_dir} is not a folder")
    dist_util.setup_dist()
    # The output folder is checked now: a finished result, another command's kept batches.
    shape = (args.num_samples, model.image_size, model.image_size, 3)
    others = finished_files(*EXTRA_OUTPUTS) if args.data_dir else (lambda folder: None)
    kept = keep_sample_rounds(
        args, __file__, model.image_size,
        finished=lambda folder: finished_samples(folder, shape) or others(folder))
    logger.configure(dir=args.log_dir or args.out_dir or None)
    out_dir = args.out_dir or logger.get_dir()
    model.to(dist_util.dev()).eval()
    kept.open(out_dir)

    def also_write():
        logger.log(f"wrote {save_reconstructions(model, args.data_dir, args.num_recon, out_dir)}")
        logger.log(f"wrote {save_interpolation(model, args.data_dir, args.interp_steps, out_dir)}")

    torch.manual_seed(args.seed + dist_util.get_rank())
    path = sample_from_prior(
        model, num_samples=args.num_samples, batch_size=args.batch_size, out_dir=out_dir,
        save_images=args.save_images, kept=kept, also_write=also_write if args.data_dir else None,
    )
    if path:
        logger.log(f"wrote {path}")


# Written with --data_dir, after the samples.
EXTRA_OUTPUTS = ("reconstructions.npz", "reconstructions.png", "interpolation.npz",
                 "interpolation.png")


if __name__ == "__main__":
    run_main(main)
