"""
Train a noisy-image classifier for classifier guidance: it learns p(y | x_t, t) on images noised
by the diffusion's forward process (or on clean images with --noised False).

    mpiexec -n N python scripts/classifier_train.py --data_dir DIR $CLASSIFIER_FLAGS $TRAIN_FLAGS

Runs on CPU too, with gradients averaged over ranks (the reference required CUDA).
"""

import argparse
import contextlib
import os

import torch
import torch.nn.functional as F

from guided_diffusion.runtime import checkpoints, train_state
from guided_diffusion import dist_util, logger
from guided_diffusion.fp16_util import MixedPrecisionTrainer, make_adamw
from guided_diffusion.image_datasets import load_data
from guided_diffusion.runtime.preemption import PreemptionWatch
from guided_diffusion.runtime.progress import StepMeter
from guided_diffusion.resample import create_named_schedule_sampler
from guided_diffusion.runtime.perf import compile_model, set_tf32, to_channels_last
from guided_diffusion.cli.weights import load_model_weights
from guided_diffusion.cli.main import run_main
from guided_diffusion.runtime.seeding import seed_training
from guided_diffusion.script_util import (
    add_dict_to_argparser,
    args_to_dict,
    classifier_and_diffusion_defaults,
    create_classifier_and_diffusion,
)
from guided_diffusion.image_datasets import check_dataset_classes
from guided_diffusion.train_util import (
    log_loss_dict,
    parse_resume_step_from_filename,
    resolve_resume_checkpoint,
)
from guided_diffusion.cli.flags import training_extra_defaults


def main(argv=None):
    args = create_argparser().parse_args(argv)

    dist_util.setup_dist()
    logger.configure(dir=args.log_dir or None)
    seed_training(args.seed)
    set_tf32(args.tf32)

    logger.log("creating model and diffusion...")
    flags = args_to_dict(args, classifier_and_diffusion_defaults().keys())
    flags["num_classes"] = args.num_classes
    flags["classifier_channel_mult"] = args.classifier_channel_mult
    model, diffusion = create_classifier_and_diffusion(**flags)
    model.to(dist_util.dev())
    to_channels_last(model, args.channels_last)
    compile_model(model, args.compile)
    schedule_sampler = None
    if args.noised:
        schedule_sampler = create_named_schedule_sampler(args.schedule_sampler, diffusion)

    resume_checkpoint = resolve_resume_checkpoint(args.resume_checkpoint)
    resume_step = 0
    saved_state = None  # RNG streams and data positions of the checkpoint
    if resume_checkpoint:
        resume_step = parse_resume_step_from_filename(resume_checkpoint)
        logger.log(f"loading model from checkpoint: {resume_checkpoint}... at {resume_step} step")
        state = dist_util.load_state_dict(resume_checkpoint, map_location=dist_util.dev())
        load_model_weights(
            model, state, resume_checkpoint, flags, build=lambda f: create_classifier_and_diffusion(**f)[0]
        )

    # The weights must be equal everywhere before training; DDP then keeps them equal.
    dist_util.sync_params(model.parameters())

    mp_trainer = MixedPrecisionTrainer(
        model=model, use_fp16=args.classifier_use_fp16, initial_lg_loss_scale=16.0
    )
    ddp_model = dist_util.wrap_ddp(model)

    logger.log("creating data loader...")
    check_dataset_classes(args.data_dir, args.num_classes)
    data = load_data(
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        image_size=args.image_size,
        class_cond=True,
        random_crop=True,
    )
    val_data = None
    if args.val_data_dir:
        check_dataset_classes(args.val_data_dir, args.num_classes)
        val_data = load_data(
            data_dir=args.val_data_dir,
            batch_size=args.batch_size,
            image_size=args.image_size,
            class_cond=True,
        )

    logger.log("creating optimizer...")
    opt = make_adamw(mp_trainer.master_params, lr=args.lr, weight_decay=args.weight_decay)
    if resume_checkpoint:
        opt_checkpoint = os.path.join(os.path.dirname(resume_checkpoint), f"opt{resume_step:06}.pt")
        if os.path.exists(opt_checkpoint):
            logger.log(f"loading optimizer state from checkpoint: {opt_checkpoint}")
            opt.load_state_dict(dist_util.load_state_dict(opt_checkpoint, map_location=dist_util.dev()))
        else:
            logger.warn(f"no {opt_checkpoint}: the optimizer state restarts from zero")
        saved_state = train_state.load_beside(resume_checkpoint, resume_step)
    streams = {"train": data, "val": val_data}

    def forward_backward_log(data_loader, prefix="train"):
        batch, extra = next(data_loader)
        labels = extra["y"].to(dist_util.dev())
        batch = batch.to(dist_util.dev())
        # Noisy images (Dhariwal & Nichol 2021, section 4.1): x_t ~ q(x_t | x_0) at random t.
        if args.noised:
            t, _ = schedule_sampler.sample(batch.shape[0], dist_util.dev())
            batch = diffusion.q_sample(batch, t)
        else:
            t = torch.zeros(batch.shape[0], dtype=torch.long, device=dist_util.dev())

        for i, (sub_batch, sub_labels, sub_t) in enumerate(
            split_microbatches(args.microbatch, batch, labels, t)
        ):
            logits = ddp_model(sub_batch, timesteps=sub_t)
            loss = F.cross_entropy(logits, sub_labels, reduction="none")
            losses = {
                f"{prefix}_loss": loss.detach(),
                f"{prefix}_acc@1": compute_top_k(logits, sub_labels, k=1, reduction="none"),
                f"{prefix}_acc@5": compute_top_k(logits, sub_labels, k=5, reduction="none"),
            }
            log_loss_dict(diffusion, sub_t, losses)
            loss = loss.mean()
            if loss.requires_grad:
                if i == 0:
                    mp_trainer.zero_grad()
                mp_trainer.backward(loss * len(sub_batch) / len(batch))

    def done(steps_done):
        return steps_done >= args.iterations or bool(
            args.max_steps and steps_done - resume_step >= args.max_steps
        )

    last_checkpoint = resume_checkpoint or None
    last_saved = None
    steps_done = resume_step
    # deviation from reference: resuming restores RNG streams and data positions, and SIGTERM or
    # SIGUSR1 stops the run with a checkpoint (exit status 75).
    total = args.iterations
    if args.max_steps:
        total = min(total, resume_step + args.max_steps)
    meter = StepMeter(
        global_batch=args.batch_size * dist_util.get_world_size(),
        total_steps=total,
        start_step=resume_step,
    )
    with PreemptionWatch() as preemption:
        shared = train_state.restore(saved_state, streams, source=resume_checkpoint)
        if "lg_loss_scale" in shared:
            train_state.set_loss_scale(mp_trainer, shared["lg_loss_scale"])
        while not done(steps_done):
            step = steps_done - resume_step  # index within this run, as the reference's loop
            logger.logkv("step", steps_done)
            logger.logkv("samples", (steps_done + 1) * args.batch_size * dist_util.get_world_size())
            if args.anneal_lr:
                set_annealed_lr(opt, args.lr, steps_done / args.iterations)
            forward_backward_log(data)
            mp_trainer.optimize_no_sync(opt)
            if val_data is not None and not step % args.eval_interval:
                no_sync = (
                    ddp_model.no_sync() if ddp_model is not model else contextlib.nullcontext()
                )
                with torch.no_grad(), no_sync:
                    model.eval()
                    forward_backward_log(val_data, prefix="val")
                    model.train()
            if not step % args.log_interval:
                meter.report(steps_done + 1, loss_key="train_loss")
                logger.dumpkvs()
            steps_done += 1
            # deviation from reference: checkpoints are named by the number of steps taken (the
            # reference names them by the index of the last step, so a resume repeated one step).
            if not steps_done % args.save_interval:
                last_checkpoint = save_model(mp_trainer, opt, steps_done, streams, last_checkpoint)
                last_saved = steps_done
            if not done(steps_done) and preemption.requested():
                if last_saved != steps_done:
                    last_checkpoint = save_model(
                        mp_trainer, opt, steps_done, streams, last_checkpoint
                    )
                preemption.stop(steps_done, last_checkpoint)
        if steps_done > resume_step and steps_done != last_saved:
            save_model(mp_trainer, opt, steps_done, streams, last_checkpoint)


def set_annealed_lr(opt, base_lr, frac_done):
    lr = base_lr * (1 - frac_done)
    for param_group in opt.param_groups:
        param_group["lr"] = lr


def save_model(mp_trainer, opt, step, streams=None, previous=None):
    """
    Write optNNNNNN.pt, stateNNNNNN.pt (every rank's RNG streams and data positions) and
    modelNNNNNN.pt atomically on rank 0, the model file last, then wait for all ranks.

    :return: the path of the model file.
    """
    folder = logger.get_dir()
    model_path = os.path.join(folder, f"model{step:06d}.pt")
    state = train_state.gather(step, streams, {"lg_loss_scale": train_state.loss_scale(mp_trainer)})
    if dist_util.is_main_process():
        logger.log("saving model...")
        checkpoints.save_checkpoint_files(
            [
                (opt.state_dict, os.path.join(folder, f"opt{step:06d}.pt")),
                (state, train_state.state_path(folder, step)),
                (lambda: mp_trainer.master_params_to_state_dict(mp_trainer.master_params),
                 model_path),
            ],
            previous=previous,
        )
    dist_util.barrier()
    return model_path


def compute_top_k(logits, labels, k, reduction="mean"):
    """Top-k accuracy; k is capped at the number of classes."""
    _, top_ks = torch.topk(logits, min(k, logits.shape[-1]), dim=-1)
    hits = (top_ks == labels[:, None]).float().sum(dim=-1)
    if reduction == "mean":
        return hits.mean().item()
    return hits


def split_microbatches(microbatch, *args):
    bs = len(args[0])
    if microbatch == -1 or microbatch >= bs:
        yield tuple(args)
    else:
        for i in range(0, bs, microbatch):
            yield tuple(x[i : i + microbatch] if x is not None else None for x in args)


def create_argparser():
    defaults = dict(
        data_dir="",
        val_data_dir="",
        noised=True,
        iterations=150000,
        lr=3e-4,
        weight_decay=0.0,
        anneal_lr=False,
        batch_size=4,
        microbatch=-1,
        schedule_sampler="uniform",
        resume_checkpoint="",
        log_interval=10,
        eval_interval=5,
        save_interval=10000,
    )
    defaults.update(classifier_and_diffusion_defaults())
    extras = training_extra_defaults()
    extras.pop("use_bf16")
    defaults.update(extras)
    defaults.update(classifier_channel_mult="")
    parser = argparse.ArgumentParser(description="Train a noisy-image classifier.")
    add_dict_to_argparser(parser, defaults)
    return parser


if __name__ == "__main__":
    run_main(main)
