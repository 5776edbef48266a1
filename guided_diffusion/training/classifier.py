"""
Training the noisy-image classifier of classifier guidance (Dhariwal & Nichol 2021, section 4.1):
it learns p(y | x_t, t) on images noised by the diffusion's forward process q(x_t | x_0) at
random timesteps (or on clean images with noised=False). A task of the one training engine, with
the reference's checkpoint layout (modelNNNNNN.pt, optNNNNNN.pt, plus stateNNNNNN.pt).
"""

import contextlib

import torch
import torch.nn.functional as F

from ..errors import ScriptError
from .loss_logging import log_loss_dict
from .engine import Trainer
from .mixed_precision import MixedPrecisionTask
from .options import TrainOptions

__all__ = ["ClassifierTrainLoop", "compute_top_k", "split_microbatches"]

# The reference starts the classifier's fp16 loss scale at 2**16 (the diffusion model's at 2**20).
CLASSIFIER_LG_LOSS_SCALE = 16.0


class ClassifierTrainLoop(MixedPrecisionTask):
    """
    Train a classifier on (noised) labelled images.

    :param model: the classifier (EncoderUNetModel), already on its device.
    :param diffusion: gives q_sample and the timestep range.
    :param data: training batches (images, {"y": labels}), as load_data(class_cond=True) returns.
    :param options: the run's TrainOptions (training.options): batch_size, lr, iterations (the
        run ends there, resumed steps included), anneal_lr (decay the rate linearly to 0 at
        iterations, the reference's), lr_schedule, lr_warmup_steps, weight_decay (AdamW),
        log_interval, save_interval, resume_checkpoint, max_steps, keep_checkpoints, grad_clip,
        init_checkpoint (fine-tune: start at step 0 with a fresh optimizer from the weights of
        this classifier checkpoint); or give them as keywords instead (run_options).
    :param microbatch: images per forward/backward pass (-1 or >= batch_size: the whole batch).
    :param schedule_sampler: the timestep sampler of the noised images (None: clean images, t=0).
    :param use_fp16: float16 torso with a dynamic loss scale (starting at 2**16).
    :param val_data: validation batches, evaluated every eval_interval steps, or None.
    :param eval_interval: steps between validation batches.
    :param weight_hints: keywords for cli.weights (flags, build) so that a checkpoint that does not
        fit names the flags to change.
    :param init_num_classes: with init_checkpoint, the model has this many classes and the output
        head's tensors sized by the class count start fresh (0: the checkpoint's classes).
    :param save_format: "pt" or "safetensors": the format of the model file (MixedPrecisionTask).
    """

    loss_key = "train_loss"

    def __init__(
        self,
        *,
        model,
        diffusion,
        data,
        options=None,
        microbatch=-1,
        schedule_sampler=None,
        use_fp16=False,
        val_data=None,
        eval_interval=5,
        weight_hints=None,
        init_num_classes=0,
        save_format="pt",
        **run_options,
    ):
        options = TrainOptions.build(self.option_defaults, options, **run_options)
        if eval_interval < 1:
            raise ValueError(f"--eval_interval must be at least 1, got {eval_interval}")
        self.diffusion = diffusion
        self.data = data
        self.val_data = val_data
        self.batch_size = options.batch_size
        self.microbatch = microbatch
        self.iterations = options.iterations
        self.schedule_sampler = schedule_sampler
        self.anneal_lr = options.anneal_lr
        self.eval_interval = eval_interval
        self._weight_hints = dict(weight_hints or {})
        self.init_num_classes = init_num_classes
        self.setup(
            model=model,
            options=options,
            use_fp16=use_fp16,
            initial_lg_loss_scale=CLASSIFIER_LG_LOSS_SCALE,
            save_format=save_format,
        )
        self.trainer = Trainer(self, data=data, options=options, streams={"val": val_data})

    def weight_hints(self):
        return self._weight_hints

    def adapt_init_state(self, state, path):
        """
        --init_num_classes: the output head's tensors whose size follows the class count (the
        last projection of every --classifier_pool) keep this model's fresh initialisation.
        """
        if not self.init_num_classes:
            return state, []
        fresh = self.model.state_dict()
        state = dict(state)
        notes = []
        for key, value in fresh.items():
            theirs = state.get(key)
            if key.startswith("out.") and theirs is not None and theirs.shape != value.shape:
                notes.append(f"{key}: {tuple(value.shape)} for {self.init_num_classes} classes "
                             f"(the checkpoint's {tuple(theirs.shape)} dropped)")
                state[key] = value
        if not notes:
            raise ScriptError(
                f"--init_num_classes {self.init_num_classes}: {path} already has "
                f"{self.init_num_classes} classes: drop --init_num_classes"
            )
        return state, notes

    def run_loop(self):
        self.trainer.run()

    def run_settings(self):
        return {**super().run_settings(), "--anneal_lr": self.anneal_lr}

    def train_step(self, batch, cond, step):
        self.forward_backward_log(batch, cond)
        self.mp_trainer.optimize_no_sync(self.opt)
        # deviation from reference: validation follows the global step (the reference counted
        # from the start of each run), so a resumed run validates where the uninterrupted run
        # does and draws the same random numbers.
        if self.val_data is not None and step % self.eval_interval == 0:
            val_batch, val_cond = next(self.val_data)
            no_sync = self.ddp_model.no_sync() if self.use_ddp else contextlib.nullcontext()
            with torch.no_grad(), no_sync:
                self.model.eval()
                self.forward_backward_log(val_batch, val_cond, prefix="val")
                self.model.train()

    def forward_backward_log(self, batch, cond, prefix="train"):
        """Loss, top-1/top-5 accuracy (per noise quarter too) and, for training, gradients."""
        device = self.device
        labels = cond["y"].to(device)
        batch = batch.to(device)
        if self.schedule_sampler is not None:
            # Noisy images (Dhariwal & Nichol 2021, section 4.1): x_t ~ q(x_t | x_0) at random t.
            t, _ = self.schedule_sampler.sample(batch.shape[0], device)
            batch = self.diffusion.q_sample(batch, t)
        else:
            t = torch.zeros(batch.shape[0], dtype=torch.long, device=device)

        for i, (sub_batch, sub_labels, sub_t) in enumerate(
            split_microbatches(self.microbatch, batch, labels, t)
        ):
            logits = self.ddp_model(sub_batch, timesteps=sub_t)
            loss = F.cross_entropy(logits, sub_labels, reduction="none")
            losses = {
                f"{prefix}_loss": loss.detach(),
                f"{prefix}_acc@1": compute_top_k(logits, sub_labels, k=1, reduction="none"),
                f"{prefix}_acc@5": compute_top_k(logits, sub_labels, k=5, reduction="none"),
            }
            log_loss_dict(self.diffusion, sub_t, losses)
            loss = loss.mean()
            if loss.requires_grad:
                if i == 0:
                    self.mp_trainer.zero_grad()
                self.mp_trainer.backward(loss * len(sub_batch) / len(batch))


def compute_top_k(logits, labels, k, reduction="mean"):
    """Top-k accuracy; k is capped at the number of classes."""
    _, top_ks = torch.topk(logits, min(k, logits.shape[-1]), dim=-1)
    hits = (top_ks == labels[:, None]).float().sum(dim=-1)
    if reduction == "mean":
        return hits.mean().item()
    return hits


def split_microbatches(microbatch, *args):
    """Yield the given tensors in slices of `microbatch` (-1 or >= the batch: all at once)."""
    bs = len(args[0])
    if microbatch == -1 or microbatch >= bs:
        yield tuple(args)
    else:
        for i in range(0, bs, microbatch):
            yield tuple(x[i : i + microbatch] if x is not None else None for x in args)
