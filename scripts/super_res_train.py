"""
Train a super-resolution diffusion model: it learns large_size images conditioned on their
small_size versions (area-downsampled from the same images).

    mpiexec -n N python scripts/super_res_train.py --data_dir DIR --large_size 256 --small_size 64 ...
"""

import argparse
import functools

import torch.nn.functional as F

from guided_diffusion import dist_util, logger
from guided_diffusion.cli.flags import cfg_defaults
from guided_diffusion.image_datasets import with_label_dropout
from guided_diffusion.image_datasets import load_data
from guided_diffusion.resample import create_named_schedule_sampler
from guided_diffusion.runtime.perf import compile_model, set_tf32, to_channels_last
from guided_diffusion.runtime.resumable_data import MappedBatches
from guided_diffusion.cli.main import run_main
from guided_diffusion.runtime.seeding import seed_training
from guided_diffusion.script_util import (
    add_dict_to_argparser,
    args_to_dict,
    sr_create_model_and_diffusion,
    sr_model_and_diffusion_defaults,
)
from guided_diffusion.train_util import TrainLoop
from guided_diffusion.image_datasets import check_dataset_classes
from guided_diffusion.cli.flags import training_extra_defaults


def main(argv=None):
    args = create_argparser().parse_args(argv)

    dist_util.setup_dist()
    logger.configure(dir=args.log_dir or None)
    seed_training(args.seed)
    set_tf32(args.tf32)

    logger.log("creating model...")
    flags = args_to_dict(args, sr_model_and_diffusion_defaults().keys())
    flags.update(
        num_classes=args.num_classes,
        channel_mult=args.channel_mult,
        class_dropout_prob=args.class_dropout_prob,
    )
    model, diffusion = sr_create_model_and_diffusion(**flags)
    model.to(dist_util.dev())
    to_channels_last(model, args.channels_last)
    compile_model(model, args.compile)
    schedule_sampler = create_named_schedule_sampler(args.schedule_sampler, diffusion)

    logger.log("creating data loader...")
    if args.class_cond:
        check_dataset_classes(args.data_dir, args.num_classes)
    data = load_superres_data(
        args.data_dir,
        args.batch_size,
        large_size=args.large_size,
        small_size=args.small_size,
        class_cond=args.class_cond,
    )
    # Classifier-free guidance: labels become the null class (index num_classes) at this rate.
    data = with_label_dropout(data, prob=args.class_dropout_prob, null_label=args.num_classes)

    logger.log("training...")
    TrainLoop(
        model=model,
        diffusion=diffusion,
        data=data,
        batch_size=args.batch_size,
        microbatch=args.microbatch,
        lr=args.lr,
        ema_rate=args.ema_rate,
        log_interval=args.log_interval,
        save_interval=args.save_interval,
        resume_checkpoint=args.resume_checkpoint,
        use_fp16=args.use_fp16,
        fp16_scale_growth=args.fp16_scale_growth,
        schedule_sampler=schedule_sampler,
        weight_decay=args.weight_decay,
        lr_anneal_steps=args.lr_anneal_steps,
        max_steps=args.max_steps,
        use_bf16=args.use_bf16,
    ).run_loop()


def load_superres_data(data_dir, batch_size, large_size, small_size, class_cond=False):
    """Batches of large images with their area-downsampled versions as model_kwargs["low_res"]."""
    if small_size > large_size:
        raise ValueError(f"--small_size {small_size} is larger than --large_size {large_size}")
    data = load_data(
        data_dir=data_dir,
        batch_size=batch_size,
        image_size=large_size,
        class_cond=class_cond,
    )
    # A mapped stream rather than a generator, so that its position saves with the checkpoint.
    return MappedBatches(data, functools.partial(_with_low_res, small_size=small_size))


def _with_low_res(large_batch, model_kwargs, small_size):
    model_kwargs["low_res"] = F.interpolate(large_batch, small_size, mode="area")
    return large_batch, model_kwargs


def create_argparser():
    defaults = dict(
        data_dir="",
        schedule_sampler="uniform",
        lr=1e-4,
        weight_decay=0.0,
        lr_anneal_steps=0,
        batch_size=1,
        microbatch=-1,
        ema_rate="0.9999",
        log_interval=10,
        save_interval=10000,
        resume_checkpoint="",
        use_fp16=False,
        fp16_scale_growth=1e-3,
    )
    defaults.update(sr_model_and_diffusion_defaults())
    defaults.update(training_extra_defaults())
    defaults.update(cfg_defaults())
    defaults.update(channel_mult="")  # "" = by large_size; needed for sizes like 16
    parser = argparse.ArgumentParser(description="Train a super-resolution diffusion model.")
    add_dict_to_argparser(parser, defaults)
    return parser


if __name__ == "__main__":
    run_main(main)
