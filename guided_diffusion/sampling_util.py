"""
Library code shared by the reference scripts: loading checkpoints into networks built from flags
(with errors that name the flag to change), seeding, the classifier-guidance gradient, the sampling
loop that gathers every rank's batches in rank order, and the one-line error handling of the
scripts' main functions.
"""

import itertools
import math
import os
import sys
import traceback

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import dist_util, logger, sample_util


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

# Flags whose value does not change any state-dict shape; never suggested.
_BOOL_FLAGS = (
    "class_cond",
    "learn_sigma",
    "use_scale_shift_norm",
    "resblock_updown",
    "classifier_use_scale_shift_norm",
    "classifier_resblock_updown",
)
_DEPTH_FLAGS = ("num_res_blocks", "classifier_depth")
_WIDTH_FLAGS = ("num_channels", "classifier_width")
_ATTENTION_FLAGS = ("attention_resolutions", "classifier_attention_resolutions")
_SIZE_FLAGS = ("image_size", "large_size")
_CHANNEL_MULT_FLAGS = ("channel_mult", "classifier_channel_mult")
_BUILTIN_SIZES = (32, 64, 128, 256, 512)
_BUILTIN_MULTS = ("1,2,2,2", "1,2,3,4", "1,1,2,3,4", "1,1,2,2,4,4", "0.5,1,1,2,2,4,4")


def _shapes(state_dict):
    return {k: tuple(v.shape) for k, v in state_dict.items() if hasattr(v, "shape")}


def _is_state_dict(obj):
    return isinstance(obj, dict) and all(isinstance(k, str) for k in obj)


def _is_optimizer_state(obj):
    return isinstance(obj, dict) and "param_groups" in obj and "state" in obj


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
    if _is_optimizer_state(state_dict):
        raise ScriptError(
            f"{path} is an optimizer checkpoint (optNNNNNN.pt): pass a modelNNNNNN.pt or "
            "ema_<rate>_NNNNNN.pt file instead"
        )
    if not _is_state_dict(state_dict):
        raise ScriptError(f"{path} is not a network state dict")
    expected = _shapes(model.state_dict())
    given = _shapes(state_dict)
    if expected == given:
        return
    hints = _flag_hints(expected, given, flags, build)
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    reshaped = [k for k in expected if k in given and given[k] != expected[k]]
    detail = []
    if missing:
        detail.append(f"{len(missing)} missing keys, e.g. {missing[0]}")
    if unexpected:
        detail.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[0]}")
    if reshaped:
        k = reshaped[0]
        detail.append(f"{len(reshaped)} shape mismatches, e.g. {k} {given[k]} vs {expected[k]}")
    raise ScriptError(
        f"checkpoint {path} does not fit the model flags: {hints} ({'; '.join(detail)})"
    )


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


def _direct_hints(expected, given, flags):
    """Flag values read straight off telltale tensors of the checkpoint."""
    flags = flags or {}
    changes = {}
    if "label_emb.weight" in given and "label_emb.weight" not in expected:
        changes["class_cond"] = True
    elif "label_emb.weight" in expected and "label_emb.weight" not in given:
        changes["class_cond"] = False
    if "label_emb.weight" in given:
        classes = given["label_emb.weight"][0]
        if classes != flags.get("num_classes", classes):
            changes["num_classes"] = classes
    width_flag = next((f for f in _WIDTH_FLAGS if f in flags), _WIDTH_FLAGS[0])
    if "time_embed.0.weight" in given and "time_embed.0.weight" in expected:
        width = given["time_embed.0.weight"][1]
        if width != expected["time_embed.0.weight"][1]:
            changes[width_flag] = width
    out = "out.2.weight"
    if "learn_sigma" in flags and out in given and out in expected and given[out] != expected[out]:
        if given[out][0] in (3, 6):
            changes["learn_sigma"] = given[out][0] == 6
    return changes


def _single_changes(flags, given):
    """Candidate one-flag changes for the search, most likely first."""
    for name in _BOOL_FLAGS:
        if name in flags:
            yield {name: not flags[name]}
    for name in _DEPTH_FLAGS:
        if name in flags:
            for depth in range(1, 5):
                if depth != flags[name]:
                    yield {name: depth}
    attention_flag = next((f for f in _ATTENTION_FLAGS if f in flags), None)
    size_flag = next((f for f in _SIZE_FLAGS if f in flags), None)
    if attention_flag is not None and size_flag is not None:
        size = flags[size_flag]
        levels = [size // 2**k for k in range(7) if size // 2**k >= 1]
        current = flags[attention_flag]
        # Contiguous runs of resolutions ("32,16,8") cover the configurations in use.
        for start, stop in itertools.combinations(range(len(levels) + 1), 2):
            text = ",".join(str(r) for r in levels[start:stop])
            if text != current:
                yield {attention_flag: text}
    mult_flag = next((f for f in _CHANNEL_MULT_FLAGS if f in flags), None)
    if size_flag is not None:
        current = flags[size_flag]
        sizes = set(_BUILTIN_SIZES) | {current // 4, current // 2, current * 2}
        for size in sorted(s for s in sizes if s >= 8):
            if size != current:
                yield {size_flag: size}
    if mult_flag is not None:
        for mult in _BUILTIN_MULTS:
            if mult != flags[mult_flag]:
                yield {mult_flag: mult}


def _fits(build, flags, given):
    try:
        with torch.device("meta"):
            candidate = build(dict(flags))
    except Exception:  # an impossible combination of flags is simply not a candidate
        return False
    return _shapes(candidate.state_dict()) == given


def _format_changes(changes):
    return " ".join(f"--{k} {_flag_text(v)}" for k, v in changes.items())


def _flag_text(value):
    return str(value)


def _flag_hints(expected, given, flags, build):
    direct = _direct_hints(expected, given, flags)
    prefix = []
    if "class_cond" in direct:
        has = "has" if direct["class_cond"] else "has no"
        prefix.append(f"checkpoint {has} label_emb.weight")
    if flags is not None and build is not None:
        base = {**flags, **direct}
        if _fits(build, base, given) and direct:
            return ", ".join(prefix + [f"pass {_format_changes(direct)}"])
        # Several single changes can fit (e.g. another image size moves the attention levels
        # like other attention_resolutions do); the likeliest comes first.
        fitting = []
        for change in _single_changes(base, given):
            if _fits(build, {**base, **change}, given):
                fitting.append(_format_changes({**direct, **change}))
                if len(fitting) == 3:
                    break
        if fitting:
            return ", ".join(prefix + ["pass " + " or pass ".join(fitting)])
    if direct:
        hint = ", ".join(prefix + [f"pass {_format_changes(direct)}"])
        return hint + " (other flags may differ too)"
    return (
        "check --image_size/--channel_mult, --num_res_blocks, --attention_resolutions, "
        "--resblock_updown, --use_scale_shift_norm and --num_head_channels against the flags the "
        "checkpoint was trained with"
    )


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
            selected = log_probs[range(len(logits)), y.view(-1)]
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


def autocast_context(use_bf16):
    """bfloat16 autocast on the compute device when use_bf16, else a no-op context."""
    return torch.autocast(dist_util.dev().type, dtype=torch.bfloat16, enabled=bool(use_bf16))


def sampling_extra_defaults():
    """
    Flags the sampling scripts add to the reference's; each default keeps reference behaviour.

    seed: torch.manual_seed(seed + rank) right before the sampling loop.
    num_classes: label count of class-conditional models and classifiers (reference: 1000).
    log_dir: the logger's folder ("" = $OPENAI_LOGDIR, else a dated temp folder).
    out_dir: where the npz files go ("" = the log folder, as the reference).
    progress: progress bars on rank 0.
    use_bf16: bfloat16 autocast for the networks (GPUs).
    """
    return dict(seed=0, num_classes=1000, log_dir="", out_dir="", progress=True, use_bf16=False)


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
