"""
The diffusion training loop: AdamW on the simplified (or hybrid) objective, EMA copies of the
weights, optional fp16 with a dynamic loss scale, microbatching, periodic atomic checkpoints, and
resuming (model, every EMA rate, optimizer and step) from a checkpoint or the newest one in the log
directory, exactly: the stateNNNNNN.pt beside each checkpoint restores every rank's random-number
streams and data position (train_state), and SIGTERM/SIGUSR1 stop the run with a checkpoint
(preemption).

Step numbering follows the reference: the logged "step" is the index of the optimizer step just
taken (0 for the first one) plus the resume step, and "samples" counts the images consumed so far
over all ranks.
"""

import copy
import functools
import math
import os

import torch

from .runtime import checkpoints, train_state
from . import dist_util, logger
from .fp16_util import MixedPrecisionTrainer, make_adamw
from .errors import NonFiniteLossError
from .runtime.progress import StepMeter
from .runtime.preemption import PreemptionWatch
from .resample import LossAwareSampler, UniformSampler

# With fp16 every overflow halves the loss scale; a scale below 2**MIN_LG_LOSS_SCALE means the
# losses themselves are broken (not just the gradients overflowing), so the run stops.
MIN_LG_LOSS_SCALE = 0.0



class TrainLoop:
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

    A step never waits for the device: the logged values stay device tensors until the logger
    dumps them, and a step whose loss (or gradient) is not finite is skipped on the device. The
    loop checks for that at every log interval and before every save, and stops (see run_loop).
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
        if use_fp16 and use_bf16:
            raise ValueError("--use_fp16 and --use_bf16 exclude each other: pick one")
        if save_interval < 1 or log_interval < 1:
            raise ValueError(
                f"save_interval and log_interval must be at least 1, got {save_interval} and "
                f"{log_interval}"
            )
        self.model = model
        self.diffusion = diffusion
        self.data = data
        self.batch_size = batch_size
        self.microbatch = microbatch if microbatch > 0 else batch_size
        self.lr = lr
        self.ema_rate = parse_ema_rates(ema_rate)
        self.log_interval = log_interval
        self.save_interval = save_interval
        self.resume_checkpoint = resolve_resume_checkpoint(resume_checkpoint)
        self.use_fp16 = use_fp16
        self.fp16_scale_growth = fp16_scale_growth
        self.schedule_sampler = schedule_sampler or UniformSampler(diffusion)
        if isinstance(self.schedule_sampler, LossAwareSampler):
            self.schedule_sampler.set_all_gather(dist_util.all_gather_tensors)
        self.weight_decay = weight_decay
        self.lr_anneal_steps = lr_anneal_steps
        self.max_steps = max_steps
        self.use_bf16 = use_bf16
        # deviation from reference: the reference sends batches to dist_util.dev(); the model's
        # own device is the same in the scripts and also right for a caller that chose another
        # (e.g. a CPU benchmark on a machine with a GPU).
        self.device = _parameter_device(model)

        # self.step counts the steps of this run; resume_step is where the checkpoint left off.
        self.step = 0
        self.resume_step = 0
        self.global_batch = self.batch_size * dist_util.get_world_size()
        self.last_checkpoint = self.resume_checkpoint

        self._load_and_sync_parameters()
        self.mp_trainer = MixedPrecisionTrainer(
            model=self.model,
            use_fp16=self.use_fp16,
            fp16_scale_growth=fp16_scale_growth,
            use_bf16=self.use_bf16,
        )
        self.opt = make_adamw(
            self.mp_trainer.master_params, lr=self.lr, weight_decay=self.weight_decay
        )
        # Skipped steps already reported by _check_health (a device counter lives in mp_trainer).
        self._skips_seen = 0
        # The step after which the last health check passed (the start of this run at first).
        self._healthy_until = 0
        # RNG streams and data position of the checkpoint, applied when run_loop starts.
        self._saved_train_state = None
        if self.resume_step:
            self._load_optimizer_state()
            # The EMA copies are loaded after the optimizer so that a missing EMA file falls back
            # to the (already restored) model weights.
            self.ema_params = [self._load_ema_parameters(rate) for rate in self.ema_rate]
            self._saved_train_state = train_state.load_beside(
                self.resume_checkpoint, self.resume_step
            )
        else:
            self.ema_params = [
                copy.deepcopy(self.mp_trainer.master_params) for _ in range(len(self.ema_rate))
            ]
        self.ddp_model = dist_util.wrap_ddp(self.model)
        self.use_ddp = self.ddp_model is not self.model

    # ----------------------------------------------------------------------------- resuming

    def _load_and_sync_parameters(self):
        if self.resume_checkpoint:
            self.resume_step = parse_resume_step_from_filename(self.resume_checkpoint)
            logger.log(f"loading model from checkpoint: {self.resume_checkpoint}...")
            state = dist_util.load_state_dict(self.resume_checkpoint, map_location=self.device)
            # Imported here: model_weights imports the networks, which train_util does not need.
            from .cli.weights import load_model_weights

            load_model_weights(self.model, state, self.resume_checkpoint)
        dist_util.sync_params(self.model.parameters())

    def _load_ema_parameters(self, rate):
        ema_params = copy.deepcopy(self.mp_trainer.master_params)
        path = find_ema_checkpoint(self.resume_checkpoint, self.resume_step, rate)
        if path is None:
            # deviation from reference: the reference silently restarts the EMA from the model.
            logger.warn(
                f"no ema_{rate}_{self.resume_step:06d}.pt next to {self.resume_checkpoint}: the "
                f"EMA with rate {rate} restarts from the model weights"
            )
        else:
            logger.log(f"loading EMA from checkpoint: {path}...")
            state = dist_util.load_state_dict(path, map_location=self.device)
            from .cli.weights import check_model_weights

            check_model_weights(self.model, state, path)
            ema_params = self.mp_trainer.state_dict_to_master_params(state)
        dist_util.sync_params(ema_params)
        return ema_params

    def _load_optimizer_state(self):
        path = os.path.join(
            os.path.dirname(self.resume_checkpoint), f"opt{self.resume_step:06d}.pt"
        )
        if not os.path.exists(path):
            logger.warn(f"no {path}: the optimizer state (Adam moments) restarts from zero")
            return
        logger.log(f"loading optimizer state from checkpoint: {path}")
        state = dist_util.load_state_dict(path, map_location=self.device)
        if not (isinstance(state, dict) and "param_groups" in state):
            raise ValueError(f"{path} is not an optimizer checkpoint")
        try:
            self.opt.load_state_dict(state)
        except ValueError as exc:
            raise ValueError(f"{path} does not fit this model's optimizer ({exc})") from None

    def _shared_train_state(self):
        """Resume state that is equal on every rank (saved once, by rank 0)."""
        shared = {"lg_loss_scale": train_state.loss_scale(self.mp_trainer)}
        sampler_state = getattr(self.schedule_sampler, "state_dict", None)
        if callable(sampler_state):
            shared["schedule_sampler"] = sampler_state()
        return shared

    def _restore_train_state(self):
        """Put the RNG streams, data position and loss scale back as the checkpoint saved them."""
        state, self._saved_train_state = self._saved_train_state, None
        if state is None:
            return
        shared = train_state.restore(state, {"train": self.data}, source=self.resume_checkpoint)
        if "lg_loss_scale" in shared:
            train_state.set_loss_scale(self.mp_trainer, shared["lg_loss_scale"])
        load_sampler = getattr(self.schedule_sampler, "load_state_dict", None)
        if callable(load_sampler) and shared.get("schedule_sampler") is not None:
            try:
                load_sampler(shared["schedule_sampler"])
            except ValueError as exc:
                logger.warn(f"{exc}: the {type(self.schedule_sampler).__name__} starts afresh")

    # ----------------------------------------------------------------------------- the loop

    def _done(self):
        if self.lr_anneal_steps and self.step + self.resume_step >= self.lr_anneal_steps:
            return True
        return bool(self.max_steps) and self.step >= self.max_steps

    def run_loop(self):
        """
        Train until lr_anneal_steps (or max_steps) is reached, or forever when both are 0.

        A resumed run first restores the checkpoint's RNG streams and data position. On SIGTERM
        or SIGUSR1 (any rank) the step in progress finishes, a checkpoint is saved and the run
        leaves through preemption.TrainingPreempted (exit status 75).

        :raises NonFiniteLossError: when the loss stops being finite (or, in fp16, the loss scale
            falls below 1); checked at every log interval and before every save, so nothing broken
            is saved, and the message names the last good checkpoint.
        """
        # deviation from reference: the reference neither restored RNG streams and data order on
        # resume nor handled the signals schedulers send before they kill a job.
        with PreemptionWatch() as preemption:
            self._restore_train_state()
            self._train(preemption)

    def _train(self, preemption):
        saved_at = None
        meter = StepMeter(
            global_batch=self.global_batch,
            total_steps=self.lr_anneal_steps or (self.max_steps and self.resume_step + self.max_steps),
            start_step=self.resume_step,
        )
        while not self._done():
            batch, cond = next(self.data)
            self.run_step(batch, cond)
            # As in the reference, diagnostics are dumped after the first step of every
            # log_interval (self.step is still the index of the step just taken).
            if self.step % self.log_interval == 0:
                self._check_health()
                meter.report(self.checkpoint_step() + 1)
                logger.dumpkvs()
            self.step += 1
            if self.checkpoint_step() % self.save_interval == 0:
                self.save()
                saved_at = self.step
            if not self._done() and preemption.requested():
                if saved_at != self.step:
                    self.save()
                preemption.stop(self.checkpoint_step(), self.last_checkpoint)
        # The final state is saved unless the last step was just saved.
        if self.step and saved_at != self.step:
            self.save()

    def run_step(self, batch, cond):
        """
        One optimizer step on a batch: forward/backward, optimizer, EMA, lr, logging. Nothing in
        it waits for the device (unless the schedule sampler is loss-aware, which gathers the
        losses on the host).
        """
        self.forward_backward(batch, cond)
        took_step = self.mp_trainer.optimize_no_sync(self.opt)
        self._update_ema(took_step)
        self._anneal_lr()
        self.log_step()

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
            with self._autocast():
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
            # skipped on the device and reported by _check_health.
            self.mp_trainer.backward(loss)

    def _autocast(self):
        # deviation from reference: nothing runs under autocast; --use_bf16 converts the torso
        # (MixedPrecisionTrainer) instead. Autocast stays disabled so that an enclosing autocast
        # cannot change the training numerics.
        return torch.autocast(self.device.type, enabled=False)

    def _check_health(self):
        """
        Stop when steps were skipped for non-finite values (float32/bfloat16) or the fp16 loss
        scale fell below 1. Called at log intervals and before saving: it reads two numbers from
        the device, the only synchronisation of the loop outside logging.
        """
        trainer = self.mp_trainer
        skipped = int(trainer.skipped_steps)
        new_skips, self._skips_seen = skipped - self._skips_seen, skipped
        if self.use_fp16:
            lg_loss_scale = trainer.lg_loss_scale
            if new_skips:
                # deviation from reference: the reference logs each overflow as it happens, which
                # needs a synchronisation per step.
                logger.log(
                    f"Found NaN in {new_skips} of the steps since step {self._healthy_until}: "
                    f"skipped them and decreased lg_loss_scale to {lg_loss_scale:.3f}"
                )
            if lg_loss_scale < MIN_LG_LOSS_SCALE:
                self._stop_non_finite("the fp16 loss scale fell below 1 (every step overflows)")
        elif new_skips:
            self._stop_non_finite(
                f"the loss (or its gradient) is not finite at {new_skips} step(s) since step "
                f"{self._healthy_until} (those steps were skipped)"
            )
        self._healthy_until = self.step + self.resume_step

    def _stop_non_finite(self, reason):
        step = self.step + self.resume_step
        if self.last_checkpoint:
            where = (
                f"the last good checkpoint is {self.last_checkpoint}: resume from it with "
                f"--resume_checkpoint {self.last_checkpoint}"
            )
        else:
            where = "no checkpoint was saved in this run"
        raise NonFiniteLossError(
            f"training stopped at step {step}: {reason}; nothing was saved after that; {where} "
            "and a lower --lr (or --use_fp16 False)"
        )

    def _update_ema(self, took_step):
        """
        Move every EMA towards the master weights, only if the step was taken (a device flag).

        # deviation from reference: one foreach lerp per rate instead of a Python loop over the
        # parameters, and the "taken" test happens on the device; the update is the same
        # rate * ema + (1 - rate) * weights (up to rounding).
        """
        masters = list(self.mp_trainer.master_params)
        for rate, params in zip(self.ema_rate, self.ema_params):
            weight = torch.where(took_step, 1.0 - rate, 0.0).to(masters[0].dtype)
            with torch.no_grad():
                torch._foreach_lerp_(list(params), masters, [weight] * len(masters))

    def _anneal_lr(self):
        if not self.lr_anneal_steps:
            return
        frac_done = (self.step + self.resume_step) / self.lr_anneal_steps
        lr = self.lr * (1 - frac_done)
        for param_group in self.opt.param_groups:
            param_group["lr"] = lr

    def log_step(self):
        logger.logkv("step", self.step + self.resume_step)
        logger.logkv("samples", (self.step + self.resume_step + 1) * self.global_batch)

    # ----------------------------------------------------------------------------- saving

    def checkpoint_step(self):
        """The number written into checkpoint names: optimizer steps taken, resume included."""
        return self.step + self.resume_step

    def save(self):
        """
        Write ema_<rate>_NNNNNN.pt for each rate, optNNNNNN.pt, stateNNNNNN.pt (every rank's RNG
        streams and data position, gathered to rank 0) and modelNNNNNN.pt, each atomically, on
        rank 0, then wait for every rank.

        # deviation from reference: NNNNNN is the number of steps taken, so that resuming from it
        # continues with the next step (the reference saves after step index N under the name N
        # and repeats step N on resume).

        :raises checkpoints.CheckpointWriteError: when a file cannot be written (disk full, no
            permission); this checkpoint's files are removed and the previous one is intact.
        """
        # Never write a broken state: this reads the loop's health flags (one synchronisation).
        self._check_health()
        step = self.checkpoint_step()
        folder = get_blob_logdir()
        model_path = os.path.join(folder, f"model{step:06d}.pt")
        # A collective: every rank's RNG and data position go to rank 0.
        state = train_state.gather(step, {"train": self.data}, self._shared_train_state())
        if dist_util.is_main_process():
            logger.log(f"saving model and EMA checkpoints at step {step}...")
            to_state_dict = self.mp_trainer.master_params_to_state_dict
            files = [
                (functools.partial(to_state_dict, params),
                 os.path.join(folder, f"ema_{rate}_{step:06d}.pt"))
                for rate, params in zip(self.ema_rate, self.ema_params)
            ]
            files.append((self.opt.state_dict, os.path.join(folder, f"opt{step:06d}.pt")))
            files.append((state, train_state.state_path(folder, step)))
            # The model file goes last: find_resume_checkpoint looks for it, so its presence means
            # the other files of that step are complete too.
            files.append(
                (functools.partial(to_state_dict, self.mp_trainer.master_params), model_path)
            )
            checkpoints.save_checkpoint_files(files, previous=self.last_checkpoint)
        self.last_checkpoint = model_path
        dist_util.barrier()


def _parameter_device(model):
    """The device of the model's first parameter (dist_util.dev() for a model without any)."""
    for param in model.parameters():
        return param.device
    return dist_util.dev()


def parse_ema_rates(ema_rate):
    """
    :param ema_rate: a float, a sequence of floats, or a comma-separated string like "0.999,0.9999".
    :return: a list of floats in (0, 1).
    """
    if isinstance(ema_rate, (int, float)):
        rates = [float(ema_rate)]
    elif isinstance(ema_rate, str):
        try:
            rates = [float(x) for x in ema_rate.split(",") if x.strip()]
        except ValueError:
            raise ValueError(
                f"--ema_rate must be comma-separated numbers like 0.9999, got {ema_rate!r}"
            ) from None
    else:
        rates = [float(x) for x in ema_rate]
    bad = [r for r in rates if not (0.0 < r < 1.0) or math.isnan(r)]
    if bad:
        raise ValueError(f"--ema_rate values must lie in (0, 1), got {bad}")
    return rates


def resolve_resume_checkpoint(resume_checkpoint):
    """
    :param resume_checkpoint: "" (fresh start), "auto" (newest complete checkpoint in the log
        directory, or a fresh start when there is none) or a modelNNNNNN.pt path.
    :return: the checkpoint path, or "" for a fresh start.
    :raises FileNotFoundError: when an explicit path does not exist.
    """
    if not resume_checkpoint:
        return ""
    if resume_checkpoint == "auto":
        found = find_resume_checkpoint()
        if found is None:
            logger.log(f"--resume_checkpoint auto: no checkpoint in {get_blob_logdir()}, starting fresh")
            return ""
        logger.log(f"--resume_checkpoint auto: resuming from {found}")
        return found
    if not os.path.exists(resume_checkpoint):
        raise FileNotFoundError(
            f"resume checkpoint not found: {resume_checkpoint} (pass a modelNNNNNN.pt file or auto)"
        )
    name = os.path.basename(resume_checkpoint)
    if name.startswith(("opt", "ema_", train_state.STATE_PREFIX)):
        raise ValueError(
            f"--resume_checkpoint takes the modelNNNNNN.pt file, not {name}: the EMA, optimizer "
            "and state files next to it are found automatically"
        )
    return resume_checkpoint


def parse_resume_step_from_filename(filename):
    """
    Parse filenames of the form path/to/modelNNNNNN.pt, where NNNNNN is the checkpoint's step.

    :return: the step, or 0 when the name has no "model<digits>" part.
    """
    parts = os.fspath(filename).split("model")
    if len(parts) < 2:
        return 0
    digits = parts[-1].split(".")[0]
    try:
        return int(digits)
    except ValueError:
        return 0


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


