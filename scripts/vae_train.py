"""
Train a VAE (Kingma & Welling 2013) on a folder of images.

    python scripts/vae_train.py --data_dir data/digits --image_size 28 --iterations 3000 \
        --log_dir runs/vae

Works as one process, under ``mpiexec -n N`` or under ``torchrun``. Checkpoints vaeNNNNNN.pt and
progress.csv go to --log_dir (default $OPENAI_LOGDIR); losses are logged in nats per image.
"""

if __name__ == "__main__":
    # First, before the slow imports: a preemption signal (SIGTERM, SIGUSR1) is recorded from
    # here on instead of killing the process, so one that arrives while the run starts up ends
    # it with exit status 75 before the first step (guided_diffusion/runtime/signals.py).
    from guided_diffusion.runtime.signals import catch_preemption_signals

    catch_preemption_signals()

import torch

from guided_diffusion import dist_util, logger
from guided_diffusion.cli.flags import script_description
from guided_diffusion.cli.main import run_main
from guided_diffusion.image_datasets import load_data
from guided_diffusion.script_util import args_to_dict, script_parser
from guided_diffusion.training.engine import start_run
from guided_diffusion.vae import (
    ARCH_FLAGS,
    VAETrainLoop,
    create_vae,
    vae_defaults,
    vae_train_defaults,
)

# Flags handled here rather than by VAETrainLoop.
_SCRIPT_FLAGS = ("data_dir", "random_flip", "seed", "log_dir", "log_format")


def create_argparser():
    return script_parser(script_description(__doc__), vae_train_defaults(), vae_defaults())


def main(argv=None):
    args = create_argparser().parse_args(argv)
    start_run(log_dir=args.log_dir, seed=args.seed, args=args, script=__file__, argv=argv)
    flags = args_to_dict(args, ARCH_FLAGS)
    # Same initial weights on every rank; then per-rank noise and data order.
    torch.manual_seed(args.seed)
    model = create_vae(**flags)
    logger.log(f"VAE {flags}: {sum(p.numel() for p in model.parameters())} parameters")
    data = load_data(
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        image_size=args.image_size,
        class_cond=args.class_cond,
        random_flip=args.random_flip,
    )
    loop = VAETrainLoop(
        model=model,
        data=data,
        flags=flags,
        **args_to_dict(args, [k for k in vae_train_defaults() if k not in _SCRIPT_FLAGS]),
    )
    torch.manual_seed(args.seed + dist_util.get_rank())
    loop.run_loop()
    logger.log("training complete")


if __name__ == "__main__":
    run_main(main)
