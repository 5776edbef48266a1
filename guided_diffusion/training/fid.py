"""
A proxy FID while a diffusion model trains (--fid_interval N --fid_ref REF.npz --fid_samples K,
image_train.py; docs/training.md#a-proxy-fid-while-training).

Every N steps the run draws K samples with the EMA weights, by DDIM in --fid_steps steps, from
noise that is the same at every evaluation (sample i always starts from the noise of its own
torch.Generator seeded FID_SEED + i, and has class i % num_classes), takes their Inception pool
features and logs the Frechet distance to the reference batch's statistics as `fid`, with its
cost in seconds as `fid_seconds` and the step it was measured at as `fid_step`, through
logger.logkv: the same table, progress.csv and trackers (TensorBoard, wandb) as the loss.

It is a proxy: K samples, a few DDIM steps and the EMA weights of the moment, not the 50,000
samples and the paper's sampler a reported FID uses. The FID of K samples is biased upward by an
amount that shrinks roughly like 1/K (Chong & Forsyth 2020), so the curve is for comparing steps
of one run (and runs with the same K), not for comparing with published figures.

Multi-rank: the K samples are split among the ranks (rank r draws samples r*B .. of every
round of B per rank, never one another's), their features are gathered on rank 0
(dist_util.gather_objects), and rank 0 computes the distance while the other ranks train on.
Because every sample's noise depends only on its index, the K samples are the same for any
number of ranks and any batch size.

What it does not do: change training. Its noise comes from its own generators, the global random
streams are restored around it (watch._Quiet), the weights are swapped back bit for bit. A
failure while measuring (out of memory, a numerical error) is logged as a warning and training
goes on, so no checkpoint is lost to it; every rank learns of a failure on any rank before any
features are gathered, so no rank waits for another that gave up.
"""

import functools
import math
import os
import time

import numpy as np
import torch

from .. import dist_util, logger
from ..errors import ScriptError
from ..evaluation.inception import HOW_TO_GET_WEIGHTS, NUM_POOL_FEATURES, load_inception
from ..evaluation.metrics import FIDStatistics
from ..evaluation.npz import NpzArrayStream, npz_keys
from ..runtime.files import file_kind
from ..runtime.shapes import image_hw
from ..sampling.files import to_uint8
from .watch import _Quiet, sampling_diffusion

__all__ = ["FID_SEED", "ProxyFID", "check_fid_flags", "fid_keywords", "fid_noise",
           "fid_labels", "rank_indices", "reference_statistics"]

# The generator of sample i is seeded FID_SEED + i (apart from the grids' and the validation's).
FID_SEED = 1_000_000


def _weights_path(inception_path):
    """--inception_path, else where the evaluator looks (the torch hub cache, the folder)."""
    if inception_path:
        return inception_path
    from ..evaluation.evaluator import default_inception_path

    return default_inception_path()


@functools.lru_cache(maxsize=2)
def _inception_on_cpu(path, mtime):
    # Loaded once: checked at the start of the run, used by ProxyFID later (mtime: a file
    # replaced in between is read again).
    del mtime
    return load_inception(path, device="cpu")


def _load_weights(inception_path):
    path = _weights_path(inception_path)
    if path is None:
        raise FileNotFoundError(
            "--fid_interval needs the Inception weights, and none were given (--inception_path) "
            f"nor found in the torch hub cache or the current folder: {HOW_TO_GET_WEIGHTS}"
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--inception_path {path} does not exist: {HOW_TO_GET_WEIGHTS}")
    try:
        return _inception_on_cpu(os.path.realpath(path), os.path.getmtime(path))
    except ValueError as exc:
        raise ScriptError(f"--inception_path: {exc}") from None


def check_reference(path):
    """
    What --fid_ref holds, read from the npz's headers only (nothing is computed yet).

    :return: "statistics" (mu [2048] and sigma [2048 x 2048]) or "images" (arr_0: N >= 2 uint8
        N x H x W x 1 or 3 images).
    :raises FileNotFoundError, ScriptError: one line naming --fid_ref and what a reference
        batch holds.
    """
    holds = ("a reference batch is an npz with mu [2048] and sigma [2048 x 2048] (the "
             "reference's VIRTUAL_*.npz, make_ref_batch.py --stats True) or uint8 images "
             "N x H x W x 3 in arr_0")
    if not path:
        raise ScriptError(f"--fid_interval needs --fid_ref REF.npz: {holds}")
    if os.path.isdir(path) or not os.path.exists(path):
        raise FileNotFoundError(f"--fid_ref {path} is not a file: {holds}")
    kind = file_kind(path)
    if kind is not None:
        raise ScriptError(f"--fid_ref {path} is {kind}: {holds}")
    try:
        keys = set(npz_keys(path))
        if {"mu", "sigma"} <= keys:
            with np.load(path) as stored:
                mu_shape, sigma_shape = stored["mu"].shape, stored["sigma"].shape
            dim = NUM_POOL_FEATURES
            if mu_shape != (dim,) or sigma_shape != (dim, dim):
                raise ScriptError(
                    f"--fid_ref {path}: mu is {mu_shape} and sigma {sigma_shape}, but the "
                    f"Inception pool features have {dim} dimensions: {holds}"
                )
            return "statistics"
        if "arr_0" not in keys:
            raise ScriptError(f"--fid_ref {path} holds {', '.join(sorted(keys)) or 'nothing'}: "
                              f"{holds}")
        with NpzArrayStream(path=path, name="arr_0") as stream:
            shape, dtype = stream.shape, stream.dtype
    except (ValueError, OSError) as exc:
        if isinstance(exc, ScriptError):
            raise
        raise ScriptError(f"--fid_ref {path} cannot be read ({exc}): {holds}") from None
    if len(shape) != 4 or shape[-1] not in (1, 3) or dtype != np.uint8 or shape[0] < 2:
        raise ScriptError(
            f"--fid_ref {path}: arr_0 is {dtype} {tuple(shape)}, but {holds} (at least 2)"
        )
    return "images"


def check_fid_flags(args):
    """
    Refuse a proxy FID that cannot run, before any work and in one line: counts out of range,
    a missing or malformed reference batch, missing or wrong Inception weights. A no-op
    without --fid_interval (or for a script without the flags).

    :raises ValueError, FileNotFoundError, ScriptError: naming the flag to change.
    """
    interval = getattr(args, "fid_interval", 0)
    if interval < 0:
        raise ValueError(f"--fid_interval must be at least 0 (0 = never), got {interval}")
    if not interval:
        return
    if args.fid_samples < 2:
        raise ValueError(
            f"--fid_samples must be at least 2 (a covariance needs two samples), got "
            f"{args.fid_samples}; 1000-5000 make a usable proxy"
        )
    steps = args.diffusion_steps
    if not 1 <= args.fid_steps <= steps:
        raise ValueError(f"--fid_steps must be between 1 and --diffusion_steps {steps}, got "
                         f"{args.fid_steps}")
    channels = getattr(args, "in_channels", 3)
    if channels not in (1, 3):
        raise ScriptError(f"--fid_interval needs RGB or grey images for the Inception network "
                          f"(--in_channels 3 or 1), got --in_channels {channels}")
    check_reference(args.fid_ref)
    _load_weights(args.inception_path)


def reference_statistics(path, inception, device, batch_size=64):
    """
    The FIDStatistics of --fid_ref: its stored mu/sigma, or those of its images' Inception pool
    features (computed here, once).
    """
    if check_reference(path) == "statistics":
        with np.load(path) as stored:
            return FIDStatistics(mu=stored["mu"].astype(np.float64),
                                 sigma=stored["sigma"].astype(np.float64))
    from ..evaluation.evaluator import Evaluator

    evaluator = Evaluator(model=inception, device=device, batch_size=batch_size, progress=False)
    pool, _ = evaluator.read_activations(path)
    return FIDStatistics.from_features(pool)


def rank_indices(num_samples, batch_size, rank, world_size):
    """
    The sample indices rank `rank` draws, round by round: round j of the run holds samples
    j*B*W .. (j+1)*B*W - 1, of which rank r draws the r-th block of B (the last round may be
    short, and a rank may get an empty block). Disjoint over the ranks, covering range(K).

    :return: a list of index ranges, one per round with samples for this rank.
    """
    per_round = batch_size * world_size
    blocks = []
    for start in range(0, num_samples, per_round):
        first = start + rank * batch_size
        block = range(first, min(first + batch_size, num_samples))
        if len(block):
            blocks.append(block)
    return blocks


def fid_noise(indices, shape, seed=FID_SEED):
    """The starting noise of samples `indices`: sample i from its own generator seeded seed + i.
    :param shape: one sample's (C, H, W)."""
    return torch.stack([
        torch.randn(shape, generator=torch.Generator().manual_seed(seed + i)) for i in indices
    ])


def fid_labels(indices, num_classes):
    """Sample i's class: i % num_classes, so every class gets its share of the K samples."""
    return torch.tensor([i % num_classes for i in indices], dtype=torch.int64)


class ProxyFID:
    """
    The proxy FID of a TrainLoop: call it with the global step (the engine's periodic hook).

    :param task: the TrainLoop (model, device, ema_in_model, ema_rate).
    :param diffusion: the DDIM-respaced diffusion the samples are drawn with.
    :param reference: the reference's FIDStatistics (rank 0 needs them; None elsewhere).
    :param inception: the Inception network, on the task's device.
    :param num_samples: K, over all ranks.
    :param batch_size: samples per rank per round.
    :param sample_shape: one sample's (C, H, W).
    :param num_classes: class count of a class-conditional model (None: unconditional).
    :param ref_name: the reference batch's path, for the log line.
    """

    def __init__(self, task, diffusion, *, reference, inception, num_samples, batch_size,
                 sample_shape, num_classes=None, ref_name=""):
        self.task = task
        self.diffusion = diffusion
        self.reference = reference
        self.inception = inception
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.sample_shape = tuple(sample_shape)
        self.num_classes = num_classes
        self.ref_name = ref_name
        self.last = None  # the last FID measured (rank 0), for callers and tests

    def local_features(self):
        """This rank's share: {sample index: pool features [2048] float64}, as arrays."""
        task = self.task
        device = task.device
        indices, pools = [], []
        with task.ema_in_model(0), _Quiet(task.model, device):
            for block in rank_indices(self.num_samples, self.batch_size,
                                      dist_util.get_rank(), dist_util.get_world_size()):
                kwargs = {}
                if self.num_classes:
                    kwargs["y"] = fid_labels(block, self.num_classes).to(device)
                noise = fid_noise(block, self.sample_shape).to(device)
                sample = self.diffusion.ddim_sample_loop(
                    task.model, tuple(noise.shape), noise=noise, clip_denoised=True,
                    model_kwargs=kwargs, device=device,
                )
                images = to_uint8(sample.float())
                if images.shape[-1] == 1:
                    images = images.repeat(1, 1, 1, 3)  # how an RGB network sees grey
                pool, _ = self.inception(images)
                indices.extend(block)
                pools.append(pool.double().cpu())
        features = torch.cat(pools).numpy() if pools else np.zeros((0, NUM_POOL_FEATURES))
        return np.asarray(indices, dtype=np.int64), features

    def __call__(self, step):
        start = time.time()
        try:
            share, problem = self.local_features(), None
        except Exception as exc:  # noqa: BLE001 - any failure of the measurement, not training
            if dist_util.is_collective_failure(exc):
                raise
            share, problem = None, f"{type(exc).__name__}: {exc}"
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        # Every rank learns whether any failed before gathering, so none waits for a rank that
        # has given up.
        if dist_util.max_over_ranks(int(problem is not None)):
            where = problem or "on another rank"
            logger.warn(f"warning: step {step}: the proxy FID was not measured ({where}); "
                        "training goes on")
            return None
        gathered = dist_util.gather_objects(share)
        if not dist_util.is_main_process():
            return None
        try:
            indices = np.concatenate([part[0] for part in gathered])
            features = np.concatenate([part[1] for part in gathered])
            # In sample order, so the result does not depend on how the ranks split them.
            features = features[np.argsort(indices, kind="stable")]
            if len(features) != self.num_samples or len(np.unique(indices)) != self.num_samples:
                raise RuntimeError(f"gathered {len(features)} samples for {self.num_samples}")
            fid = FIDStatistics.from_features(features).frechet_distance(self.reference)
        except Exception as exc:  # noqa: BLE001
            logger.warn(f"warning: step {step}: the proxy FID was not computed "
                        f"({type(exc).__name__}: {exc}); training goes on")
            return None
        seconds = time.time() - start
        logger.logkv("fid", fid)
        logger.logkv("fid_step", step)
        logger.logkv("fid_seconds", seconds)
        weights = f"EMA {self.task.ema_rate[0]}" if self.task.ema_rate else "model"
        logger.log(
            f"step {step}: proxy FID {fid:.4f} of {self.num_samples} samples "
            f"({self.diffusion.num_timesteps} DDIM steps, {weights} weights) against "
            f"{self.ref_name} in {seconds:.1f} s"
        )
        self.last = fid
        return fid


class FIDPlan:
    """
    What train_from_flags prepares for a TrainLoop's proxy FID; the TrainLoop binds it to
    itself (bind) and hooks the result into its engine every `interval` steps.
    """

    def __init__(self, interval, **settings):
        self.interval = interval
        self.settings = settings

    def bind(self, task):
        return ProxyFID(task, **self.settings)


def fid_keywords(args, flags):
    """
    The TrainLoop keywords of --fid_interval for image_train.py: {} without it, else
    {"fid": FIDPlan}. Loads the Inception weights (checked at the start by check_fid_flags)
    onto this rank's device and, on rank 0, reads or computes the reference statistics.

    :param args: the parsed flags.
    :param flags: the model and diffusion flags the model was built from.
    """
    if not getattr(args, "fid_interval", 0):
        return {}
    check_fid_flags(args)  # again, for library callers that skipped start_run
    device = dist_util.dev()
    inception = _load_weights(args.inception_path).to(device)
    batch = args.microbatch if args.microbatch > 0 else args.batch_size
    reference = None
    if dist_util.is_main_process():
        started = time.time()
        reference = reference_statistics(args.fid_ref, inception, device, batch_size=batch)
        logger.log(f"proxy FID: reference statistics of {args.fid_ref} "
                   f"({time.time() - started:.1f} s)")
    height, width = image_hw(args.image_size)
    channels = getattr(args, "in_channels", 3)
    rounds = math.ceil(args.fid_samples / (batch * dist_util.get_world_size()))
    logger.log(
        f"proxy FID every {args.fid_interval} steps: {args.fid_samples} samples in {rounds} "
        f"rounds of {batch} per rank, {args.fid_steps} DDIM steps, against {args.fid_ref}"
    )
    plan = FIDPlan(
        args.fid_interval,
        diffusion=sampling_diffusion(flags, args.fid_steps),
        reference=reference,
        inception=inception,
        num_samples=args.fid_samples,
        batch_size=batch,
        sample_shape=(channels, height, width),
        num_classes=args.num_classes if args.class_cond else None,
        ref_name=args.fid_ref,
    )
    return {"fid": plan}
