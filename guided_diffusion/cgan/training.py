"""
Training, checkpoints and sampling for the conditional GAN of ``cgan.networks``.

A checkpoint ``cgan%06d.pt`` is one file holding both networks, the generator's EMA, both
optimisers, the step and the flags that shape the networks, so a run resumes exactly and a
checkpoint can never be paired with the wrong optimiser file.
"""

import copy
import math
import os

import torch

from .. import dist_util, logger
from ..runtime import train_state
from .networks import (
    MODEL_FLAG_KEYS,
    OPTIMIZERS,
    PaperMomentumSGD,
    create_cgan,
    discriminator_loss,
    generator_loss,
    paper_sgd_schedule,
    real_to_model_space,
    sample_noise,
)
from ..runtime.checkpoints import find_latest_checkpoint, load_checkpoint, save_checkpoint_files
from ..nn import update_ema
from ..runtime.preemption import PreemptionWatch
from ..runtime.progress import StepMeter

__all__ = [
    "CHECKPOINT_PREFIX",
    "CGANTrainLoop",
    "cgan_train_defaults",
    "load_cgan_checkpoint",
    "check_checkpoint_flags",
    "resolve_resume_checkpoint",
    "generate_samples",
    "balanced_labels",
    "load_generator",
    "class_grid",
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
    Defaults of the training flags (besides the network flags of cgan_defaults).

    :return: a dict of flag name -> default value.
    """
    # deviation from reference: Adam is the default; the paper's SGD is optimizer="sgd".
    return dict(
        data_dir="",
        batch_size=100,
        optimizer="adam",
        lr=0.0,
        adam_beta1=0.5,
        adam_beta2=0.999,
        lr_decay=PAPER_SGD["lr_decay"],
        min_lr=PAPER_SGD["min_lr"],
        momentum=PAPER_SGD["momentum"],
        final_momentum=PAPER_SGD["final_momentum"],
        momentum_saturate_steps=PAPER_MOMENTUM_SATURATE_STEPS,
        ema_rate=0.999,
        max_steps=0,
        log_interval=100,
        save_interval=5000,
        resume_checkpoint="",
        random_flip=False,
        preload=True,
        seed=0,
    )


class CGANTrainLoop:
    """
    Alternate one discriminator and one generator update per batch (Goodfellow et al. 2014,
    algorithm 1 with k = 1), on one process or under DistributedDataParallel.

    :param generator: the generator (already on dist_util.dev()).
    :param discriminator: the discriminator (already on dist_util.dev()).
    :param data: an endless iterator of (float NCHW RGB in [-1, 1], {"y": int64}) batches.
    :param arch: "mlp" or "conv" (decides how real images are presented to the discriminator).
    :param batch_size: images per batch on this rank.
    :param optimizer: "adam" (default) or "sgd" (the paper's momentum SGD with its schedule).
    :param lr: learning rate; 0 picks the optimiser's default (2e-4 for adam, 0.1 for sgd).
    :param adam_beta1: Adam's first-moment decay (0.5, as DCGAN).
    :param adam_beta2: Adam's second-moment decay.
    :param lr_decay: sgd: the learning rate is divided by this after every step.
    :param min_lr: sgd: floor of the learning rate.
    :param momentum: sgd: initial momentum.
    :param final_momentum: sgd: momentum reached after momentum_saturate_steps.
    :param momentum_saturate_steps: sgd: length of the linear momentum ramp in steps.
    :param ema_rate: decay of the generator's exponential moving average.
    :param max_steps: stop after this many steps in total (0 runs until interrupted).
    :param log_interval: dump the logged means every this many steps.
    :param save_interval: write a checkpoint every this many steps (and at the end).
    :param resume_checkpoint: "" (fresh start), "auto" (newest complete checkpoint in the log
        directory, fresh start when there is none), or a checkpoint path.
    :param model_flags: the network flags (cgan_defaults keys) stored in checkpoints and checked
        on resume.
    """

    def __init__(
        self,
        *,
        generator,
        discriminator,
        data,
        arch,
        batch_size,
        optimizer="adam",
        lr=0.0,
        adam_beta1=0.5,
        adam_beta2=0.999,
        lr_decay=PAPER_SGD["lr_decay"],
        min_lr=PAPER_SGD["min_lr"],
        momentum=PAPER_SGD["momentum"],
        final_momentum=PAPER_SGD["final_momentum"],
        momentum_saturate_steps=PAPER_MOMENTUM_SATURATE_STEPS,
        ema_rate=0.999,
        max_steps=0,
        log_interval=100,
        save_interval=5000,
        resume_checkpoint="",
        model_flags=None,
    ):
        if optimizer not in OPTIMIZERS:
            raise ValueError(
                f"unknown --optimizer {optimizer!r}: use one of {', '.join(OPTIMIZERS)}"
            )
        if not 0.0 <= ema_rate < 1.0:
            raise ValueError(f"--ema_rate must be in [0, 1), got {ema_rate}")
        if log_interval < 1 or save_interval < 1:
            raise ValueError("--log_interval and --save_interval must be at least 1")
        if max_steps < 0:
            raise ValueError(
                f"--max_steps must be >= 0 (0 = run until interrupted), got {max_steps}"
            )
        self.generator = generator
        self.discriminator = discriminator
        self.data = data
        self.arch = arch
        self.batch_size = batch_size
        self.optimizer_name = optimizer
        self.ema_rate = ema_rate
        self.max_steps = max_steps
        self.log_interval = log_interval
        self.save_interval = save_interval
        self.model_flags = dict(model_flags or {})
        self.z_dim = generator.z_dim
        self.device = next(generator.parameters()).device
        self.step = 0

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
            make_opt = lambda params: PaperMomentumSGD(params, lr=self.base_lr, momentum=momentum)
        else:
            self.base_lr = lr if lr > 0 else ADAM_LR
            self.sgd_schedule = None
            make_opt = lambda params: torch.optim.Adam(
                params, lr=self.base_lr, betas=(adam_beta1, adam_beta2)
            )
        self.opt_g = make_opt(generator.parameters())
        self.opt_d = make_opt(discriminator.parameters())

        # The EMA is a full copy so buffers (batch-norm statistics) travel with it.
        self.ema = copy.deepcopy(generator).eval().requires_grad_(False)

        # RNG streams and data position of the checkpoint, applied when run_loop starts.
        self._saved_train_state = None
        self.last_checkpoint = None
        path = resolve_resume_checkpoint(resume_checkpoint, logger.get_dir())
        if path:
            self._resume(path)
        else:
            # Every rank must start from rank 0's weights: DDP only averages gradients.
            dist_util.sync_params(self.generator.parameters())
            dist_util.sync_params(self.discriminator.parameters())
            dist_util.sync_params(self.ema.parameters())
        self.ddp_generator = dist_util.wrap_ddp(self.generator)
        self.ddp_discriminator = dist_util.wrap_ddp(self.discriminator)

    def _resume(self, path):
        logger.log(f"resuming from {path}")
        ckpt = load_cgan_checkpoint(path)
        check_checkpoint_flags(ckpt, self.model_flags, path)
        if ckpt["optimizer"] != self.optimizer_name:
            raise ValueError(
                f"checkpoint {path} was trained with --optimizer {ckpt['optimizer']}: pass "
                f"--optimizer {ckpt['optimizer']} to resume it"
            )
        self.generator.load_state_dict(ckpt["generator"])
        self.discriminator.load_state_dict(ckpt["discriminator"])
        self.ema.load_state_dict(ckpt["ema"])
        self.opt_g.load_state_dict(ckpt["opt_g"])
        self.opt_d.load_state_dict(ckpt["opt_d"])
        self.step = int(ckpt["step"])
        self.last_checkpoint = path
        self._saved_train_state = train_state.from_checkpoint(ckpt, path)

    def run_loop(self):
        """
        Train until max_steps (forever when 0), logging and saving at their intervals.

        A resumed run first restores the checkpoint's RNG streams and data position; SIGTERM or
        SIGUSR1 stops the run after the current step with a checkpoint (exit status 75).
        """
        # deviation from reference: the paper stopped at the best validation log-likelihood; we
        # stop at max_steps and leave model selection to cgan_eval.py on the saved checkpoints.
        saved_at = self.step
        with PreemptionWatch() as preemption:
            state, self._saved_train_state = self._saved_train_state, None
            train_state.restore(state, {"train": self.data}, source=self.last_checkpoint)
            meter = StepMeter(
                global_batch=self.batch_size * dist_util.get_world_size(),
                total_steps=self.max_steps,
                start_step=self.step,
            )
            while not self._done():
                images, cond = next(self.data)
                self.run_step(images, cond["y"])
                self.step += 1
                if self.step % self.log_interval == 0:
                    meter.report(self.step, loss_key="loss_g")
                    logger.dumpkvs()
                if self.step % self.save_interval == 0:
                    self.save()
                    saved_at = self.step
                if not self._done() and preemption.requested():
                    if self.step != saved_at:
                        self.save()
                    preemption.stop(self.step, self.last_checkpoint)
            if self.step != saved_at:
                self.save()

    def _done(self):
        return self.max_steps != 0 and self.step >= self.max_steps

    def run_step(self, images, labels):
        """
        One discriminator update then one generator update on a batch.

        :param images: float NCHW RGB in [-1, 1].
        :param labels: int64 class labels of the images.
        """
        self._apply_schedule()
        real = real_to_model_space(self.arch, images.to(self.device))
        labels = labels.to(self.device)
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
        self.opt_d.step()

        loss_g = generator_loss(self.ddp_discriminator(fake, labels))
        self.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        self.opt_g.step()
        # The generator step also filled the discriminator's gradients; drop them now so they
        # cannot leak into anything that inspects .grad before the next zero_grad.
        self.opt_d.zero_grad(set_to_none=True)

        update_ema(self.ema.parameters(), self.generator.parameters(), rate=self.ema_rate)
        for ema_buf, buf in zip(self.ema.buffers(), self.generator.buffers()):
            ema_buf.copy_(buf)

        if not (math.isfinite(loss_d.item()) and math.isfinite(loss_g.item())):
            raise FloatingPointError(
                f"non-finite loss at step {self.step} (loss_d={loss_d.item()}, "
                f"loss_g={loss_g.item()}): lower --lr"
            )
        world = dist_util.get_world_size()
        logger.logkv_mean("loss_d", loss_d.item())
        logger.logkv_mean("loss_g", loss_g.item())
        logger.logkv_mean("d_real", torch.sigmoid(real_logits).mean().item())
        logger.logkv_mean("d_fake", torch.sigmoid(fake_logits).mean().item())
        logger.logkv("lr", self.opt_g.param_groups[0]["lr"])
        logger.logkv("step", self.step)
        logger.logkv("samples", (self.step + 1) * self.batch_size * world)

    def _apply_schedule(self):
        if self.sgd_schedule is None:
            return
        lr, momentum = paper_sgd_schedule(self.step, **self.sgd_schedule)
        for opt in (self.opt_g, self.opt_d):
            for group in opt.param_groups:
                group["lr"] = lr
                group["momentum"] = momentum

    def state_dict(self):
        """
        :return: everything needed to resume, as a dict of tensors and plain values.
        """
        return dict(
            format=CHECKPOINT_FORMAT,
            step=self.step,
            flags=dict(self.model_flags),
            optimizer=self.optimizer_name,
            ema_rate=self.ema_rate,
            generator=self.generator.state_dict(),
            discriminator=self.discriminator.state_dict(),
            ema=self.ema.state_dict(),
            opt_g=self.opt_g.state_dict(),
            opt_d=self.opt_d.state_dict(),
        )

    def save(self):
        """
        Write cgan<step>.pt to the log directory (rank 0 only; other ranks wait), with every
        rank's RNG streams and data position under "train_state".
        """
        path = os.path.join(logger.get_dir(), f"{CHECKPOINT_PREFIX}{self.step:06d}.pt")
        state = train_state.gather(self.step, {"train": self.data})  # a collective
        if dist_util.is_main_process():
            logger.log(f"saving {path}")
            checkpoint = self.state_dict()
            checkpoint["train_state"] = state
            save_checkpoint_files([(checkpoint, path)], previous=self.last_checkpoint)
        self.last_checkpoint = path
        dist_util.barrier()


def resolve_resume_checkpoint(resume_checkpoint, log_dir):
    """
    :param resume_checkpoint: "", "auto" or a path.
    :param log_dir: where "auto" looks for cgan%06d.pt files.
    :return: the checkpoint path to resume from, or None for a fresh start.
    """
    if not resume_checkpoint:
        return None
    if resume_checkpoint == "auto":
        return find_latest_checkpoint(log_dir, CHECKPOINT_PREFIX)
    if not os.path.isfile(resume_checkpoint):
        raise FileNotFoundError(f"--resume_checkpoint {resume_checkpoint} does not exist")
    return resume_checkpoint


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


def balanced_labels(num_samples, num_classes, class_label=-1):
    """
    :param num_samples: how many labels.
    :param num_classes: number of classes.
    :param class_label: a fixed class, or -1 for 0, 1, ..., num_classes - 1, 0, 1, ... (balanced).
    :return: int64 tensor [num_samples].
    """
    if class_label >= num_classes:
        raise ValueError(f"--class_label {class_label} is not below --num_classes {num_classes}")
    if class_label >= 0:
        return torch.full((num_samples,), class_label, dtype=torch.int64)
    return torch.arange(num_samples, dtype=torch.int64) % num_classes


@torch.no_grad()
def generate_samples(
    generator,
    *,
    num_samples,
    num_classes,
    class_label=-1,
    batch_size=100,
    progress=False,
    keep_dropout=False,
):
    """
    Draw class-conditional samples on every rank and gather them in a fixed order.

    The labels are balanced over classes (or all class_label). In each round every rank draws
    batch_size samples for its slice of the global label list, and the gathered result is the
    same list in order, so one process gives the same images as several (up to the noise).

    :param generator: a generator in eval mode (the EMA, usually).
    :param num_samples: total number of samples over all ranks.
    :param num_classes: number of classes.
    :param class_label: -1 for balanced classes, else the class of every sample.
    :param batch_size: samples per rank and round.
    :param progress: show a progress bar on rank 0.
    :param keep_dropout: leave the generator's dropout active while sampling. A generator trained
        with dropout can learn to draw its variety from the dropout masks rather than from z
        (we saw this with the paper's MLP on digits); this samples it as it was trained.
    :return: (float NCHW RGB in [-1, 1] on the CPU, int64 labels), both of length num_samples.
    """
    if num_samples < 1:
        raise ValueError(f"--num_samples must be at least 1, got {num_samples}")
    rank, world = dist_util.get_rank(), dist_util.get_world_size()
    device = next(generator.parameters()).device
    labels = balanced_labels(num_samples, num_classes, class_label)
    per_round = batch_size * world
    rounds = math.ceil(num_samples / per_round)
    # Pad so every rank runs the same number of full batches (collectives need that).
    padded = balanced_labels(rounds * per_round, num_classes, class_label)
    dropouts = [m for m in generator.modules() if isinstance(m, torch.nn.Dropout)]
    modes = [m.training for m in dropouts]
    for m in dropouts:
        m.train(keep_dropout)
    chunks = []
    bar = range(rounds)
    if progress and dist_util.is_main_process():
        from tqdm.auto import tqdm

        bar = tqdm(bar, desc="sampling", unit="batch")
    for r in bar:
        start = r * per_round + rank * batch_size
        y = padded[start : start + batch_size].to(device)
        z = sample_noise(batch_size, generator.z_dim, device=device)
        images = generator.to_images(generator(z, y)).float()
        chunks.extend(t.cpu() for t in dist_util.all_gather_tensors(images.contiguous()))
    for m, mode in zip(dropouts, modes):
        m.train(mode)
    return torch.cat(chunks)[:num_samples], labels


def load_generator(path, model_flags, *, use_ema=True):
    """
    Build a generator from flags and load a checkpoint's EMA (or raw) weights into it.

    :param path: a cgan%06d.pt checkpoint.
    :param model_flags: the network flags (cgan_defaults keys); they must match the checkpoint's.
    :param use_ema: load the exponential moving average (what sampling should use).
    :return: the generator in eval mode, on the CPU.
    """
    ckpt = load_cgan_checkpoint(path)
    check_checkpoint_flags(ckpt, model_flags, path)
    generator, _ = create_cgan(**model_flags)
    generator.load_state_dict(ckpt["ema" if use_ema else "generator"])
    return generator.eval()


def class_grid(images, labels, *, per_class=10):
    """
    Arrange samples for a grid with one row per class.

    :param images: uint8 [N, H, W, C] (numpy or torch).
    :param labels: int labels [N].
    :param per_class: images per row at most.
    :return: (uint8 [rows * k, H, W, C] in row order, k) where k is the row length: the
        smallest number of samples any present class has, capped at per_class.
    """
    labels = torch.as_tensor(labels)
    images = torch.as_tensor(images)
    classes = torch.unique(labels).tolist()
    k = min(per_class, min(int((labels == c).sum()) for c in classes))
    rows = [images[labels == c][:k] for c in classes]
    return torch.cat(rows), k
