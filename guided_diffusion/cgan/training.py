"""
Training the conditional GAN of ``cgan.networks`` as a task of the one training engine
(training.engine.Trainer: exact resume, preemption, progress, atomic checkpoints).

A checkpoint ``cgan%06d.pt`` is one file holding both networks, the generator's EMA, both
optimisers, the step, the flags that shape the networks and the training state (every rank's
random streams and data position), so a run resumes exactly and a checkpoint can never be paired
with the wrong optimiser file.
"""

import copy
import dataclasses
import os

import torch

from .. import dist_util, logger
from ..fp16_util import checked_grad_clip, clip_to_global_norm
from ..nn import update_ema
from ..runtime.checkpoints import load_checkpoint
from ..runtime import train_state
from ..training.ema import check_ema_warmup, ema_decay
from ..training.engine import NonFiniteSteps, TrainTask, Trainer
from ..training.options import TrainOptions, make_optimizer
from .networks import (
    MODEL_FLAG_KEYS,
    OPTIMIZERS,
    PaperMomentumSGD,
    discriminator_loss,
    generator_loss,
    paper_sgd_schedule,
    real_to_model_space,
    sample_noise,
)

__all__ = [
    "CHECKPOINT_PREFIX",
    "CGANTrainLoop",
    "cgan_train_defaults",
    "load_cgan_checkpoint",
    "check_checkpoint_flags",
]

CHECKPOINT_PREFIX = "cgan"
CHECKPOINT_FORMAT = "guided_diffusion.cgan/1"

# Defaults of the paper's SGD (section 4.1). The momentum ramp length is not in the paper; the
# pylearn2 GAN configuration it built on saturates after 250 epochs of 500 MNIST batches.
PAPER_SGD = dict(lr=0.1, lr_decay=1.00004, min_lr=1e-6, momentum=0.5, final_momentum=0.7)
PAPER_MOMENTUM_SATURATE_STEPS = 250 * 500
ADAM_LR = 2e-4


def cgan_train_defaults():
    """
    Defaults of the training flags (besides the network flags of cgan_defaults): the data flags,
    then every keyword of CGANTrainLoop with its default (the constructor is the one place they
    are written) and the run's options (TrainOptions.task_flag_defaults).

    :return: a dict of flag name -> default value.
    """
    defaults = TrainOptions.task_flag_defaults(CGANTrainLoop, dict(data_dir="", batch_size=100),
                                               skip=("model_flags",))
    defaults.update(random_flip=False, preload=True, seed=0, log_dir="", log_format="")
    return defaults


class CGANTrainLoop(TrainTask):
    """
    Alternate one discriminator and one generator update per batch (Goodfellow et al. 2014,
    algorithm 1 with k = 1), on one process or under DistributedDataParallel.

    :param generator: the generator (already on dist_util.dev()).
    :param discriminator: the discriminator (already on dist_util.dev()).
    :param data: an endless iterator of (float NCHW RGB in [-1, 1], {"y": int64}) batches.
    :param arch: "mlp" or "conv" (decides how real images are presented to the discriminator).
    :param options: the run's TrainOptions (training.options), or its fields as keywords
        (run_options): batch_size (images per batch on this rank), lr (0 picks the optimiser's
        default: 2e-4 for adam, 0.1 for sgd), lr_schedule and lr_warmup_steps (adam only; both
        networks' rates), grad_clip (> 0 clips the discriminator's and the generator's global
        gradient norms, each to it, before their steps; logged as grad_norm_d/_g(_clipped)),
        iterations (the run ends when this many steps have been taken in total, resumed ones
        included; 0: no end), max_steps, log_interval, save_interval, resume_checkpoint,
        keep_checkpoints (see training.engine.Trainer).
    :param optimizer: "adam" (default) or "sgd" (the paper's momentum SGD with its schedule).
    :param adam_beta1: Adam's first-moment decay (0.5, as DCGAN).
    :param adam_beta2: Adam's second-moment decay.
    :param lr_decay: sgd: the learning rate is divided by this after every step.
    :param min_lr: sgd: floor of the learning rate.
    :param momentum: sgd: initial momentum.
    :param final_momentum: sgd: momentum reached after momentum_saturate_steps.
    :param momentum_saturate_steps: sgd: length of the linear momentum ramp in steps.
    :param ema_rate: decay of the generator's exponential moving average.
    :param ema_warmup_power, ema_inv_gamma: the EMA decay's warm-up (training.ema.ema_decay; a
        power of 0 keeps ema_rate from the first step).
    :param model_flags: the network flags (cgan_defaults keys) stored in checkpoints and checked
        on resume.
    """

    checkpoint_prefix = CHECKPOINT_PREFIX
    loss_key = "loss_g"
    # lr 0: the optimiser's own default.
    option_defaults = dict(lr=0.0, log_interval=100, save_interval=5000)
    options_without = ("weight_decay", "init_checkpoint")

    def __init__(
        self,
        *,
        generator,
        discriminator,
        data,
        arch,
        options=None,
        optimizer="adam",
        adam_beta1=0.5,
        adam_beta2=0.999,
        lr_decay=PAPER_SGD["lr_decay"],
        min_lr=PAPER_SGD["min_lr"],
        momentum=PAPER_SGD["momentum"],
        final_momentum=PAPER_SGD["final_momentum"],
        momentum_saturate_steps=PAPER_MOMENTUM_SATURATE_STEPS,
        ema_rate=0.999,
        ema_warmup_power=0.0,
        ema_inv_gamma=1.0,
        model_flags=None,
        **run_options,
    ):
        options = TrainOptions.build(self.option_defaults, options, **run_options)
        if optimizer not in OPTIMIZERS:
            raise ValueError(
                f"unknown --optimizer {optimizer!r}: use one of {', '.join(OPTIMIZERS)}"
            )
        if not 0.0 <= ema_rate < 1.0:
            raise ValueError(f"--ema_rate must be in [0, 1), got {ema_rate}")
        check_ema_warmup(ema_warmup_power, ema_inv_gamma)
        self.ema_warmup = (ema_warmup_power, ema_inv_gamma)
        check_sgd_schedule(optimizer, options)
        self.grad_clip = checked_grad_clip(options.grad_clip)
        self.generator = generator
        self.discriminator = discriminator
        self.data = data
        self.arch = arch
        self.batch_size = options.batch_size
        self.optimizer_name = optimizer
        self.ema_rate = ema_rate
        self.model_flags = dict(model_flags or {})
        self.z_dim = generator.z_dim
        self.device = next(generator.parameters()).device

        lr = options.lr
        if optimizer == "sgd":
            self.base_lr = lr if lr > 0 else PAPER_SGD["lr"]
            self.sgd_schedule = dict(
                lr=self.base_lr,
                lr_decay=lr_decay,
                min_lr=min_lr,
                momentum=momentum,
                final_momentum=final_momentum,
                saturate_steps=momentum_saturate_steps,
            )
            settings = dict(optimizer=PaperMomentumSGD, momentum=momentum)
        else:
            self.base_lr = lr if lr > 0 else ADAM_LR
            self.sgd_schedule = None
            settings = dict(optimizer=torch.optim.Adam, betas=(adam_beta1, adam_beta2))
        options = dataclasses.replace(options, lr=self.base_lr)
        self.opt_g = make_optimizer(generator.parameters(), options, **settings)
        self.opt_d = make_optimizer(discriminator.parameters(), options, **settings)

        # The EMA is a full copy so buffers (batch-norm statistics) travel with it.
        self.ema = copy.deepcopy(generator).eval().requires_grad_(False)
        self._non_finite = NonFiniteSteps(self.device)

        # Every rank must start from rank 0's weights: DDP only averages gradients (a resumed
        # run loads the same file on every rank).
        for module in (self.generator, self.discriminator, self.ema):
            dist_util.sync_params(module.parameters())
        self.trainer = Trainer(self, data=data, options=options)
        self.ddp_generator = dist_util.wrap_ddp(self.generator)
        self.ddp_discriminator = dist_util.wrap_ddp(self.discriminator)

    def run_loop(self):
        """
        Train until the step limits (forever without one), logging and saving at their
        intervals (see training.engine.Trainer.run: exact resume, preemption).
        """
        # deviation from reference: the paper stopped at the best validation log-likelihood; we
        # stop at the step limit and leave model selection to cgan_eval.py.
        self.trainer.run()

    def run_step(self, images, labels):
        """One discriminator and one generator update, outside the engine's loop (tests)."""
        self.trainer.take_step(images, {"y": labels})

    def train_step(self, images, cond, step):
        """
        One discriminator update then one generator update on a batch.

        :param images: float NCHW RGB in [-1, 1].
        :param cond: {"y": int64 class labels of the images}.
        :param step: the index of this step (the EMA warm-up's position).
        """
        real = real_to_model_space(self.arch, images.to(self.device))
        labels = cond["y"].to(self.device)
        # The generated batch takes the real batch's labels, so both halves of the
        # discriminator's input follow the data's class distribution.
        z = sample_noise(len(labels), self.z_dim, device=self.device)
        fake = self.ddp_generator(z, labels)

        # One forward pass over real and fake together: DDP expects one forward per backward.
        logits = self.ddp_discriminator(
            torch.cat([real, fake.detach()]), torch.cat([labels, labels])
        )
        real_logits, fake_logits = logits.chunk(2)
        loss_d = discriminator_loss(real_logits, fake_logits)
        self.opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        self._clip(self.discriminator, "d")
        self.opt_d.step()

        loss_g = generator_loss(self.ddp_discriminator(fake, labels))
        self.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        self._clip(self.generator, "g")
        self.opt_g.step()
        # The generator step also filled the discriminator's gradients; drop them now so they
        # cannot leak into anything that inspects .grad before the next zero_grad.
        self.opt_d.zero_grad(set_to_none=True)

        rate = ema_decay(self.ema_rate, step, *self.ema_warmup)
        update_ema(self.ema.parameters(), self.generator.parameters(), rate=rate)
        for ema_buf, buf in zip(self.ema.buffers(), self.generator.buffers()):
            ema_buf.copy_(buf)

        # deviation from the previous cGAN loop: the losses stay on the device (no wait per
        # step); a non-finite one is counted here and stops the run at the next health check.
        finite = torch.isfinite(loss_d.detach()) & torch.isfinite(loss_g.detach())
        self._non_finite.add(finite)
        logger.logkv_mean("loss_d", loss_d.detach())
        logger.logkv_mean("loss_g", loss_g.detach())
        logger.logkv_mean("d_real", torch.sigmoid(real_logits.detach()).mean())
        logger.logkv_mean("d_fake", torch.sigmoid(fake_logits.detach()).mean())

    def _clip(self, network, name):
        """--grad_clip: clip the network's global gradient norm before its optimizer step."""
        if self.grad_clip <= 0:
            return
        grads = [p.grad for p in network.parameters() if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        logger.logkv_mean(f"grad_norm_{name}", norm)
        logger.logkv_mean(f"grad_norm_{name}_clipped", clip_to_global_norm(grads, norm, self.grad_clip))

    def health_problem(self):
        new = self._non_finite.new()
        if new:
            return f"non-finite loss at {new} recent step(s) (loss_d or loss_g; try a lower --lr)"
        return None

    def optimizers(self):
        return [self.opt_g, self.opt_d]

    def set_lr(self, lr, step=None):
        if self.sgd_schedule is None or step is None:
            super().set_lr(lr, step)
            return
        # The paper's SGD: its own decay of the rate and ramp of the momentum.
        lr, momentum = paper_sgd_schedule(step, **self.sgd_schedule)
        for opt in self.optimizers():
            for group in opt.param_groups:
                group["lr"] = lr
                group["momentum"] = momentum

    def state_dict(self):
        """
        :return: everything needed to resume (but the training state), as a dict of tensors and
            plain values.
        """
        return dict(
            format=CHECKPOINT_FORMAT,
            step=self.trainer.global_step,
            flags=dict(self.model_flags),
            optimizer=self.optimizer_name,
            ema_rate=self.ema_rate,
            generator=self.generator.state_dict(),
            discriminator=self.discriminator.state_dict(),
            ema=self.ema.state_dict(),
            opt_g=self.opt_g.state_dict(),
            opt_d=self.opt_d.state_dict(),
        )

    def checkpoint_files(self, folder, step, state):
        checkpoint = self.state_dict()
        checkpoint["train_state"] = state
        return [(checkpoint, os.path.join(folder, f"{CHECKPOINT_PREFIX}{step:06d}.pt"))]

    def load_checkpoint(self, path, step):
        logger.log(f"resuming from {path}")
        ckpt = load_cgan_checkpoint(path)
        check_checkpoint_flags(ckpt, self.model_flags, path)
        if ckpt["optimizer"] != self.optimizer_name:
            raise ValueError(
                f"checkpoint {path} was trained with --optimizer {ckpt['optimizer']}: pass "
                f"--optimizer {ckpt['optimizer']} to resume it"
            )
        if int(ckpt["step"]) != step:
            raise ValueError(f"{path} holds step {ckpt['step']}, but its name says {step}")
        self.generator.load_state_dict(ckpt["generator"])
        self.discriminator.load_state_dict(ckpt["discriminator"])
        self.ema.load_state_dict(ckpt["ema"])
        self.opt_g.load_state_dict(ckpt["opt_g"])
        self.opt_d.load_state_dict(ckpt["opt_d"])
        return train_state.from_checkpoint(ckpt, path)


def check_sgd_schedule(optimizer, options):
    """
    The paper's SGD has its own schedule: refuse --lr_schedule / --lr_warmup_steps with it.

    :raises ValueError: in one line.
    """
    if optimizer == "sgd" and (options.lr_schedule != "constant" or options.lr_warmup_steps):
        raise ValueError(
            "--lr_schedule and --lr_warmup_steps apply to --optimizer adam: sgd follows the "
            "paper's schedule (--lr_decay, --min_lr)"
        )


def load_cgan_checkpoint(path):
    """
    Read a cgan%06d.pt checkpoint onto the CPU.

    :param path: the file.
    :raises ValueError: when the file is not a cGAN checkpoint (e.g. a diffusion model).
    """
    ckpt = load_checkpoint(path, map_location="cpu")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{path} is not a cGAN checkpoint written by cgan_train.py (expected a cgan%06d.pt "
            "file from its log directory)"
        )
    return ckpt


def check_checkpoint_flags(ckpt, model_flags, path):
    """
    Raise one clear error naming every network flag that differs from the checkpoint's.

    :param ckpt: a loaded checkpoint.
    :param model_flags: the flags the caller built its networks with.
    :param path: the checkpoint path, for the message.
    """
    saved = ckpt["flags"]
    wrong = [
        key
        for key in MODEL_FLAG_KEYS
        if key in model_flags and key in saved and saved[key] != model_flags[key]
        # conv_channels shapes only the conv networks.
        and not (key == "conv_channels" and saved.get("arch") == "mlp")
    ]
    if wrong:
        needed = " ".join(f"--{key} {saved[key]}" for key in wrong)
        given = " ".join(f"--{key} {model_flags[key]}" for key in wrong)
        raise ValueError(
            f"checkpoint {path} was trained with {needed} (got {given}): pass {needed}"
        )


