"""
Train a diffusion model on a folder of images.

    mpiexec -n N python scripts/image_train.py --data_dir DIR $MODEL_FLAGS $DIFFUSION_FLAGS $TRAIN_FLAGS

Also runs under torchrun or as one plain process. Checkpoints (modelNNNNNN.pt, ema_<rate>_NNNNNN.pt,
optNNNNNN.pt) and progress.csv go to --log_dir (default $OPENAI_LOGDIR).
"""

import argparse

from guided_diffusion import dist_util, logger
from guided_diffusion.cli.flags import cfg_defaults
from guided_diffusion.image_datasets import with_label_dropout
from guided_diffusion.image_datasets import load_data
from guided_diffusion.resample import create_named_schedule_sampler
from guided_diffusion.runtime.perf import compile_model, set_tf32, to_channels_last
from guided_diffusion.cli.main import run_main
from guided_diffusion.runtime.seeding import seed_training
from guided_diffusion.script_util import (
    add_dict_to_argparser,
    args_to_dict,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
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

    logger.log("creating model and diffusion...")
    model, diffusion = create_model_and_diffusion(
        **args_to_dict(args, model_and_diffusion_defaults().keys()),
        num_classes=args.num_classes,
        class_dropout_prob=args.class_dropout_prob,
    )
    model.to(dist_util.dev())
    to_channels_last(model, args.channels_last)
    compile_model(model, args.compile)
    schedule_sampler = create_named_schedule_sampler(args.schedule_sampler, diffusion)

    logger.log("creating data loader...")
    if args.class_cond:
        check_dataset_classes(args.data_dir, args.num_classes)
    data = load_data(
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        image_size=args.image_size,
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


def create_argparser():
    defaults = dict(
        data_dir="",
        schedule_sampler="uniform",
        lr=1e-4,
        weight_decay=0.0,
        lr_anneal_steps=0,
        batch_size=1,
        microbatch=-1,  # -1 disables microbatches
        ema_rate="0.9999",  # comma-separated list of EMA values
        log_interval=10,
        save_interval=10000,
        resume_checkpoint="",  # a modelNNNNNN.pt file, or "auto"
        use_fp16=False,
        fp16_scale_growth=1e-3,
    )
    defaults.update(model_and_diffusion_defaults())
    defaults.update(training_extra_defaults())
    defaults.update(cfg_defaults())
    parser = argparse.ArgumentParser(description="Train a diffusion model on a folder of images.")
    add_dict_to_argparser(parser, defaults)
    return parser


if __name__ == "__main__":
    run_main(main)
