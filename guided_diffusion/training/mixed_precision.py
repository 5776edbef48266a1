"""
The training task shared by the diffusion model, the super-resolution model and the noisy
classifier: AdamW on float32 master weights (MixedPrecisionTrainer, optionally with a float16 or
bfloat16 torso), EMA copies of the weights, and checkpoints in the reference's layout

    modelNNNNNN.pt, ema_<rate>_NNNNNN.pt (one per rate), optNNNNNN.pt, stateNNNNNN.pt

where the model and EMA files are plain state dicts (the released checkpoints are such files) and
the model file, written last, marks the set complete. With --save_format safetensors the model and
EMA files are modelNNNNNN.safetensors and ema_<rate>_NNNNNN.safetensors (the same state dicts);
the optimizer and state files stay .pt (they hold more than tensors).
"""

import contextlib
import copy
import functools
import math
import os
import re

import torch

from .. import dist_util, logger
from ..cli.weights import check_model_weights, load_model_weights
from ..errors import ScriptError
from ..fp16_util import MixedPrecisionTrainer, master_params_to_model_params
from ..runtime import checkpoints, train_state
from .ema import check_ema_warmup, ema_decay
from .engine import TrainTask, weights_suffix
from .options import make_optimizer

# With fp16 every overflow halves the loss scale; a scale below 2**MIN_LG_LOSS_SCALE means the
# losses themselves are broken (not just the gradients overflowing), so the run stops.
MIN_LG_LOSS_SCALE = 0.0


def parse_ema_rates(ema_rate):
    """
    :param ema_rate: a float, a sequence of floats, or a comma-separated string like "0.999,0.9999"
        ("" or an empty sequence: no EMA).
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


def parameter_device(model):
    """The device of the model's first parameter (dist_util.dev() for a model without any)."""
    for param in model.parameters():
        return param.device
    return dist_util.dev()


def ema_file_beside(model_path, step, rate):
    """
    The ema_<rate>_NNNNNN file of a checkpoint set: in the model file's format first (.pt or
    .safetensors), else in the other one; None when there is neither.
    """
    model_path = os.fspath(model_path)
    ours = ".safetensors" if model_path.endswith(".safetensors") else ".pt"
    base = os.path.join(os.path.dirname(model_path), f"ema_{rate}_{step:06d}")
    for suffix in (ours, *(s for s in checkpoints.SUFFIXES if s != ours)):
        if os.path.exists(base + suffix):
            return base + suffix
    return None


class MixedPrecisionTask(TrainTask):
    """
    Weights, optimizer, EMA and checkpoint files of a network trained with AdamW on float32
    masters. Subclasses write train_step (forward/backward on self.ddp_model, then self.optimize()).

    Call setup() from the subclass's constructor, then build the Trainer (which loads a
    checkpoint to resume from through load_checkpoint).

    A step never waits for the device: whether it was taken, the loss scale and the logged norms
    stay device tensors; a step with a non-finite loss or gradient is skipped on the device and
    reported by health_problem at the next log interval or save.
    """

    checkpoint_prefix = "model"

    def setup(
        self,
        *,
        model,
        options,
        ema_rate=(),
        use_fp16=False,
        use_bf16=False,
        fp16_scale_growth=1e-3,
        initial_lg_loss_scale=None,
        ema_warmup_power=0.0,
        ema_inv_gamma=1.0,
        save_format="pt",
    ):
        """
        :param model: the network, already on its device; batches go to that device.
        :param options: the run's TrainOptions: AdamW's lr and weight_decay, and grad_clip (> 0
            clips the global gradient norm to it, MixedPrecisionTrainer).
        :param ema_rate: EMA decays (see parse_ema_rates); none for the classifier.
        :param use_fp16: float16 torso with a dynamic loss scale.
        :param use_bf16: bfloat16 torso (no loss scale); exclusive with use_fp16.
        :param fp16_scale_growth: lg_loss_scale increase per successful fp16 step.
        :param initial_lg_loss_scale: the starting log2 loss scale (None: the trainer's default).
        :param ema_warmup_power: > 0 warms the EMA decay up (see ema_decay); 0 keeps the
            reference's constant decay.
        :param ema_inv_gamma: the warm-up's step scale (see ema_decay).
        :param save_format: "pt" or "safetensors": the format of the model and EMA files.
        """
        if use_fp16 and use_bf16:
            raise ValueError("--use_fp16 and --use_bf16 exclude each other: pick one")
        check_ema_warmup(ema_warmup_power, ema_inv_gamma)
        self.checkpoint_suffix = weights_suffix(save_format)
        self.ema_warmup_power = ema_warmup_power
        self.ema_inv_gamma = ema_inv_gamma
        self.model = model
        self.options = options
        self.lr = options.lr
        self.weight_decay = options.weight_decay
        self.ema_rate = parse_ema_rates(ema_rate)
        self.use_fp16 = use_fp16
        self.use_bf16 = use_bf16
        self.fp16_scale_growth = fp16_scale_growth
        # deviation from reference: the reference sends batches to dist_util.dev(); the model's
        # own device is the same in the scripts and also right for a caller that chose another
        # (e.g. a CPU benchmark on a machine with a GPU).
        self.device = parameter_device(model)
        # The weights must be equal on every rank before training; DDP then keeps them equal.
        dist_util.sync_params(self.model.parameters())
        extra = {} if initial_lg_loss_scale is None else {"initial_lg_loss_scale": initial_lg_loss_scale}
        self.mp_trainer = MixedPrecisionTrainer(
            model=self.model,
            use_fp16=use_fp16,
            fp16_scale_growth=fp16_scale_growth,
            use_bf16=use_bf16,
            grad_clip=options.grad_clip,
            **extra,
        )
        self.opt = make_optimizer(self.mp_trainer.master_params, options)
        self.ema_params = [copy.deepcopy(self.mp_trainer.master_params) for _ in self.ema_rate]
        self.ddp_model = dist_util.wrap_ddp(self.model)
        self.use_ddp = self.ddp_model is not self.model
        # Skipped steps already reported by health_problem (the trainer counts on the device).
        self._skips_seen = 0

    # ----------------------------------------------------------------------------- a step

    def optimize(self, step=None):
        """
        The optimizer step after the gradients were accumulated, then the EMA update.

        :param step: the index of this step (for the EMA warm-up; None: no warm-up).
        """
        took_step = self.mp_trainer.optimize_no_sync(self.opt)
        self.update_ema(took_step, step)
        return took_step

    def update_ema(self, took_step, step=None):
        """
        Move every EMA towards the master weights, only if the step was taken (a device flag).

        # deviation from reference: one foreach lerp per rate instead of a Python loop over the
        # parameters, and the "taken" test happens on the device; the update is the same
        # rate * ema + (1 - rate) * weights (up to rounding).

        :param step: the index of the step just taken; with --ema_warmup_power > 0 the decay
            is ema_decay(rate, step, ...), a host number computed from it.
        """
        masters = list(self.mp_trainer.master_params)
        for rate, params in zip(self.ema_rate, self.ema_params):
            if step is not None:
                rate = ema_decay(rate, step, self.ema_warmup_power, self.ema_inv_gamma)
            weight = torch.where(took_step, 1.0 - rate, 0.0).to(masters[0].dtype)
            with torch.no_grad():
                torch._foreach_lerp_(list(params), masters, [weight] * len(masters))

    def health_problem(self):
        """
        Steps skipped for non-finite values (float32/bfloat16: fatal), or an fp16 loss scale
        below 1 (every step overflows). Reads two numbers from the device.
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
                    f"Found NaN in {new_skips} of the recent steps: skipped them and decreased "
                    f"lg_loss_scale to {lg_loss_scale:.3f}"
                )
            if lg_loss_scale < MIN_LG_LOSS_SCALE:
                return "the fp16 loss scale fell below 1 (every step overflows; try bf16 or fp32)"
            return None
        if new_skips:
            return (
                f"the loss (or its gradient) is not finite at {new_skips} recent step(s) (those "
                "steps were skipped)"
            )
        return None

    # ----------------------------------------------------------------------------- checkpoints

    def shared_state(self):
        return {"lg_loss_scale": train_state.loss_scale(self.mp_trainer)}

    def load_shared_state(self, shared):
        if "lg_loss_scale" in shared:
            train_state.set_loss_scale(self.mp_trainer, shared["lg_loss_scale"])

    def checkpoint_files(self, folder, step, state):
        to_state_dict = self.mp_trainer.master_params_to_state_dict
        weights = self.checkpoint_suffix
        files = [
            (functools.partial(to_state_dict, params),
             os.path.join(folder, f"ema_{rate}_{step:06d}{weights}"))
            for rate, params in zip(self.ema_rate, self.ema_params)
        ]
        files.append((self.opt.state_dict, os.path.join(folder, f"opt{step:06d}.pt")))
        files.append((state, train_state.state_path(folder, step)))
        # The model file goes last: its presence means the other files of the step are complete.
        files.append(
            (functools.partial(to_state_dict, self.mp_trainer.master_params),
             os.path.join(folder, f"{self.checkpoint_prefix}{step:06d}{weights}"))
        )
        return files

    def checkpoint_set_paths(self, folder, step):
        """The set's files in `folder`: the model file (the marker) first, then every EMA rate's
        (also rates this run does not train), the optimizer and the training state; model and
        EMA files in either format (.pt, .safetensors)."""
        digits = f"{step:06d}"
        markers = [os.path.join(folder, f"{self.checkpoint_prefix}{digits}{suffix}")
                   for suffix in checkpoints.SUFFIXES]
        ema = re.compile(r"ema_.+_" + re.escape(digits) + r"(\.pt|\.safetensors)")
        companions = sorted(os.path.join(folder, n) for n in os.listdir(folder) if ema.fullmatch(n))
        companions += [os.path.join(folder, f"opt{digits}.pt"),
                       train_state.state_path(folder, step)]
        return [p for p in markers + companions if os.path.exists(p)]

    def init_from_checkpoint(self, path):
        """
        --init_checkpoint: load the weights of `path` (a released checkpoint, or any model or
        EMA file), at step 0 with a fresh optimizer and every EMA starting from the weights.
        Subclasses may re-initialise some tensors first (adapt_init_state); everything else must
        fit exactly, or the error names the flags to change.
        """
        logger.log(f"--init_checkpoint: starting from the weights of {path} (step 0, fresh "
                   "optimizer, EMA from the weights)")
        state = dist_util.load_state_dict(path, map_location=self.device)
        state, notes = self.adapt_init_state(state, path)
        try:
            self.load_model_state(state, path)
        except ScriptError as exc:
            raise ScriptError(f"--init_checkpoint: {exc}{self.init_mismatch_advice(state)}") \
                from None
        if notes:
            for note in notes:
                logger.log(f"--init_checkpoint: re-initialised {note}")
        else:
            logger.log("--init_checkpoint: re-initialised nothing; every tensor loaded")

    def init_mismatch_advice(self, state):
        """Hook of init_from_checkpoint: text appended to the error of a checkpoint that does
        not fit (e.g. the fine-tuning flags that would re-initialise the tensor at fault)."""
        return ""

    def adapt_init_state(self, state, path):
        """
        Hook of init_from_checkpoint: return (the state dict to load, a list of lines naming
        each re-initialised tensor). The default changes nothing.
        """
        return state, []

    @contextlib.contextmanager
    def ema_in_model(self, index=0):
        """
        Run the block with the model holding EMA rate number `index`'s weights (the model's own
        weights when there is no EMA), and put the training weights back afterwards, bit for bit.

        float32: the parameters' storage is swapped with the EMA's (no copy); fp16/bf16: the EMA
        masters are cast into the torso, then the training masters (which the torso always
        holds, rounded) are cast back.
        """
        if not self.ema_params:
            yield
            return
        ema = list(self.ema_params[index])
        trainer = self.mp_trainer
        groups = trainer.param_groups_and_shapes
        params = list(self.model.parameters())
        if groups is None:
            self._swap_data(params, ema)
            try:
                yield
            finally:
                self._swap_data(params, ema)
        else:
            with torch.no_grad():
                master_params_to_model_params(groups, ema)
            try:
                yield
            finally:
                with torch.no_grad():
                    master_params_to_model_params(groups, trainer.master_params)

    @staticmethod
    def _swap_data(params, others):
        for param, other in zip(params, others):
            param.data, other.data = other.data, param.data

    def load_checkpoint(self, path, step):
        """
        Load the model weights of `path`, then (when step > 0) the optimizer and every EMA rate
        found beside it, and return the training state beside it (None for a checkpoint without
        one: a released or reference checkpoint restarts the random streams).
        """
        logger.log(f"loading model from checkpoint: {path}...")
        state = dist_util.load_state_dict(path, map_location=self.device)
        self.load_model_state(state, path)
        if not step:
            # A released checkpoint (no step in its name): its weights only, as the reference.
            return None
        self._load_optimizer_state(path, step)
        # After the optimizer, so that a missing EMA file falls back to the restored weights.
        self.ema_params = [self._load_ema_parameters(path, step, rate) for rate in self.ema_rate]
        return train_state.load_beside(path, step)

    def load_model_state(self, state, path):
        """Load a model state dict into the model and the master weights (exact float32)."""
        load_model_weights(self.model, state, path, **self.weight_hints())
        trainer = self.mp_trainer
        if trainer.param_groups_and_shapes is not None:
            # The torso is fp16/bf16: the masters take the checkpoint's exact float32 values and
            # the model takes them rounded, as if it had been converted after loading.
            masters = trainer.state_dict_to_master_params(state)
            with torch.no_grad():
                for master, value in zip(trainer.master_params, masters):
                    master.copy_(value)
            master_params_to_model_params(trainer.param_groups_and_shapes, trainer.master_params)
        dist_util.sync_params(trainer.master_params)
        for params in self.ema_params:
            with torch.no_grad():
                for ema, master in zip(params, trainer.master_params):
                    ema.copy_(master)

    def weight_hints(self):
        """flags/build keywords for cli.weights (how to name the flags of a mismatch)."""
        return {}

    def _load_ema_parameters(self, path, step, rate):
        ema_params = copy.deepcopy(self.mp_trainer.master_params)
        ema_path = ema_file_beside(path, step, rate)
        if ema_path is None:
            # deviation from reference: the reference silently restarts the EMA from the model.
            logger.warn(
                f"no ema_{rate}_{step:06d}.pt (or .safetensors) next to {path}: the EMA with rate "
                f"{rate} restarts from the model weights"
            )
        else:
            logger.log(f"loading EMA from checkpoint: {ema_path}...")
            state = dist_util.load_state_dict(ema_path, map_location=self.device)
            check_model_weights(self.model, state, ema_path)
            ema_params = self.mp_trainer.state_dict_to_master_params(state)
        dist_util.sync_params(ema_params)
        return ema_params

    def _load_optimizer_state(self, path, step):
        opt_path = os.path.join(os.path.dirname(path), f"opt{step:06d}.pt")
        if not os.path.exists(opt_path):
            logger.warn(f"no {opt_path}: the optimizer state (Adam moments) restarts from zero")
            return
        logger.log(f"loading optimizer state from checkpoint: {opt_path}")
        state = dist_util.load_state_dict(opt_path, map_location=self.device)
        if not (isinstance(state, dict) and "param_groups" in state):
            raise ValueError(f"{opt_path} is not an optimizer checkpoint")
        try:
            self.opt.load_state_dict(state)
        except ValueError as exc:
            raise ValueError(f"{opt_path} does not fit this model's optimizer ({exc})") from None
