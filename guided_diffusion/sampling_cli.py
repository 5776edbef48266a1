"""
The scripts' toolkit (what scripts/*.py share, above the library): the one-line error handling of
their main functions, seeding, loading checkpoints into networks built from flags (errors name the
flag to change), the classifier-guidance gradient, the sampling loop that gathers every rank's
batches in rank order, and reading and writing image and latent npz files. Writing sample files
themselves is sample_files.py's job.
"""

import errno
import math
import os
import sys
import traceback

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import dist_util, logger, sample_files
from .checkpoints import atomic_write
from .perf_util import (
    compile_model,
    performance_defaults,
    preserved_float32_precision,
    set_tf32,
    to_channels_last,
)
from .errors import ScriptError  # noqa: F401  (public here: the scripts import it from this module)
from .model_weights import check_model_weights, load_model_weights  # noqa: F401  (public here)


# ---------------------------------------------------------------------------------- errors


def run_main(main, argv=None):
    """
    Run a script's main(argv) and turn bad input into one line "error: ..." and exit status 2,
    instead of a traceback.

    ValueError (ScriptError, unreadable images, a launcher/MPI mismatch, ...), FileNotFoundError
    and NotImplementedError (an unknown schedule sampler) count as bad input, and so do storage
    failures: an unwritable log folder, a checkpoint that cannot be written, a full disk. Set
    GD_TRACEBACK=1 to see the traceback. A training run stopped by SIGTERM/SIGUSR1 leaves through
    preemption.TrainingPreempted (exit status preemption.EXIT_PREEMPTED), untouched here.

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
            NonFiniteLossError, OSError) as exc:
        prefix = "error" if dist_util.get_rank() == 0 else f"error (rank {dist_util.get_rank()})"
        exit_with_error(exc, prefix, 2)


def exit_with_error(exc, prefix, status):
    """
    Print an exception as the one line "<prefix>: <first line of its message>" on stderr and
    leave with `status`; an OSError that is not a storage problem (storage_error_message) is
    re-raised with its traceback instead. Call it from an except block.
    """
    message = storage_error_message(exc) if isinstance(exc, OSError) else None
    if isinstance(exc, OSError) and message is None:
        raise exc
    if os.environ.get("GD_TRACEBACK"):
        traceback.print_exc()
    if message is None:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    print(f"{prefix}: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    if dist_util.is_distributed():
        # Other ranks may wait in a collective for this one; leaving without the normal
        # shutdown (MPI_Finalize, process-group teardown) lets the launcher end them instead
        # of everyone hanging.
        os._exit(status)
    sys.exit(status)


# Failures of the file system that the user fixes (space, quota, permissions), not bugs.
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EISDIR}


def storage_error_message(exc):
    """
    One line for an OSError the user can fix (disk full, quota, permissions, read-only file
    system, a missing or misnamed path), or None for other OSErrors (bugs keep their traceback).
    """
    from .checkpoints import CheckpointWriteError
    from .logger import UnwritableLogDirError

    if isinstance(exc, (CheckpointWriteError, UnwritableLogDirError)):
        return str(exc).strip().splitlines()[0]
    if isinstance(exc, (FileNotFoundError, NotADirectoryError)) or exc.errno in _STORAGE_ERRNOS:
        if exc.strerror is None:  # raised by our code with a message of its own
            return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    return None


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

    :param flags: the sr_model_and_diffusion_defaults() flags, plus num_classes and channel_mult
        (and optionally class_dropout_prob).
    :return: (SuperResModel, SpacedDiffusion).
    """
    from .script_util import sr_create_model, sr_create_model_and_diffusion
    from .solver_sampling import diffusion_from_flags

    flags = dict(flags)
    channel_mult = flags.pop("channel_mult", "")
    if not channel_mult:
        return sr_create_model_and_diffusion(**flags)
    model_keys = (
        "large_size small_size num_channels num_res_blocks learn_sigma class_cond use_checkpoint "
        "attention_resolutions num_heads num_head_channels num_heads_upsample "
        "use_scale_shift_norm dropout resblock_updown use_fp16 num_classes class_dropout_prob"
    ).split()
    model = sr_create_model(
        **{k: flags[k] for k in model_keys if k in flags}, channel_mult=channel_mult
    )
    return model, diffusion_from_flags(flags, flags["timestep_respacing"])


def require_single_process(script):
    """
    Raise a ScriptError when launched on several ranks, for tools that run as one process.
    """
    if dist_util.get_world_size() > 1:
        raise ScriptError(
            f"{script} runs as one process: start it with python, not mpiexec or torchrun"
        )


def start_single_process_tool(script, args):
    """
    The start of the one-process tools (the DDIM tools, sampler_fid): set up the process group,
    refuse several ranks, open the log folder and apply --tf32.

    :param script: the script's file name, for the refusal message.
    :param args: the parsed flags (log_dir, tf32).
    """
    dist_util.setup_dist()
    require_single_process(script)
    logger.configure(dir=args.log_dir or None)
    set_tf32(args.tf32)


def ddim_tool_defaults(seed=True):
    """
    The flags of the DDIM tools (ddim_invert, ddim_interpolate, ddim_consistency): the model
    flags without --timestep_respacing (their --steps choose the respacing, "ddim<steps>"), plus
    sampling_extra_defaults() (without --seed when nothing is random) and --class_dropout_prob
    (so that checkpoints trained for classifier-free guidance load).
    """
    from .cfg import cfg_defaults
    from .script_util import model_and_diffusion_defaults

    defaults = model_and_diffusion_defaults()
    del defaults["timestep_respacing"]
    defaults.update(cfg_defaults())
    extras = sampling_extra_defaults()
    if not seed:
        del extras["seed"]
    defaults.update(extras)
    return defaults


def ddim_tool_model_flags(args):
    """
    The create_model_and_diffusion flags (plus num_classes and class_dropout_prob) of a DDIM
    tool's parsed args.
    """
    from .script_util import model_and_diffusion_defaults

    keys = [k for k in model_and_diffusion_defaults() if k != "timestep_respacing"]
    flags = {k: getattr(args, k) for k in keys}
    flags.update(
        timestep_respacing="",
        num_classes=args.num_classes,
        class_dropout_prob=getattr(args, "class_dropout_prob", 0.0),
    )
    return flags


def write_json(path, obj):
    """Write obj as indented JSON, atomically. :return: path."""
    import json

    return atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


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
    from .script_util import create_model_and_diffusion

    network.setdefault("use_fp16", bool(flags.get("use_fp16")))
    model, _ = create_model_and_diffusion(**flags)
    load_checkpoint_into(model, model_path, flags, build=lambda f: create_model_and_diffusion(**f)[0])
    return prepare_network(model, **network)


# ---------------------------------------------------------------------------------- npz files


def read_image_npz(path, image_size, class_cond=False, size_flag="--image_size", what="images",
                   labels_hint="add them as arr_1 or pass --class_cond False"):
    """
    Read images as image_sample.py writes them: arr_0 uint8 [N, H, W, 3], arr_1 int64 labels.

    :param path: the npz file.
    :param image_size: the side the images must have.
    :param class_cond: if True, the labels are required and returned.
    :param size_flag: the flag that sets image_size (for messages).
    :param what: what the file holds (for messages), e.g. "base samples".
    :param labels_hint: what to do when labels are missing (for messages).
    :return: (uint8 images, int64 labels or None; None unless class_cond).
    :raises FileNotFoundError: when the file is missing.
    :raises ScriptError: when it is unreadable or holds the wrong shapes.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with np.load(path) as obj:
            image_arr = obj["arr_0"]
            label_arr = obj["arr_1"] if "arr_1" in obj else None
    except (OSError, ValueError, KeyError) as exc:
        raise ScriptError(f"cannot read {what} {path}: {exc}") from None
    expected = (image_size, image_size, 3)
    if image_arr.ndim != 4 or tuple(image_arr.shape[1:]) != expected:
        hint = ""
        if image_arr.ndim == 4 and image_arr.shape[1] == image_arr.shape[2]:
            hint = f": pass {size_flag} {image_arr.shape[1]} (with a model trained for it)"
        raise ScriptError(
            f"{what} {path} have shape {tuple(image_arr.shape)}, expected "
            f"(N, {image_size}, {image_size}, 3) for {size_flag} {image_size}{hint}"
        )
    if image_arr.dtype != np.uint8:
        raise ScriptError(f"{what} {path} must be uint8 images, got {image_arr.dtype}")
    if not class_cond:
        return image_arr, None
    if label_arr is None:
        raise ScriptError(f"--class_cond True needs labels (arr_1) in {path}: {labels_hint}")
    if label_arr.shape != (len(image_arr),):
        raise ScriptError(
            f"{path} holds {len(image_arr)} images but labels (arr_1) of shape {label_arr.shape}"
        )
    return image_arr, label_arr.astype(np.int64)


def read_images(path, image_size, class_cond=False, limit=None):
    """
    Images to compare outputs with pixel by pixel: an image folder (read as is, labels from the
    file names) or an npz of uint8 images (arr_0, with labels as arr_1).

    :param limit: keep the first `limit` images (None or 0: all).
    :return: (uint8 images [N, image_size, image_size, 3], int64 labels or None).
    """
    from .image_datasets import read_image_folder

    if not path:
        raise ScriptError("no images given: pass --input FOLDER or --input FILE.npz")
    if os.path.isdir(path):
        return read_image_folder(path, image_size, class_cond=class_cond, limit=limit)
    images, labels = read_image_npz(path, image_size, class_cond=class_cond)
    if limit:
        images, labels = images[:limit], (None if labels is None else labels[:limit])
    return images, labels


def uint8_to_model_input(images):
    """uint8 NHWC images (array or tensor) to a float32 NCHW tensor in [-1, 1]."""
    tensor = torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2)
    return tensor.float() / 127.5 - 1.0


def save_latents(path, x_T, labels=None, steps=None, images=None):
    """
    Write DDIM latents as an npz: "x_T" float32 [N, C, H, W], and when given "labels" int64 [N],
    "steps" (the number of DDIM steps that produced them) and "images" (the uint8 NHWC images
    they encode). Written atomically.

    :return: path.
    """
    arrays = {"x_T": _numpy(x_T).astype(np.float32)}
    if labels is not None:
        arrays["labels"] = _numpy(labels).astype(np.int64)
    if steps is not None:
        arrays["steps"] = np.asarray(steps, dtype=np.int64)
    if images is not None:
        arrays["images"] = _numpy(images).astype(np.uint8)
    atomic_write(path, lambda f: np.savez(f, **arrays))
    return path


def load_latents(path, image_size, class_cond=False, channels=3):
    """
    Read latents written by save_latents (ddim_invert.py) and check they fit the model.

    :param image_size: the model's image size.
    :param class_cond: if True, the file must hold labels.
    :return: (x_T float32 tensor [N, C, H, W], int64 label tensor or None, steps or None).
    :raises FileNotFoundError: when the file is missing.
    :raises ScriptError: when it is unreadable, not a latents file, or of another shape.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"latents not found: {path}")
    try:
        with np.load(path) as obj:
            if "x_T" not in obj:
                raise ScriptError(
                    f"{path} is not a latents file (no x_T array): write one with ddim_invert.py"
                )
            x_T = obj["x_T"]
            labels = obj["labels"] if "labels" in obj else None
            steps = int(obj["steps"]) if "steps" in obj else None
    except (OSError, ValueError, KeyError) as exc:
        if isinstance(exc, ScriptError):
            raise
        raise ScriptError(f"cannot read latents {path}: {exc}") from None
    expected = (channels, image_size, image_size)
    if x_T.ndim != 4 or tuple(x_T.shape[1:]) != expected:
        hint = ""
        if x_T.ndim == 4 and x_T.shape[2] == x_T.shape[3] and x_T.shape[1] == channels:
            hint = f": pass --image_size {x_T.shape[2]} (with a model trained for it)"
        raise ScriptError(
            f"latents {path} have shape {tuple(x_T.shape)} but the model flags need "
            f"(N, {channels}, {image_size}, {image_size}) for --image_size {image_size}{hint}"
        )
    if class_cond and labels is None:
        raise ScriptError(
            f"--class_cond True needs labels in {path}: invert the images with a "
            "class-conditional model (ddim_invert.py --class_cond True)"
        )
    label_tensor = torch.from_numpy(labels.astype(np.int64)) if class_cond else None
    return torch.from_numpy(x_T.astype(np.float32)), label_tensor, steps


def _numpy(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)
