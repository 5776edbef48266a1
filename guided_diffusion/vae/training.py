"""
Training loop for the VAE of vae.py: Adam on the negative ELBO (optionally beta-weighted KL),
DistributedDataParallel over any launcher dist_util supports, atomic ``vae%06d.pt`` checkpoints
holding model, optimizer, step and architecture flags, and resuming from them.
"""

import math
import os

import torch

from .. import dist_util, logger
from ..runtime import train_state
from ..runtime.checkpoints import find_latest_checkpoint, load_checkpoint, save_checkpoint_files
from ..runtime.preemption import PreemptionWatch
from ..runtime.progress import StepMeter
from .networks import check_vae_checkpoint, vae_losses, vae_state

CHECKPOINT_PREFIX = "vae"


def resolve_resume_checkpoint(resume_checkpoint, log_dir):
    """
    The checkpoint to resume from: "" means none, "auto" the newest complete ``vaeNNNNNN.pt`` in
    log_dir (None when there is none yet), anything else a path that must exist.
    """
    if not resume_checkpoint:
        return None
    if resume_checkpoint == "auto":
        return find_latest_checkpoint(log_dir, CHECKPOINT_PREFIX)
    if not os.path.isfile(resume_checkpoint):
        raise FileNotFoundError(f"--resume_checkpoint {resume_checkpoint} does not exist")
    return resume_checkpoint


class VAETrainLoop:
    """
    Runs VAE training; build it, then call :meth:`run_loop`.

    :param model: the VAE (not yet on the device, not wrapped).
    :param data: iterator of (images in [-1, 1] NCHW, {"y": labels} or {}) batches.
    :param flags: dict with the architecture flags (stored in checkpoints and checked on resume).
    :param lr: Adam learning rate.
    :param beta: KL weight in the training loss (1 = the plain ELBO).
    :param iterations: optimizer steps to train for in total, counting resumed steps (0 = forever).
    :param log_interval: steps between logger dumps.
    :param save_interval: steps between checkpoints (a final one is always written).
    :param resume_checkpoint: "", "auto" or a path (see :func:`resolve_resume_checkpoint`).
    :param weight_decay: Adam weight decay.
    :param log_dir: where checkpoints go (default: the logger's folder).
    """

    def __init__(
        self,
        *,
        model,
        data,
        flags,
        lr=1e-3,
        beta=1.0,
        iterations=10000,
        log_interval=100,
        save_interval=1000,
        resume_checkpoint="",
        weight_decay=0.0,
        log_dir=None,
    ):
        if iterations < 0:
            raise ValueError(f"--iterations must be >= 0 (0 trains forever), got {iterations}")
        if beta < 0:
            raise ValueError(f"--beta must be >= 0, got {beta}")
        if log_interval < 1 or save_interval < 1:
            raise ValueError("--log_interval and --save_interval must be at least 1")
        self.model = model
        self.data = data
        self.flags = dict(flags)
        self.beta = beta
        self.iterations = iterations
        self.log_interval = log_interval
        self.save_interval = save_interval
        self.log_dir = log_dir or logger.get_dir()
        self.step = 0
        # RNG streams and data position of the checkpoint, applied when run_loop starts.
        self._saved_train_state = None
        self.last_checkpoint = None

        # Adam instead of the paper's Adagrad: it needs no per-dataset step-size search.
        self.opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
        self._load_resume_state(resolve_resume_checkpoint(resume_checkpoint, self.log_dir))
        self.model.to(dist_util.dev())
        _move_optimizer_state(self.opt, dist_util.dev())
        dist_util.sync_params(self.model.parameters())
        self.ddp_model = dist_util.wrap_ddp(self.model)

    def _load_resume_state(self, path):
        if path is None:
            return
        state = load_checkpoint(path, map_location="cpu")
        check_vae_checkpoint(state, self.flags, path)
        self.model.load_state_dict(state["model"])
        if state.get("opt") is not None:
            self.opt.load_state_dict(state["opt"])
        self.step = int(state["step"])
        self.last_checkpoint = path
        self._saved_train_state = train_state.from_checkpoint(state, path)
        logger.log(f"resumed from {path} at step {self.step}")

    def _done(self):
        return self.iterations and self.step >= self.iterations

    def run_loop(self):
        """
        Train until ``iterations`` steps; returns the final checkpoint path (rank 0) or None.

        A resumed run first restores the checkpoint's RNG streams and data position; SIGTERM or
        SIGUSR1 stops the run after the current step with a checkpoint (exit status 75).
        """
        last_saved = None
        with PreemptionWatch() as preemption:
            state, self._saved_train_state = self._saved_train_state, None
            train_state.restore(state, {"train": self.data}, source=self.last_checkpoint)
            meter = None
            while not self._done():
                batch, cond = next(self.data)
                if meter is None:
                    meter = StepMeter(
                        global_batch=batch.shape[0] * dist_util.get_world_size(),
                        total_steps=self.iterations,
                        start_step=self.step,
                    )
                self.run_step(batch, cond)
                if self.step % self.log_interval == 0:
                    meter.report(self.step)
                    logger.dumpkvs()
                if self.step % self.save_interval == 0:
                    last_saved = self.save()
                if not self._done() and preemption.requested():
                    if last_saved != self.step:
                        last_saved = self.save()
                    preemption.stop(self.step, self.last_checkpoint)
            if last_saved != self.step:
                last_saved = self.save()
        return self._path(self.step) if dist_util.is_main_process() else None

    def run_step(self, batch, cond):
        """One optimizer step on a batch; logs loss, recon, kl and elbo (nats per image)."""
        x = self.model.prepare_input(batch.to(dist_util.dev()))
        y = None
        if self.model.class_cond:
            if "y" not in cond:
                raise ValueError("--class_cond True needs labelled data (file names '<class>_...')")
            y = cond["y"].to(dist_util.dev())
        # The forward pass goes through the DDP wrapper so gradients are averaged over ranks.
        out = self.ddp_model(x, y)
        terms = vae_losses(self.model, x, out, beta=self.beta)
        loss = terms["loss"].mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"VAE loss became {loss.item()} at step {self.step}: lower --lr or check the data"
            )
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = math.sqrt(
            sum(float(p.grad.pow(2).sum()) for p in self.model.parameters() if p.grad is not None)
        )
        self.opt.step()
        self.step += 1
        for key, value in terms.items():
            logger.logkv_mean(key, value.mean().item())
        logger.logkv_mean("grad_norm", grad_norm)
        logger.logkv("step", self.step)
        logger.logkv("samples", self.step * batch.shape[0] * dist_util.get_world_size())

    def _path(self, step):
        return os.path.join(self.log_dir, f"{CHECKPOINT_PREFIX}{step:06d}.pt")

    def save(self):
        """
        Rank 0 writes vae<step>.pt atomically, with every rank's RNG streams and data position
        under "train_state"; every rank waits for it. Returns the step.
        """
        path = self._path(self.step)
        state = train_state.gather(self.step, {"train": self.data})  # a collective
        if dist_util.is_main_process():
            checkpoint = vae_state(self.model, self.opt, self.step, self.flags)
            checkpoint["train_state"] = state
            save_checkpoint_files([(checkpoint, path)], previous=self.last_checkpoint)
            logger.log(f"saved {path}")
        self.last_checkpoint = path
        dist_util.barrier()
        return self.step


def _move_optimizer_state(opt, device):
    # A resumed optimizer state was loaded on the CPU; Adam's moments must live with the weights.
    for state in opt.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and key != "step":
                state[key] = value.to(device)
