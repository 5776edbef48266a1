"""
Library code shared by the reference scripts: loading checkpoints into networks built from flags
(with errors that name the flag to change), seeding, the classifier-guidance gradient, the sampling
loop that gathers every rank's batches in rank order, and the one-line error handling of the
scripts' main functions.
"""

import math
import os
import sys
import traceback

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import dist_util, logger, sample_util
from .flag_hints import explain_state_dict_mismatch
from .perf_util import (
    compile_model,
    performance_defaults,
    preserved_float32_precision,
    to_channels_last,
)


class ScriptError(ValueError):
    """Bad input to a script; the message says what to change."""


# ---------------------------------------------------------------------------------- errors


def run_main(main, argv=None):
    """
    Run a script's main(argv) and turn bad input into one line "error: ..." and exit status 2,
    instead of a traceback.

    ValueError (ScriptError, unreadable images, ...), FileNotFoundError and NotImplementedError
    (an unknown schedule sampler) count as bad input. Set GD_TRACEBACK=1 to see the traceback.

    :param main: a function taking argv (or None for sys.argv).
    :param argv: passed to main.
    """
    from .train_util import NonFiniteLossError

    try:
        # Scripts may switch TF32 on (--tf32); a caller running main() in-process gets its own
        # settings back.
        with preserved_float32_precision():
            return main(argv)
    except (ValueError, FileNotFoundError, NotADirectoryError, NotImplementedError,
            NonFiniteLossError) as exc:
        if os.environ.get("GD_TRACEBACK"):
            traceback.print_exc()
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        prefix = "error" if dist_util.get_rank() == 0 else f"error (rank {dist_util.get_rank()})"
        print(f"{prefix}: {message}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        if dist_util.is_distributed():
            # Other ranks may wait in a collective for this one; leaving without the normal
            # shutdown (MPI_Finalize, process-group teardown) lets the launcher end them instead
            # of everyone hanging.
            os._exit(2)
        sys.exit(2)


# ---------------------------------------------------------------------------------- seeding


def seed_sampling(seed):
    """
    Seed torch's global RNG with seed + rank, so that one process with seed S draws exactly what
    a reference run seeded with torch.manual_seed(S) at that point draws, and ranks never repeat
    each other's samples. Call it after the models are loaded, right before sampling.
    """
    torch.manual_seed(seed + dist_util.get_rank())


def seed_training(seed):
    """
    Seed torch, numpy and random with seed + rank: timesteps (numpy), noise (torch) and data
    order then differ across ranks and repeat across runs.
    """
    import random

    value = seed + dist_util.get_rank()
    torch.manual_seed(value)
    np.random.seed(value % 2**32)
    random.seed(value)


# ---------------------------------------------------------------------------------- checkpoints

def check_model_weights(model, state_dict, path, flags=None, build=None):
    """
    Check that a checkpoint fits a network before loading it.

    :param model: the network built from the flags.
    :param state_dict: the loaded checkpoint.
    :param path: the checkpoint's file name (for messages).
    :param flags: the dict of flags the network was built from; with `build`, enables the search
        for the flag changes that make the checkpoint fit.
    :param build: a function flags -> network (called on the meta device: no memory, no init).
    :raises ScriptError: naming the flags to change when it does not fit.
    """
    problem = explain_state_dict_mismatch(model, state_dict, flags=flags, build=build)
    if problem:
        raise ScriptError(f"checkpoint {path} does not fit the model flags: {problem}")


def load_model_weights(model, state_dict, path, flags=None, build=None):
    """
    check_model_weights, then load_state_dict(strict=True).
    """
    check_model_weights(model, state_dict, path, flags=flags, build=build)
    model.load_state_dict(state_dict, strict=True)


def load_checkpoint_into(model, path, flags=None, build=None):
    """
    Read a model checkpoint (torch.load(weights_only=True)) and load it into `model`.

    :raises FileNotFoundError: when path is missing or empty.
    :raises ScriptError / ValueError: when it is corrupt or does not fit the flags.
    """
    if not path:
        raise ScriptError("no checkpoint given: pass --model_path (or --classifier_path) FILE")
    state = dist_util.load_state_dict(path, map_location="cpu")
    load_model_weights(model, state, path, flags=flags, build=build)


# ---------------------------------------------------------------------------------- guidance


def make_classifier_cond_fn(classifier, classifier_scale):
    """
    The guidance gradient of Dhariwal & Nichol 2021 (Algorithm 1): s * grad_x log p_phi(y | x_t).

    :param classifier: a noisy-image classifier taking (x, t) and returning logits.
    :param classifier_scale: the guidance scale s.
    :return: cond_fn(x, t, y=None) for the samplers.
    """

    def cond_fn(x, t, y=None):
        if y is None:
            raise ValueError("classifier guidance needs class labels y")
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            logits = classifier(x_in, t)
            log_probs = F.log_softmax(logits, dim=-1)
            # gather rather than indexing with range(N): that index would be built on the host
            # and copied to the device at every step (a synchronisation on a GPU).
            selected = log_probs.gather(1, y.view(-1, 1).to(logits.device)).squeeze(1)
            return torch.autograd.grad(selected.sum(), x_in)[0] * classifier_scale

    return cond_fn


# ---------------------------------------------------------------------------------- sampling


def num_rounds(num_samples, batch_size):
    """Sampling rounds needed for num_samples when every rank makes batch_size per round."""
    return math.ceil(num_samples / (batch_size * dist_util.get_world_size()))


def gather_samples(num_samples, batch_size, make_batch, progress=True, desc="sampling"):
    """
    Run make_batch() round after round on every rank and gather the batches in rank order, until
    num_samples images exist (as the reference: the last round may overshoot; the excess is cut).

    :param make_batch: a function returning (uint8 NHWC images, int64 labels or None).
    :param progress: show a progress bar over the rounds on rank 0.
    :return: (images array [num_samples, H, W, C], labels array or None), on every rank.
    """
    images, labels = [], []
    show = progress and dist_util.is_main_process()
    for _ in tqdm(range(num_rounds(num_samples, batch_size)), disable=not show, desc=desc):
        batch_images, batch_labels = make_batch()
        images.extend(t.cpu().numpy() for t in dist_util.all_gather_tensors(batch_images))
        if batch_labels is not None:
            labels.extend(t.cpu().numpy() for t in dist_util.all_gather_tensors(batch_labels))
        logger.log(f"created {sum(len(x) for x in images)} samples")
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
        path = sample_util.save_samples(arr, label_arr, out_dir)
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


def network_flags(args):
    """The prepare_network keywords a sampling script's parsed flags give for its main network."""
    return dict(
        use_fp16=args.use_fp16,
        use_bf16=args.use_bf16,
        compile=args.compile,
        channels_last=args.channels_last,
    )


def sampling_extra_defaults():
    """
    Flags the sampling scripts add to the reference's; each default keeps reference behaviour.

    seed: torch.manual_seed(seed + rank) right before the sampling loop.
    num_classes: label count of class-conditional models and classifiers (reference: 1000).
    log_dir: the logger's folder ("" = $OPENAI_LOGDIR, else a dated temp folder).
    out_dir: where the npz files go ("" = the log folder, as the reference).
    progress: progress bars on rank 0.
    use_bf16: the networks' torsos in bfloat16 (like use_fp16).
    compile, tf32, channels_last: see perf_util.performance_defaults().
    """
    return dict(
        seed=0, num_classes=1000, log_dir="", out_dir="", progress=True, use_bf16=False,
        **performance_defaults(),
    )


def output_dir(args):
    """The folder outputs go to: --out_dir, else the logger's folder."""
    folder = getattr(args, "out_dir", "") or logger.get_dir()
    os.makedirs(folder, exist_ok=True)
    return folder


def create_sr_model_and_diffusion(flags):
    """
    sr_create_model_and_diffusion(**flags), also honouring an optional "channel_mult" entry
    (needed for sizes outside the built-in table, e.g. 16).

    :param flags: the sr_model_and_diffusion_defaults() flags, plus num_classes and channel_mult.
    :return: (SuperResModel, SpacedDiffusion).
    """
    from .script_util import create_gaussian_diffusion, sr_create_model, sr_create_model_and_diffusion

    flags = dict(flags)
    channel_mult = flags.pop("channel_mult", "")
    if not channel_mult:
        return sr_create_model_and_diffusion(**flags)
    model_keys = (
        "large_size small_size num_channels num_res_blocks learn_sigma class_cond use_checkpoint "
        "attention_resolutions num_heads num_head_channels num_heads_upsample "
        "use_scale_shift_norm dropout resblock_updown use_fp16 num_classes"
    ).split()
    model = sr_create_model(
        **{k: flags[k] for k in model_keys if k in flags}, channel_mult=channel_mult
    )
    diffusion = create_gaussian_diffusion(
        steps=flags["diffusion_steps"],
        learn_sigma=flags["learn_sigma"],
        noise_schedule=flags["noise_schedule"],
        use_kl=flags["use_kl"],
        predict_xstart=flags["predict_xstart"],
        rescale_timesteps=flags["rescale_timesteps"],
        rescale_learned_sigmas=flags["rescale_learned_sigmas"],
        timestep_respacing=flags["timestep_respacing"],
    )
    return model, diffusion
