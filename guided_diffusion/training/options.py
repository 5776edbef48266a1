"""
The optimisation every training task shares, written once: the run's options (TrainOptions: its
length, intervals, checkpoints, learning rate and schedule), the optimizer factory
(make_optimizer) and the learning-rate schedule (LRSchedule). The engine (training.engine.Trainer)
sets the rate of every step from the schedule, so the diffusion model, the super-resolution
model, the classifier, the cGAN and the VAE follow the same --lr, --lr_warmup_steps and
--lr_schedule.

The schedule, for the step k about to be taken (k = steps taken before it, resumed ones
included), warm-up W = --lr_warmup_steps and horizon H (--lr_anneal_steps for the diffusion
model, --iterations for the others, also where the run ends):

    k < W:     lr * k / W                                   (linear warm-up from 0)
    then, with d = k - W the steps since the warm-up and L = H - W:
    constant:  lr
    linear:    lr * (1 - d / L)                             (0 at the horizon)
    cosine:    lr * 0.5 * (1 + cos(pi * d / L))             (Loshchilov & Hutter 2017, eq. 5,
                                                             one cycle, down to 0)

The reference's decays are the linear case with W = 0: --lr_anneal_steps N > 0 (diffusion) and
--anneal_lr True (classifier) turn the default `constant` into `linear`. The reference's
diffusion loop sets the rate after each step from that step's index, so its step k trains with
the rate of d = k - 1 (the first two steps both with --lr); that task keeps this one-step lag
(LRSchedule.lag) of the decay, bit for bit.
"""

import dataclasses
import inspect
import math
from typing import Optional

import torch

from ..fp16_util import make_adamw

__all__ = ["KEEP_ALL", "LR_SCHEDULES", "LRSchedule", "TrainOptions", "make_optimizer"]

# --keep_checkpoints: keep every checkpoint set (the reference's behaviour).
KEEP_ALL = -1
# --lr_schedule's choices.
LR_SCHEDULES = ("constant", "linear", "cosine")
# Options set from other flags, never flags of their own.
_NOT_FLAGS = ("anneal_lr", "iterations_flag")


@dataclasses.dataclass(frozen=True)
class LRSchedule:
    """
    The learning rate of each step (see the module docstring for the formulas).

    :param lr: the peak rate (--lr).
    :param schedule: one of LR_SCHEDULES.
    :param warmup_steps: steps of the linear warm-up from 0 (0: none).
    :param horizon: the step at which linear and cosine reach 0 (0: none; constant only).
    :param lag: the decay uses the position of `lag` steps earlier (the reference's diffusion
        loop: 1), clamped at the end of the warm-up.
    """

    lr: float
    schedule: str = "constant"
    warmup_steps: int = 0
    horizon: int = 0
    lag: int = 0

    def rate(self, step):
        """The rate of the step `step` (0 = the first step ever)."""
        if step < self.warmup_steps:
            return self.lr * step / self.warmup_steps
        if self.schedule == "constant":
            return self.lr
        length = self.horizon - self.warmup_steps
        # A resumed run given a shorter horizon than its step stays at 0.
        done = min(max(step - self.warmup_steps - self.lag, 0), length)
        if self.schedule == "linear":
            # The reference's expression, lr * (1 - frac_done), so its rates repeat bit for bit.
            return self.lr * (1 - done / length)
        return self.lr * 0.5 * (1 + math.cos(math.pi * done / length))


@dataclasses.dataclass(frozen=True)
class TrainOptions:
    """
    The settings of a run that every task takes: what the engine needs to run it, and the
    optimizer's rate and schedule. Build them with from_flags (scripts) or build (keywords);
    nonsense combinations are refused in one line when they are made, before any work.

    :param batch_size: examples per rank per step (None: the first batch's size).
    :param lr: the learning rate (the schedule's peak).
    :param weight_decay: the optimizer's weight decay.
    :param lr_schedule: constant, linear or cosine (see LRSchedule).
    :param lr_warmup_steps: steps of linear warm-up from 0.
    :param anneal_lr: the reference's decay to 0 at `iterations` is asked for (classifier
        --anneal_lr, diffusion --lr_anneal_steps > 0): a constant schedule becomes linear.
    :param iterations: the run ends when this many steps are taken, resumed ones included (0: no
        end); also the schedule's horizon.
    :param iterations_flag: the flag that sets `iterations`, named by errors and the notes.
    :param max_steps: the run also ends after this many steps of this process (0: no limit).
    :param log_interval: dump the logged values every this many steps.
    :param save_interval: write a checkpoint every this many steps (and at the end).
    :param resume_checkpoint: "", "auto" or a checkpoint path.
    :param keep_checkpoints: keep the newest K checkpoint sets (KEEP_ALL: every one).
    :param init_checkpoint: start a fresh run from this checkpoint's weights.
    :param grad_clip: > 0 clips the global gradient norm to it before each step.
    """

    batch_size: Optional[int] = None
    lr: float = 1e-4
    weight_decay: float = 0.0
    lr_schedule: str = "constant"
    lr_warmup_steps: int = 0
    anneal_lr: bool = False
    iterations: int = 0
    iterations_flag: str = "--iterations"
    max_steps: int = 0
    log_interval: int = 10
    save_interval: int = 10000
    resume_checkpoint: str = ""
    keep_checkpoints: int = KEEP_ALL
    init_checkpoint: str = ""
    grad_clip: float = 0.0

    def __post_init__(self):
        self.lr_schedule_for()  # refuses what cannot be scheduled

    @classmethod
    def names(cls):
        return [field.name for field in dataclasses.fields(cls)]

    @classmethod
    def build(cls, defaults=None, options=None, **keywords):
        """
        The options of a task's constructor: `options` as given, or the task's `defaults`
        updated with the keywords.

        :raises TypeError: for both at once, or a keyword that is no option.
        """
        if options is not None:
            if keywords:
                raise TypeError(f"pass either options or {', '.join(sorted(keywords))}, not both")
            return options
        unknown = sorted(set(keywords) - set(cls.names()))
        if unknown:
            raise TypeError(f"unexpected keyword(s): {', '.join(unknown)}")
        return cls(**{**(defaults or {}), **keywords})

    @classmethod
    def from_flags(cls, args, **overrides):
        """
        The options from a training script's parsed flags (those it has; --lr_anneal_steps is
        the diffusion scripts' --iterations, with its reference decay).
        """
        values = {name: getattr(args, name) for name in cls.names() if hasattr(args, name)}
        if hasattr(args, "lr_anneal_steps"):
            values.update(iterations=args.lr_anneal_steps, iterations_flag="--lr_anneal_steps",
                          anneal_lr=args.lr_anneal_steps > 0)
        return cls(**{**values, **overrides})

    @classmethod
    def task_flag_defaults(cls, task, leading, skip=()):
        """
        The flag defaults of a task's own script (cgan_train.py, vae_train.py), written once in
        the task: `leading`, then its constructor's keywords with their defaults (but those in
        `skip`), then every option but task.options_without, at task.option_defaults.
        """
        defaults = dict(leading)
        for name, param in inspect.signature(task.__init__).parameters.items():
            if param.default is not inspect.Parameter.empty and name not in ("options", *skip):
                defaults[name] = param.default
        left_out = (*_NOT_FLAGS, *task.options_without, *defaults)
        values = dataclasses.asdict(cls(**task.option_defaults))
        return {**defaults, **{k: v for k, v in values.items() if k not in left_out}}

    def lr_schedule_for(self, lag=0):
        """
        The LRSchedule of these options.

        :param lag: see LRSchedule (the diffusion task: 1).
        :raises ValueError: naming the flags of a schedule that cannot work.
        """
        kind = self.lr_schedule
        if kind not in LR_SCHEDULES:
            raise ValueError(f"--lr_schedule {kind!r} is unknown: use one of "
                             f"{', '.join(LR_SCHEDULES)}")
        warmup, horizon, flag = self.lr_warmup_steps, self.iterations, self.iterations_flag
        if warmup < 0:
            raise ValueError(f"--lr_warmup_steps must be >= 0 (0 = no warm-up), got {warmup}")
        if self.anneal_lr and kind == "constant":
            kind = "linear"
        if kind != "constant" and horizon <= 0:
            raise ValueError(f"--lr_schedule {kind} decays the rate to 0 at {flag}, which is "
                             f"{horizon}: pass {flag} N (the run ends there)")
        if horizon > 0 and (warmup >= horizon if kind != "constant" else warmup > horizon):
            raise ValueError(f"--lr_warmup_steps {warmup} leaves no step of the {kind} schedule "
                             f"before {flag} {horizon}: pass fewer warm-up steps")
        return LRSchedule(lr=self.lr, schedule=kind, warmup_steps=warmup, horizon=horizon,
                          lag=lag)

    def settings(self):
        """The flags a resumed run may change, with these values (saved with checkpoints)."""
        return {"--lr": self.lr, "--weight_decay": self.weight_decay,
                "--lr_schedule": self.lr_schedule, "--lr_warmup_steps": self.lr_warmup_steps}


def make_optimizer(params, options, optimizer=None, **settings):
    """
    The optimizer of a task, at the options' rate and weight decay (the engine then sets the
    rate of every step).

    :param params: the parameters (or parameter groups) to train.
    :param optimizer: a torch.optim class taking lr (and weight_decay, when the options have
        one); None: AdamW, fused where torch can (fp16_util.make_adamw), as the reference's
        diffusion model and classifier.
    :param settings: further keywords of the optimizer (betas, momentum ...).
    """
    if optimizer is None:
        return make_adamw(params, lr=options.lr, weight_decay=options.weight_decay)
    if options.weight_decay:
        settings.setdefault("weight_decay", options.weight_decay)
    return optimizer(params, lr=options.lr, **settings)
