"""
Watching a diffusion run while it trains, without changing it:

- SampleGrid (--sample_interval): rank 0 draws a grid of samples with the EMA weights, from the
  same noise and labels every time, with DDIM, into samples_stepNNNNNN.png in the log folder (and
  to TensorBoard when that output is on);
- Validation (--val_data_dir, --val_interval): every rank computes the loss terms on its share of
  a fixed validation subset, with fixed timesteps and noise, logged as val_loss, val_mse, val_vb
  and their noise quarters val_<key>_q0..q3, like the training ones.

Neither touches the training stream: their noise comes from torch.Generator objects of their own,
the global random streams (which the samplers and dropout use) are saved and restored around them,
the weights are put back bit for bit, and the data stream is not read. So the weights after N steps
are the same with and without them.
"""

import math
import os
import time

import numpy as np
import torch
from PIL import Image

from .. import dist_util, logger
from ..networks import label_embedding_of
from ..sampling.files import make_grid_png, to_uint8
from ..script_util import diffusion_from_flags
from .loss_logging import log_loss_dict

__all__ = ["SampleGrid", "Validation", "fixed_batches", "sampling_diffusion", "watch_keywords",
           "GRID_SAMPLES"]

# Images in a grid (for super-resolution: at most the first batch's size).
GRID_SAMPLES = 16
# Seeds of the grid's and the validation's own generators (fixed, so every grid and every
# validation of a run, and of runs with other --seed values, use the same draws).
GRID_SEED = 0
VAL_SEED = 1


class _Quiet:
    """Keep the global random streams (torch CPU and CUDA) as they were, and the model's mode."""

    def __init__(self, model, device):
        self.model = model
        self.devices = [device] if device.type == "cuda" else []

    def __enter__(self):
        self.fork = torch.random.fork_rng(devices=self.devices)
        self.fork.__enter__()
        self.was_training = self.model.training
        self.model.eval()
        self.no_grad = torch.no_grad()
        self.no_grad.__enter__()
        return self

    def __exit__(self, *exc):
        self.no_grad.__exit__(*exc)
        self.model.train(self.was_training)
        return self.fork.__exit__(*exc)


class SampleGrid:
    """
    Samples from fixed noise and fixed labels with the EMA weights, as a PNG grid.

    :param task: the MixedPrecisionTask (gives model, device and ema_in_model).
    :param diffusion: the sampling diffusion (respaced to --sample_steps).
    :param num_classes: labels of a class-conditional model: image i gets label i % num_classes.
    :param log_dir: where samples_stepNNNNNN.png goes.
    """

    # What a failure of it is called in the run's warning line (engine.Trainer.run_periodic).
    what = "the sample grid (--sample_interval)"

    def __init__(self, task, diffusion, num_classes, log_dir):
        self.task = task
        self.diffusion = diffusion
        self.num_classes = num_classes
        self.log_dir = log_dir
        self.noise = None
        self.model_kwargs = None

    def observe(self, batch, cond):
        """Take the shape (and a super-resolution model's low-resolution inputs) from the first
        training batch; later batches are ignored."""
        if self.noise is not None:
            return
        device = self.task.device
        count = GRID_SAMPLES
        kwargs = {}
        if "low_res" in cond:
            count = min(GRID_SAMPLES, len(batch))
            kwargs["low_res"] = cond["low_res"][:count].to(device).clone()
        if "y" in cond:
            classes = self.num_classes or int(label_embedding_of(self.task.model).num_embeddings)
            kwargs["y"] = (torch.arange(count) % classes).to(device)
        generator = torch.Generator().manual_seed(GRID_SEED)
        self.noise = torch.randn((count, *batch.shape[1:]), generator=generator).to(device)
        self.model_kwargs = kwargs

    def __call__(self, step):
        if not dist_util.is_main_process() or self.noise is None:
            return None
        start = time.time()
        task = self.task
        with task.ema_in_model(0), _Quiet(task.model, task.device):
            sample = self.diffusion.ddim_sample_loop(
                task.model,
                tuple(self.noise.shape),
                noise=self.noise,
                clip_denoised=True,
                model_kwargs=dict(self.model_kwargs),
                device=task.device,
            )
        images = to_uint8(sample.float()).cpu().numpy()
        path = os.path.join(self.log_dir, f"samples_step{step:06d}.png")
        # Atomically (a reader never sees half a PNG), under atomic_write's temporary name, which
        # the next start removes if this process is killed while writing it.
        make_grid_png(images, path)
        with Image.open(path) as grid:
            logger.log_image("samples", np.asarray(grid.convert("RGB")), step)
        weights = f"EMA {task.ema_rate[0]}" if task.ema_rate else "model"
        logger.log(
            f"step {step}: {len(images)} samples ({self.diffusion.num_timesteps} DDIM steps, "
            f"{weights} weights) in {path} ({time.time() - start:.1f} s)"
        )
        return path


def fixed_batches(data, num_images):
    """
    The first batches of a stream, on the host, holding num_images images in all (the last
    batch cut to fit): a fixed validation subset.

    :param data: an iterator of (images, kwargs) batches (e.g. load_data(deterministic=True,
        random_flip=False) of this rank's share).
    :param num_images: images to take (at least 1).
    """
    batches, taken = [], 0
    while taken < num_images:
        images, kwargs = next(data)
        keep = min(len(images), num_images - taken)
        batches.append((images[:keep], {k: v[:keep] for k, v in kwargs.items()}))
        taken += keep
    close = getattr(data, "close", None)
    if callable(close):
        close()  # the stream is not read again: stop its loader's workers now
    return batches


class Validation:
    """
    The diffusion loss terms on fixed batches with fixed timesteps and noise (the training
    weights, in eval mode: no dropout), logged with the prefix "val_".

    :param task: the TrainLoop (gives model, device, diffusion).
    :param batches: fixed_batches() of this rank.
    """

    what = "the validation (--val_data_dir, --val_interval)"

    def __init__(self, task, batches):
        self.task = task
        self.batches = batches
        self.draws = None

    def _fixed_draws(self):
        # Timesteps spread evenly over the schedule (each image its own, shuffled), so every
        # quarter is covered; the generator depends on the rank so ranks draw differently.
        diffusion = self.task.diffusion
        generator = torch.Generator().manual_seed(VAL_SEED + 1000 * dist_util.get_rank())
        total = sum(len(images) for images, _ in self.batches)
        steps = torch.floor((torch.arange(total) + 0.5) * diffusion.num_timesteps / total).long()
        steps = steps[torch.randperm(total, generator=generator)]
        draws, start = [], 0
        for images, _ in self.batches:
            t = steps[start : start + len(images)]
            noise = torch.randn(images.shape, generator=generator)
            draws.append((t, noise))
            start += len(images)
        return draws

    def __call__(self, step):
        if self.draws is None:
            self.draws = self._fixed_draws()
        task = self.task
        device = task.device
        with _Quiet(task.model, device):
            for (images, kwargs), (t, noise) in zip(self.batches, self.draws):
                kwargs = {k: v.to(device) for k, v in kwargs.items()}
                t = t.to(device)
                losses = task.diffusion.training_losses(
                    task.model, images.to(device), t, model_kwargs=kwargs, noise=noise.to(device)
                )
                log_loss_dict(task.diffusion, t, {f"val_{k}": v for k, v in losses.items()})


def sampling_diffusion(flags, steps):
    """
    The diffusion of the --sample_interval grids: the model's, respaced to `steps` DDIM steps
    (DDIM's own striding "ddimN" where an integer stride gives exactly N steps, else N evenly
    spread ones).

    :raises ValueError: when steps exceeds --diffusion_steps.
    """
    if steps > flags["diffusion_steps"]:
        raise ValueError(
            f"--sample_steps {steps} exceeds --diffusion_steps {flags['diffusion_steps']}: pass "
            "at most that many"
        )
    try:
        return diffusion_from_flags(flags, f"ddim{steps}")
    except ValueError:
        return diffusion_from_flags(flags, str(steps))


def watch_keywords(args, flags, load_val):
    """
    The TrainLoop keywords of --sample_interval and --val_data_dir for a diffusion training
    script.

    :param args: the parsed flags.
    :param flags: the model and diffusion flags the model was built from.
    :param load_val: folder -> a deterministic, unflipped batch stream of this rank's share.
    :return: {"num_classes", "sample_diffusion", "val_data"} as they apply.
    """
    keywords = dict(num_classes=args.num_classes)
    if args.sample_interval:
        keywords["sample_diffusion"] = sampling_diffusion(flags, args.sample_steps)
    if args.val_data_dir:
        share = math.ceil(args.val_num_images / dist_util.get_world_size())
        keywords["val_data"] = fixed_batches(load_val(args.val_data_dir), share)
        logger.log(f"validation: {share} images of {args.val_data_dir} per rank, every "
                   f"{args.val_interval} steps")
    return keywords
