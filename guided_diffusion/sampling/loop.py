"""
What the sampling scripts share: building the sampling function a --sampler names, getting a
loaded network ready (device, fp16/bf16 torso, eval mode, channels-last, compile), drawing batches
round after round on every rank and gathering them in rank order, and writing the result.
"""

import errno
import functools
import math
import os
import tempfile

import numpy as np
from tqdm.auto import tqdm

from .. import dist_util, logger
from ..cli.weights import load_checkpoint_into
from ..diffusion import solvers
from ..diffusion.denoiser import solver_sample_loop
from ..errors import ScriptError
from ..runtime.perf import compile_model, to_channels_last
from ..script_util import diffusion_from_flags
from . import files as sample_files


def check_sampling_flags(args):
    """
    Refuse, before any work, what would only fail once samples were drawn: --num_samples or
    --batch_size below 1, and an --out_dir that cannot be written.

    :param args: the parsed flags (those it has of num_samples, batch_size, out_dir are checked).
    :raises ScriptError: naming the flag.
    """
    # deviation from reference: the reference divides by --batch_size (ZeroDivisionError), fails
    # to concatenate no batches, and finds an unwritable folder only when it saves.
    for name in ("num_samples", "batch_size"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ScriptError(f"--{name} must be at least 1, got {value}")
    out_dir = getattr(args, "out_dir", "")
    if out_dir and "://" not in out_dir:
        check_writable_folder(out_dir, "--out_dir")


def check_writable_folder(folder, flag):
    """
    :raises ScriptError: unless `folder` is, or could be created as, a folder this process can
        write to (tried with a temporary file in it or in its nearest existing parent, which is
        removed again: nothing is left behind).
    """
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    try:
        if not os.path.isdir(existing):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), existing)
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise ScriptError(
            f"cannot write to {flag} {folder} ({exc.strerror or exc}: {existing}): pass a folder "
            "you can write to"
        ) from None


def num_rounds(num_samples, batch_size):
    """Sampling rounds needed for num_samples when every rank makes batch_size per round."""
    return math.ceil(num_samples / (batch_size * dist_util.get_world_size()))


def gather_samples(num_samples, batch_size, make_batch, progress=True, desc="sampling",
                   steps_per_batch=None):
    """
    Run make_batch() round after round on every rank and gather the batches in rank order, until
    num_samples images exist (as the reference: the last round may overshoot; the excess is cut).

    :param make_batch: a function returning (uint8 NHWC images, int64 labels or None); with
        steps_per_batch it is called as make_batch(bar) and passes bar as the sampling loop's
        progress= (the loop advances it once per denoising step).
    :param progress: show a progress bar on rank 0.
    :param steps_per_batch: the denoising steps of one batch (sample_steps()): the bar then
        counts every step of the whole run, so a run of one large batch still moves; without it
        the bar counts rounds.
    :return: (images array [num_samples, H, W, C], labels array or None), on every rank.
    """
    if num_samples < 1 or batch_size < 1:
        raise ScriptError(
            f"num_samples and batch_size must be at least 1, got {num_samples} and {batch_size}")
    images, labels = [], []
    show = progress and dist_util.is_main_process()
    rounds = num_rounds(num_samples, batch_size)
    if steps_per_batch is None:
        batches = (make_batch() for _ in tqdm(range(rounds), disable=not show, desc=desc))
    else:
        bar = tqdm(total=rounds * steps_per_batch, disable=not show, desc=desc, unit="step")
        batches = (make_batch(bar) for _ in range(rounds))
    for batch_images, batch_labels in batches:
        images.extend(t.cpu().numpy() for t in dist_util.all_gather_tensors(batch_images))
        if batch_labels is not None:
            labels.extend(t.cpu().numpy() for t in dist_util.all_gather_tensors(batch_labels))
        logger.log(f"created {sum(len(x) for x in images)} samples")
    if steps_per_batch is not None:
        bar.close()
    arr = np.concatenate(images, axis=0)[:num_samples]
    label_arr = np.concatenate(labels, axis=0)[:num_samples] if labels else None
    return arr, label_arr


def write_samples(arr, label_arr, out_dir):
    """
    Save samples_NxHxWx3.npz (+ PNG grid) on rank 0, then wait for every rank.

    :return: the npz path (on every rank).
    """
    shape_str = "x".join(str(s) for s in arr.shape)
    path = os.path.join(out_dir, f"samples_{shape_str}.npz")
    if dist_util.is_main_process():
        logger.log(f"saving to {path}")
        path = sample_files.save_samples(arr, label_arr, out_dir)
    dist_util.barrier()
    return path


def prepare_network(model, *, use_fp16=False, use_bf16=False, compile=False, channels_last=False):
    """
    Get a loaded network ready to sample with: move it to the compute device, convert its torso
    to float16 or bfloat16, switch to eval mode, optionally store it channels-last and
    torch.compile its forward.

    # deviation from reference: --use_bf16 (an addition) converts the torso like --use_fp16,
    # instead of running float32 weights under autocast (a cast of every weight at every call).

    :return: the same model.
    """
    if use_fp16 and use_bf16:
        raise ScriptError("--use_fp16 and --use_bf16 exclude each other: pick one")
    model.to(dist_util.dev())
    if use_fp16:
        model.convert_to_fp16()
    elif use_bf16:
        model.convert_to_bf16()
    model.eval()
    to_channels_last(model, channels_last)
    return compile_model(model, compile)


def output_dir(args):
    """The folder outputs go to: --out_dir, else the logger's folder."""
    folder = getattr(args, "out_dir", "") or logger.get_dir()
    os.makedirs(folder, exist_ok=True)
    return folder


# ---------------------------------------------------------------------------------- npz files


# The samplers of the scripts' --sampler flag: the diffusion's own loops, then the ODE solvers.
SAMPLER_NAMES = ("ddpm", "ddim") + tuple(solvers.SOLVERS)


def resolve_sampler(sampler, use_ddim):
    """
    The sampler a script runs: --sampler when given, else ddim with --use_ddim True and ddpm
    without (the reference's behaviour).

    :raises ValueError: for an unknown name, or --use_ddim True with another --sampler.
    """
    if not sampler:
        return "ddim" if use_ddim else "ddpm"
    if sampler not in SAMPLER_NAMES:
        raise ValueError(f"unknown --sampler {sampler!r}; known samplers: {', '.join(SAMPLER_NAMES)}")
    if use_ddim and sampler != "ddim":
        raise ValueError(
            f"--use_ddim True asks for ddim but --sampler is {sampler}: pass only one of them"
        )
    return sampler


def make_sample_fn(sampler, diffusion, flags):
    """
    The sampling loop of a script for a resolved sampler name, called like p_sample_loop:
    fn(model, shape, noise=None, clip_denoised=..., denoised_fn=..., cond_fn=...,
    model_kwargs=..., device=..., progress=...).

    For ddpm and ddim it is the diffusion's own loop over its (respaced) steps. For the ODE
    solvers the number of respaced steps is the budget of model evaluations, and the solver
    runs on the diffusion over all steps, rebuilt from the flags.

    :param sampler: a name from resolve_sampler.
    :param diffusion: the diffusion built from the flags (respaced by --timestep_respacing).
    :param flags: the diffusion flags (diffusion_steps, noise_schedule, learn_sigma, ...).
    :raises ValueError: when the budget is too small for the solver.
    """
    if sampler == "ddpm":
        return diffusion.p_sample_loop
    if sampler == "ddim":
        return diffusion.ddim_sample_loop
    evaluations = diffusion.num_timesteps
    solvers.steps_for_evaluations(sampler, evaluations)  # refuse a too small budget now
    full = diffusion_from_flags(flags, "")
    return functools.partial(solver_sample_loop, full, sampler=sampler, evaluations=evaluations)


def sample_steps(sampler, diffusion):
    """
    The denoising steps one call of make_sample_fn(sampler, diffusion, ...) takes: the
    (respaced) steps of ddpm and ddim, the solver steps its evaluation budget buys otherwise.
    """
    if sampler in ("ddpm", "ddim"):
        return diffusion.num_timesteps
    return solvers.steps_for_evaluations(sampler, diffusion.num_timesteps)


def load_sampling_model(flags, model_path, **network):
    """
    Build the UNet of create_model_and_diffusion(**flags), load a checkpoint into it (errors
    name the flags to change), and get it ready with prepare_network.

    :param flags: the model_and_diffusion_defaults() flags plus num_classes.
    :param model_path: the checkpoint file.
    :param network: prepare_network keywords (network_flags(args)); use_fp16 defaults to
        flags["use_fp16"].
    :return: the model (compiled when network["compile"]).
    """
    from ..script_util import create_model_and_diffusion

    network.setdefault("use_fp16", bool(flags.get("use_fp16")))
    model, _ = create_model_and_diffusion(**flags)
    load_checkpoint_into(model, model_path, flags, build=lambda f: create_model_and_diffusion(**f)[0])
    return prepare_network(model, **network)
