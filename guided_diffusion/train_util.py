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

import functools
import os

import torch

from . import dist_util, logger
from .errors import NonFiniteLossError  # noqa: F401  (public here, where it lived)
from .resample import LossAwareSampler, UniformSampler
from .runtime import checkpoints
from .training.engine import Trainer, checkpoint_step, resolve_resume_checkpoint  # noqa: F401
from .training.mixed_precision import MIN_LG_LOSS_SCALE, MixedPrecisionTask, parse_ema_rates  # noqa: F401

# The TrainLoop keywords that come straight from the training scripts' flags of the same names.
TRAIN_LOOP_FLAGS = (
    "batch_size", "microbatch", "lr", "ema_rate", "log_interval", "save_interval",
    "resume_checkpoint", "use_fp16", "fp16_scale_growth", "weight_decay", "lr_anneal_steps",
    "max_steps", "use_bf16",
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
        there (0: constant learning rate, run until interrupted).
    :param max_steps: stop after this many steps of this run (0: no limit); an addition to the
        reference, handy for tests, benchmarks and short jobs.
    :param use_bf16: train with the torso in bfloat16 and float32 master weights (as use_fp16,
        without loss scaling; an addition to the reference, exclusive with use_fp16).
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
    ):
        self.diffusion = diffusion
        self.data = data
        self.batch_size = batch_size
        self.microbatch = microbatch if microbatch > 0 else batch_size
        self.schedule_sampler = schedule_sampler or UniformSampler(diffusion)
        if isinstance(self.schedule_sampler, LossAwareSampler):
            self.schedule_sampler.set_all_gather(dist_util.all_gather_tensors)
        self.global_batch = batch_size * dist_util.get_world_size()
        self.setup(
            model=model,
            lr=lr,
            weight_decay=weight_decay,
            ema_rate=ema_rate,
            use_fp16=use_fp16,
            use_bf16=use_bf16,
            fp16_scale_growth=fp16_scale_growth,
        )
        self.trainer = Trainer(
            self,
            data=data,
            global_batch=self.global_batch,
            log_interval=log_interval,
            save_interval=save_interval,
            resume_checkpoint=resume_checkpoint,
            total_steps=lr_anneal_steps,
            max_steps=max_steps,
            limit_flags=("--lr_anneal_steps", "--max_steps"),
        )
        self.resume_checkpoint = self.trainer.resume_checkpoint or ""

    # The run's schedule lives in the engine; these are the reference's names for it (settable,
    # as plain attributes were).
    log_interval = property(lambda self: self.trainer.log_interval,
                            lambda self, v: setattr(self.trainer, "log_interval", v))
    save_interval = property(lambda self: self.trainer.save_interval,
                             lambda self, v: setattr(self.trainer, "save_interval", v))
    lr_anneal_steps = property(lambda self: self.trainer.total_steps,
                               lambda self, v: setattr(self.trainer, "total_steps", v))
    max_steps = property(lambda self: self.trainer.max_steps,
                         lambda self, v: setattr(self.trainer, "max_steps", v))

    # The reference's step attributes: steps of this run, and the step the run resumed from.
    @property
    def step(self):
        return self.trainer.steps_this_run

    @step.setter
    def step(self, value):
        self.trainer.global_step = self.trainer.start_step + value

    @property
    def resume_step(self):
        return self.trainer.start_step

    @property
    def last_checkpoint(self):
        return self.trainer.last_checkpoint

    def run_loop(self):
        """
        Train until lr_anneal_steps (or max_steps) is reached, or forever when both are 0 (see
        training.engine.Trainer.run: exact resume, preemption, health checks).
        """
        self.trainer.run()

    def save(self):
        """Write the checkpoint set of the current step (see Trainer.save)."""
        return self.trainer.save()

    # ----------------------------------------------------------------------------- a step

    def train_step(self, batch, cond, step):
        self.forward_backward(batch, cond)
        self.optimize()
        # As the reference: the rate for the next step, from the index of the step just taken.
        self._anneal_lr(step)

    def run_step(self, batch, cond):
        """
        One optimizer step on a batch, logged, as the reference's run_step: the step counter is
        the caller's to advance (run_loop does).
        """
        self.train_step(batch, cond, self.trainer.global_step)
        self.trainer.log_step(self.trainer.global_step + 1)

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

    def _anneal_lr(self, step):
        if not self.lr_anneal_steps:
            return
        self.set_lr(self.lr * (1 - step / self.lr_anneal_steps))

    def lr_at(self, step):
        # The rate _anneal_lr set after the previous step (the first step keeps --lr), computed
        # by the same expression, so a resumed run continues the schedule bit for bit.
        if not self.lr_anneal_steps or step == 0:
            return self.lr
        return self.lr * (1 - (step - 1) / self.lr_anneal_steps)

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
    :return: the ema_<rate>_<step>.pt file next to main_checkpoint, or None when it is missing.
    """
    if not main_checkpoint:
        return None
    path = os.path.join(os.path.dirname(main_checkpoint), f"ema_{rate}_{step:06d}.pt")
    return path if os.path.exists(path) else None


def log_loss_dict(diffusion, ts, losses):
    """
    Log the mean of each loss term, and its mean per quarter of the diffusion steps as
    <key>_q0 .. <key>_q3 (q0: the least noisy quarter).

    deviation from reference: the values stay tensors on their device until the logger dumps
    them (the reference copied every loss to the host at every microbatch); a quarter no timestep
    of the batch fell into is not logged, as before.

    :param diffusion: gives num_timesteps.
    :param ts: the timesteps of the batch.
    :param losses: {name: per-example loss tensor}.
    """
    if not losses:
        return
    values = torch.stack([v.detach().float() for v in losses.values()])
    # int(4 * t / T) for integer t in [0, T), the reference's quarter index.
    quarter = torch.div(4 * ts.to(values.device), diffusion.num_timesteps, rounding_mode="floor")
    quarter = quarter.long().clamp(0, 3)
    counts = torch.zeros(4, device=values.device).index_add_(0, quarter, torch.ones_like(values[0]))
    sums = torch.zeros(len(losses), 4, device=values.device).index_add_(1, quarter, values)
    means = sums / counts.clamp(min=1)
    for i, key in enumerate(losses):
        logger.logkv_mean(key, values[i].mean())
        for q in range(4):
            logger.logkv_mean(f"{key}_q{q}", means[i, q], count=counts[q])


