"""
Training the VAE of ``vae.networks`` as a task of the one training engine
(training.engine.Trainer: exact resume, preemption, progress, atomic checkpoints): Adam on the
negative ELBO (optionally beta-weighted KL), DistributedDataParallel over any launcher dist_util
supports, one-file ``vae%06d.pt`` checkpoints holding model, optimizer, step, architecture flags
and the training state.
"""

import os

import torch

from .. import dist_util, logger
from ..fp16_util import checked_grad_clip, clip_to_global_norm
from ..runtime import train_state
from ..runtime.checkpoints import load_checkpoint
from ..training.engine import NonFiniteSteps, TrainTask, Trainer
from ..training.options import TrainOptions, make_optimizer
from .networks import check_vae_checkpoint, vae_losses, vae_state

__all__ = ["CHECKPOINT_PREFIX", "VAETrainLoop", "vae_train_defaults"]

CHECKPOINT_PREFIX = "vae"


def vae_train_defaults():
    """
    Defaults of the training flags (besides the architecture flags of vae_defaults): the data
    flags, then every keyword of VAETrainLoop with its default (written once, in the constructor)
    and the run's options (TrainOptions.task_flag_defaults).
    """
    defaults = TrainOptions.task_flag_defaults(VAETrainLoop, dict(data_dir="", batch_size=100),
                                               skip=("log_dir",))
    defaults.update(random_flip=False, seed=0, log_dir="", log_format="")
    return defaults


class VAETrainLoop(TrainTask):
    """
    Runs VAE training; build it, then call :meth:`run_loop`.

    :param model: the VAE (not yet on the device, not wrapped).
    :param data: iterator of (images in [-1, 1] NCHW, {"y": labels} or {}) batches.
    :param flags: dict with the architecture flags (stored in checkpoints and checked on resume).
    :param options: the run's TrainOptions (training.options), or its fields as keywords
        (run_options): batch_size (None: taken from the first batch), lr (Adam), lr_schedule,
        lr_warmup_steps, iterations (steps in total, counting resumed ones; 0 = forever),
        max_steps, log_interval, save_interval, resume_checkpoint, weight_decay (Adam's L2),
        grad_clip (> 0 clips the global gradient norm to it before each step; the norm after
        clipping is logged as grad_norm_clipped), keep_checkpoints.
    :param beta: KL weight in the training loss (1 = the plain ELBO).
    :param log_dir: where checkpoints go (default: the logger's folder).
    """

    checkpoint_prefix = CHECKPOINT_PREFIX
    option_defaults = dict(lr=1e-3, iterations=10000, log_interval=100, save_interval=1000)
    options_without = ("init_checkpoint",)

    def __init__(self, *, model, data, flags, options=None, beta=1.0, log_dir=None, **run_options):
        options = TrainOptions.build(self.option_defaults, options, **run_options)
        if beta < 0:
            raise ValueError(f"--beta must be >= 0, got {beta}")
        self.grad_clip = checked_grad_clip(options.grad_clip)
        self.model = model
        self.data = data
        self.flags = dict(flags)
        self.beta = beta
        self.device = dist_util.dev()
        # Adam instead of the paper's Adagrad: it needs no per-dataset step-size search.
        self.opt = make_optimizer(model.parameters(), options, torch.optim.Adam)
        self.lr = options.lr
        self.weight_decay = options.weight_decay
        self._non_finite = NonFiniteSteps(self.device)
        self.model.to(self.device)
        dist_util.sync_params(self.model.parameters())
        self.trainer = Trainer(self, data=data, options=options, log_dir=log_dir)
        self.ddp_model = dist_util.wrap_ddp(self.model)

    def run_loop(self):
        """
        Train until ``iterations`` steps; returns the final checkpoint path (rank 0) or None (see
        training.engine.Trainer.run: exact resume, preemption).
        """
        self.trainer.run()
        if dist_util.is_main_process():
            return self.trainer.marker_path(self.trainer.global_step)
        return None

    def run_step(self, batch, cond):
        """One optimizer step outside the engine's loop (tests)."""
        self.trainer.take_step(batch, cond)

    def train_step(self, batch, cond, step):
        """One optimizer step on a batch; logs loss, recon, kl and elbo (nats per image)."""
        x = self.model.prepare_input(batch.to(self.device))
        y = None
        if self.model.class_cond:
            if "y" not in cond:
                raise ValueError("--class_cond True needs labelled data (file names '<class>_...')")
            y = cond["y"].to(self.device)
        # The forward pass goes through the DDP wrapper so gradients are averaged over ranks.
        out = self.ddp_model(x, y)
        terms = vae_losses(self.model, x, out, beta=self.beta)
        loss = terms["loss"].mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        # deviation from the previous VAE loop: the loss and the gradient norm stay on the device
        # (one foreach norm, no wait per step); a non-finite loss stops the run at the next
        # health check, before anything is saved.
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        if self.grad_clip > 0:
            logger.logkv_mean("grad_norm_clipped", clip_to_global_norm(grads, grad_norm, self.grad_clip))
        self.opt.step()
        self._non_finite.add(torch.isfinite(loss.detach()))
        for key, value in terms.items():
            logger.logkv_mean(key, value.detach().mean())
        logger.logkv_mean("grad_norm", grad_norm)

    def health_problem(self):
        new = self._non_finite.new()
        if new:
            return f"the VAE loss is not finite at {new} recent step(s) (try a lower --lr or check the data)"
        return None

    def checkpoint_files(self, folder, step, state):
        checkpoint = vae_state(self.model, self.opt, step, self.flags)
        checkpoint["train_state"] = state
        return [(checkpoint, os.path.join(folder, f"{CHECKPOINT_PREFIX}{step:06d}.pt"))]

    def load_checkpoint(self, path, step):
        state = load_checkpoint(path, map_location="cpu")
        check_vae_checkpoint(state, self.flags, path)
        if int(state["step"]) != step:
            raise ValueError(f"{path} holds step {state['step']}, but its name says {step}")
        self.model.load_state_dict(state["model"])
        if state.get("opt") is not None:
            # Optimizer.load_state_dict moves Adam's moments to the parameters' device.
            self.opt.load_state_dict(state["opt"])
        logger.log(f"resumed from {path} at step {step}")
        return train_state.from_checkpoint(state, path)
