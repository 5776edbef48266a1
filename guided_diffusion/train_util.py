"""
The diffusion training loop of the reference (TrainLoop: same constructor, same behaviour), as a
task of the one training engine (training.engine.Trainer): AdamW on the simplified (or hybrid)
objective, EMA copies of the weights, optional fp16 with a dynamic loss scale, microbatching,
periodic atomic checkpoints, and exact resuming (model, every EMA rate, optimizer, step, every
rank's random streams and data position) from a checkpoint or the newest one in the log folder.
SIGTERM/SIGUSR1 stop the run with a checkpoint (exit status 75).

Step numbering: checkpoint names, the logged "step" and the progress line count the optimizer
steps taken, resumed ones included; "samples" counts the images consumed over all ranks.
"""

import dataclasses
import functools
import os

import torch

from . import dist_util, logger
from .errors import NonFiniteLossError  # noqa: F401  (public here, where it lived)
from .image_datasets import (
    check_dataset_classes,
    check_validation_classes,
    list_image_files_recursively,
    with_label_dropout,
)
from .resample import LossAwareSampler, UniformSampler, create_named_schedule_sampler
from .runtime import checkpoints
from .training.engine import KEEP_ALL, Trainer, checkpoint_step, resolve_resume_checkpoint  # noqa: F401
from .networks import label_key_of
from .training.options import TrainOptions
from .training.finetune import adapt_label_embedding
from .training.loss_logging import log_loss_dict  # noqa: F401  (the reference's name lives here)
from .training.mixed_precision import (  # noqa: F401
    MIN_LG_LOSS_SCALE, MixedPrecisionTask, ema_file_beside, parse_ema_rates,
)
from .runtime.perf import compile_model, to_channels_last
from .training.fid import fid_keywords
from .training.watch import SampleGrid, Validation, watch_keywords

# The TrainLoop keywords that come straight from the training scripts' flags of the same names.
TRAIN_LOOP_FLAGS = (
    "batch_size", "microbatch", "lr", "ema_rate", "log_interval", "save_interval",
    "resume_checkpoint", "use_fp16", "fp16_scale_growth", "weight_decay", "lr_anneal_steps",
    "max_steps", "use_bf16", "lr_warmup_steps", "lr_schedule",
    # the port's run features (docs/runs.md)
    "ema_warmup_power", "ema_inv_gamma", "grad_clip", "keep_checkpoints", "init_checkpoint",
    "init_num_classes", "init_add_null_class", "sample_interval", "val_interval", "save_format",
)


class TrainLoop(MixedPrecisionTask):
    """
    Train a diffusion model on batches from `data`.

    :param model: the UNet, already on its device (dist_util.dev() in the scripts); batches are
        moved to the device of its parameters.
    :param diffusion: the diffusion whose training_losses define the objective.
    :param data: an iterator of (images, model_kwargs) batches, as load_data returns.
    :param batch_size: images per rank per step.
    :param microbatch: images per forward/backward pass (<= 0: the whole batch at once).
    :param lr: AdamW learning rate.
    :param ema_rate: an EMA decay (float) or a comma-separated string of several.
    :param log_interval: dump the logged diagnostics every this many steps.
    :param save_interval: write checkpoints every this many steps (and at the end).
    :param resume_checkpoint: "" to start fresh, a modelNNNNNN.pt path, or "auto" for the newest
        complete checkpoint in the log directory (fresh start when there is none).
    :param use_fp16: train with the float16 torso and a dynamic loss scale.
    :param fp16_scale_growth: lg_loss_scale increase per successful fp16 step.
    :param schedule_sampler: a ScheduleSampler for the timesteps (default uniform).
    :param weight_decay: AdamW weight decay.
    :param lr_anneal_steps: decay the learning rate linearly to 0 over this many steps and stop
        there (0: constant learning rate, run until interrupted); the horizon of lr_schedule.
    :param max_steps: stop after this many steps of this run (0: no limit); an addition to the
        reference, handy for tests, benchmarks and short jobs.
    :param use_bf16: train with the torso in bfloat16 and float32 master weights (as use_fp16,
        without loss scaling; an addition to the reference, exclusive with use_fp16).
    :param lr_warmup_steps: warm the rate up linearly from 0 over this many steps (0: none).
    :param lr_schedule: "constant" (with lr_anneal_steps > 0: "linear", the reference's decay),
        "linear" or "cosine" down to 0 at lr_anneal_steps (training.options.LRSchedule).

    Additions to the reference for living with a run (docs/runs.md); every default keeps the
    reference's behaviour:

    :param ema_warmup_power: > 0 warms the EMA decay up (mixed_precision.ema_decay).
    :param ema_inv_gamma: the warm-up's step scale.
    :param grad_clip: > 0 clips the global gradient norm to it (logged as grad_norm_clipped).
    :param keep_checkpoints: keep the newest K checkpoint sets (-1: all).
    :param init_checkpoint: start a fresh run from this checkpoint's weights (step 0, fresh
        optimizer, EMA from the weights).
    :param init_num_classes: with init_checkpoint, re-initialise the label embedding (the model
        was built for this many classes).
    :param init_add_null_class: with init_checkpoint, add the null-class row of classifier-free
        guidance to the checkpoint's label embedding.
    :param sample_interval: every this many steps rank 0 writes samples_stepNNNNNN.png with the
        EMA weights (0: never); needs sample_diffusion.
    :param sample_diffusion: the diffusion the grid is sampled with by DDIM (e.g. 25 steps).
    :param num_classes: the labels of the grid's class-conditional samples (image i: i % K).
    :param val_data: fixed validation batches (watch.fixed_batches) of this rank, or None.
    :param val_interval: every this many steps, log the loss terms on val_data (val_*).
    :param fid: a training.fid.FIDPlan (--fid_interval): log a proxy FID every fid.interval
        steps.
    :param save_format: "pt" (the reference's) or "safetensors": the format of the model and EMA
        files (the optimizer and state files stay .pt).
    """

    def __init__(
        self,
        *,
        model,
        diffusion,
        data,
        batch_size,
        microbatch,
        lr,
        ema_rate,
        log_interval,
        save_interval,
        resume_checkpoint,
        use_fp16=False,
        fp16_scale_growth=1e-3,
        schedule_sampler=None,
        weight_decay=0.0,
        lr_anneal_steps=0,
        max_steps=0,
        use_bf16=False,
        ema_warmup_power=0.0,
        ema_inv_gamma=1.0,
        grad_clip=0.0,
        keep_checkpoints=KEEP_ALL,
        init_checkpoint="",
        init_num_classes=0,
        init_add_null_class=False,
        sample_interval=0,
        sample_diffusion=None,
        num_classes=None,
        val_data=None,
        val_interval=1000,
        fid=None,
        lr_warmup_steps=0,
        lr_schedule="constant",
        save_format="pt",
    ):
        options = TrainOptions(
            batch_size=batch_size, lr=lr, weight_decay=weight_decay, lr_schedule=lr_schedule,
            lr_warmup_steps=lr_warmup_steps, anneal_lr=lr_anneal_steps > 0,
            iterations=lr_anneal_steps, iterations_flag="--lr_anneal_steps", max_steps=max_steps,
            log_interval=log_interval, save_interval=save_interval,
            resume_checkpoint=resume_checkpoint, keep_checkpoints=keep_checkpoints,
            init_checkpoint=init_checkpoint, grad_clip=grad_clip,
        )
        if sample_interval and sample_diffusion is None:
            raise ValueError("sample_interval needs a sample_diffusion (the DDIM-respaced one)")
        self.diffusion = diffusion
        self.data = data
        self.batch_size = batch_size
        self.microbatch = microbatch if microbatch > 0 else batch_size
        self.schedule_sampler = schedule_sampler or UniformSampler(diffusion)
        if isinstance(self.schedule_sampler, LossAwareSampler):
            self.schedule_sampler.set_all_gather(dist_util.all_gather_tensors)
        self.setup(
            model=model,
            options=options,
            ema_rate=ema_rate,
            use_fp16=use_fp16,
            use_bf16=use_bf16,
            fp16_scale_growth=fp16_scale_growth,
            ema_warmup_power=ema_warmup_power,
            ema_inv_gamma=ema_inv_gamma,
            save_format=save_format,
        )
        self.init_num_classes = init_num_classes
        self.init_add_null_class = init_add_null_class
        self.trainer = Trainer(self, data=data, options=options)
        self.resume_checkpoint = self.trainer.resume_checkpoint or ""
        self.global_batch = self.trainer.global_batch  # the reference's attribute
        self.sample_grid = None
        if sample_interval:
            self.sample_grid = SampleGrid(self, sample_diffusion, num_classes, self.trainer.log_dir)
            self.trainer.add_periodic(sample_interval, self.sample_grid)
        if val_data is not None:
            self.trainer.add_periodic(val_interval, Validation(self, val_data))
        # The proxy FID (--fid_interval, training/fid.py): its one hook into the engine.
        self.proxy_fid = None
        if fid is not None:
            self.proxy_fid = fid.bind(self)
            self.trainer.add_periodic(fid.interval, self.proxy_fid)

    # The reference sets the rate after each step from the index of that step: the decay lags
    # one step (training.options.LRSchedule).
    lr_lag = 1

    # The run's schedule lives in the engine; these are the reference's names for it (settable,
    # as plain attributes were).
    log_interval = property(lambda self: self.trainer.log_interval,
                            lambda self, v: setattr(self.trainer, "log_interval", v))
    save_interval = property(lambda self: self.trainer.save_interval,
                             lambda self, v: setattr(self.trainer, "save_interval", v))
    @property
    def lr_anneal_steps(self):
        return self.trainer.total_steps

    @lr_anneal_steps.setter
    def lr_anneal_steps(self, value):
        # The run's end and the schedule's horizon together, as the reference's one attribute.
        trainer = self.trainer
        trainer.options = dataclasses.replace(trainer.options, iterations=value,
                                              anneal_lr=value > 0)
        trainer.lr_schedule = trainer.options.lr_schedule_for(lag=self.lr_lag)
        trainer.total_steps = value

    max_steps = property(lambda self: self.trainer.max_steps,
                         lambda self, v: setattr(self.trainer, "max_steps", v))

    # The reference's step attributes: steps of this run (TrainTask.step counts the resumed ones
    # too), and the step the run resumed from.
    @property
    def step(self):
        return self.trainer.steps_this_run

    @step.setter
    def step(self, value):
        self.trainer.global_step = self.trainer.start_step + value

    @property
    def resume_step(self):
        return self.trainer.start_step

    def run_loop(self):
        """
        Train until lr_anneal_steps (or max_steps) is reached, or forever when both are 0 (see
        training.engine.Trainer.run: exact resume, preemption, health checks).
        """
        self.trainer.run()

    # ----------------------------------------------------------------------------- a step

    def train_step(self, batch, cond, step):
        if self.sample_grid is not None:
            self.sample_grid.observe(batch, cond)
        self.forward_backward(batch, cond)
        self.optimize(step)

    def run_step(self, batch, cond):
        """
        One optimizer step on a batch, logged, as the reference's run_step: the step counter is
        the caller's to advance (run_loop does).
        """
        self.train_step(batch, cond, self.trainer.global_step)
        self.trainer.log_step(self.trainer.global_step + 1)
        self.trainer.apply_lr(self.trainer.global_step + 1)

    def forward_backward(self, batch, cond):
        """Accumulate the gradients of the batch, one microbatch at a time."""
        self.mp_trainer.zero_grad()
        device = self.device
        for i in range(0, batch.shape[0], self.microbatch):
            # non_blocking: a copy from pageable memory is still safe, and it does not stop the
            # host the way a blocking copy does.
            micro = batch[i : i + self.microbatch].to(device, non_blocking=True)
            micro_cond = {
                k: v[i : i + self.microbatch].to(device, non_blocking=True) for k, v in cond.items()
            }
            last_batch = (i + self.microbatch) >= batch.shape[0]
            t, weights = self.schedule_sampler.sample(micro.shape[0], device)

            compute_losses = functools.partial(
                self.diffusion.training_losses,
                self.ddp_model,
                micro,
                t,
                model_kwargs=micro_cond,
            )
            # deviation from reference: nothing runs under autocast (--use_bf16 converts the
            # torso instead); disabling it keeps an enclosing autocast from changing the numerics.
            with torch.autocast(device.type, enabled=False):
                if last_batch or not self.use_ddp:
                    losses = compute_losses()
                else:
                    # Gradients are averaged over ranks once, on the last microbatch.
                    with self.ddp_model.no_sync():
                        losses = compute_losses()

            if isinstance(self.schedule_sampler, LossAwareSampler):
                self.schedule_sampler.update_with_local_losses(t, losses["loss"].detach())

            loss = (losses["loss"] * weights).mean()
            log_loss_dict(self.diffusion, t, {k: v * weights for k, v in losses.items()})
            # The trainer notes whether the loss is finite; a step with a non-finite loss is
            # skipped on the device and reported by health_problem.
            self.mp_trainer.backward(loss)

    def adapt_init_state(self, state, path):
        """--init_num_classes / --init_add_null_class: re-initialise the label embedding."""
        return adapt_label_embedding(
            state, self.model.state_dict(), path=path, init_num_classes=self.init_num_classes,
            init_add_null_class=self.init_add_null_class, key=label_key_of(self.model),
        )

    def init_mismatch_advice(self, state):
        label = label_key_of(self.model)
        if self.init_num_classes or self.init_add_null_class:
            return ""
        ours = self.model.state_dict().get(label)
        theirs = state.get(label)
        if ours is None or theirs is None or ours.shape == theirs.shape:
            return ""
        return (
            f"; or, to fine-tune it on your {ours.shape[0]} labels, re-initialise its label "
            "embedding with --init_num_classes K (--init_add_null_class True adds only the "
            "null class of classifier-free guidance)"
        )

    # ----------------------------------------------------------------------------- resuming

    def shared_state(self):
        shared = super().shared_state()
        sampler_state = getattr(self.schedule_sampler, "state_dict", None)
        if callable(sampler_state):
            shared["schedule_sampler"] = sampler_state()
        return shared

    def load_shared_state(self, shared):
        super().load_shared_state(shared)
        load_sampler = getattr(self.schedule_sampler, "load_state_dict", None)
        if callable(load_sampler) and shared.get("schedule_sampler") is not None:
            try:
                load_sampler(shared["schedule_sampler"])
            except ValueError as exc:
                logger.warn(f"{exc}: the {type(self.schedule_sampler).__name__} starts afresh")

    def checkpoint_step(self):
        """The number written into checkpoint names: optimizer steps taken, resume included."""
        return self.trainer.global_step


def train_from_flags(args, model, diffusion, flags, load):
    """
    The diffusion training scripts' run once the model is built (image_train.py and
    super_res_train.py): the model goes to this rank's device (channels-last and compiled as the
    flags say), the training stream comes from `load` with the classifier-free guidance label
    dropout, and a TrainLoop built from the flags (with --sample_interval grids and
    --val_data_dir losses) runs to the end.

    :param args: the parsed flags of the script.
    :param model: the network, as create_model_and_diffusion (or the super-res factory) built it.
    :param diffusion: its diffusion.
    :param flags: the model and diffusion flags both were built from (the sample grids' DDIM
        diffusion is respaced from them).
    :param load: (folder, deterministic, **load_data keywords) -> this rank's batch stream of
        the folder: shuffled and augmented as the flags say for training, in a fixed order and
        unaugmented for the validation subset (deterministic=True; with flag="--val_data_dir"
        and, for a class-conditional model, the training folder's class_names).
    """
    model.to(dist_util.dev())
    to_channels_last(model, args.channels_last)
    compile_model(model, args.compile)

    logger.log("creating data loader...")
    names = None
    if args.class_cond:
        names = check_dataset_classes(args.data_dir, args.num_classes)
    val_options = dict(flag="--val_data_dir")
    if args.val_data_dir:
        # Checked now, like --data_dir, not at the first validation mid-run.
        if names is not None:
            check_validation_classes(args.val_data_dir, names)
            val_options["class_names"] = names  # its labels numbered as the training folder's
        else:
            list_image_files_recursively(args.val_data_dir, flag="--val_data_dir")
    # Classifier-free guidance: labels become the null class (index num_classes) at this rate.
    data = with_label_dropout(load(args.data_dir, False), prob=args.class_dropout_prob,
                              null_label=args.num_classes)

    logger.log("training...")
    TrainLoop(
        model=model,
        diffusion=diffusion,
        data=data,
        schedule_sampler=create_named_schedule_sampler(args.schedule_sampler, diffusion),
        **{name: getattr(args, name) for name in TRAIN_LOOP_FLAGS},
        **watch_keywords(args, flags, lambda folder: load(folder, True, **val_options)),
        **fid_keywords(args, flags),
    ).run_loop()


def parse_resume_step_from_filename(filename):
    """
    Parse filenames of the form path/to/modelNNNNNN.pt, where NNNNNN is the checkpoint's step.

    :return: the step, or 0 when the name has no "model<digits>" part.
    """
    return checkpoint_step(filename, "model")


def get_blob_logdir():
    """The folder checkpoints are written to (the logger's directory)."""
    return logger.get_dir()


def find_resume_checkpoint():
    """
    The newest complete modelNNNNNN.pt in the log directory, or None.

    # deviation from reference: the reference returns None here (an infrastructure hook); we
    # search the log directory, skipping files cut short by a crash.
    """
    return checkpoints.find_latest_checkpoint(get_blob_logdir(), "model")


def find_ema_checkpoint(main_checkpoint, step, rate):
    """
    :return: the ema_<rate>_<step>.pt (or .safetensors) file next to main_checkpoint, or None
        when it is missing.
    """
    if not main_checkpoint:
        return None
    return ema_file_beside(main_checkpoint, step, rate)
