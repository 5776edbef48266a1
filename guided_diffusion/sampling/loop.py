"""
What the sampling scripts share: checking their flags before any work, building a model from the
flags and loading its checkpoint, building the sampling function a --sampler names, getting a
loaded network ready (device, fp16/bf16 torso, eval mode, channels-last, compile), opening the
log folder, drawing batches round after round on every rank and gathering them in rank order,
keeping each finished round so that a stopped run continues (runtime.kept_rounds), and writing
the result.
"""

import errno
import functools
import inspect
import math
import os
import re
import tempfile

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import dist_util, logger
from ..cli import run_config
from ..cli.flags import check_counts, ddim_tool_model_flags, network_flags
from ..cli.weights import load_checkpoint_into
from ..diffusion import solvers
from ..diffusion.denoiser import SIGMA_GRIDS, solver_sample_loop
from ..diffusion.guidance import check_guidance_scale
from ..errors import ScriptError
from ..interop import diffusers_export
from ..networks import set_precision
from ..runtime.kept_rounds import KeptRounds, describe_command
from ..runtime.perf import compile_model, set_tf32, to_channels_last
from ..runtime.shapes import image_hw
from . import editing
from . import files as sample_files
from .files import to_uint8


def parse_sampling_flags(parser, argv=None):
    """
    A sampling script's flags: parsed, with the model and diffusion flags of a training run's
    args.json where one applies (run_config.parse_args), and checked before any work
    (check_sampling_flags).

    :param parser: the script's create_argparser().
    :param argv: the arguments (None: sys.argv[1:]).
    :return: the parsed flags.
    """
    args = run_config.parse_args(parser, argv)
    # A diffusers UNet2DModel folder as --model_path brings its own model flags (an addition).
    diffusers_export.take_diffusers_flags(args)
    check_sampling_flags(args)
    return args


def check_sampling_flags(args):
    """
    Refuse, before any work, what would only fail once samples were drawn: --num_samples or
    --batch_size below 1, and an --out_dir that cannot be written.

    :param args: the parsed flags (those it has of num_samples, batch_size, out_dir are checked).
    :raises ScriptError: naming the flag.
    """
    # deviation from reference: the reference divides by --batch_size (ZeroDivisionError), fails
    # to concatenate no batches, and finds an unwritable folder only when it saves.
    check_counts(args, "num_samples", "batch_size")
    out_dir = getattr(args, "out_dir", "")
    if out_dir and "://" not in out_dir:
        check_writable_folder(out_dir, "--out_dir")


def sampler_from_flags(args, check=None):
    """
    The sampler a sampling script runs (resolve_sampler), its flags checked before any work:
    --timestep_respacing, --evaluations and --sigma_grid must fit it (check_sampler_flags) and
    --guidance_scale the model (check_guidance_scale).

    :param args: the parsed flags (sampler, use_ddim, timestep_respacing, evaluations,
        sigma_grid, guidance_scale, class_cond, class_dropout_prob).
    :param check: a script's own test of the sampler's name (a script that runs only some
        samplers raises there), called first, so that a sampler it refuses is named as such
        rather than asked for flags.
    :return: the sampler's name.
    :raises ValueError: one line naming the flag to change.
    """
    sampler = resolve_sampler(args.sampler, args.use_ddim)
    if check is not None:
        check(sampler)
    check_sampler_flags(
        sampler, timestep_respacing=args.timestep_respacing, evaluations=args.evaluations,
        sigma_grid=args.sigma_grid,
    )
    check_guidance_scale(
        args.guidance_scale, class_cond=args.class_cond, class_dropout_prob=args.class_dropout_prob
    )
    return sampler


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


# Flags that change where the outputs go or how a run shows its progress, not what it draws: a
# stopped run continues with other values of them (--out_dir then names the folder it is in).
NOT_IN_COMMAND = ("log_dir", "out_dir", "progress", "save_images", "overwrite", "config",
                  "grid_images", "grid_per_class")
# Flags that name input files or folders: kept rounds record what those held.
INPUT_FLAGS = ("model_path", "classifier_path", "base_samples", "input", "mask", "latents",
               "data_dir", "config")


def planned_output_dir(args):
    """
    The folder a script's outputs will go to, when flags or the environment fix it before the
    log folder is open: --out_dir, else --log_dir, else $OPENAI_LOGDIR; None when the logger
    will make a new dated folder.
    """
    folder = getattr(args, "out_dir", "") or getattr(args, "log_dir", "") \
        or os.environ.get("OPENAI_LOGDIR", "")
    return os.path.expanduser(folder) if folder else None


def keep_rounds(args, script, rounds, *, per_round, total, what="samples", finished=None,
                needed_bytes=0, count_of=None):
    """
    The KeptRounds of a script's run, its output folder checked now, before any work: writable,
    not holding a finished result (unless --overwrite True), nor another command's kept
    batches, with room for the run.

    :param args: the parsed flags (vars(args) is the command, less NOT_IN_COMMAND, with the
        identity of the INPUT_FLAGS files).
    :param script: the script's file (__file__).
    :param rounds: its rounds; per_round, total, what, finished, needed_bytes, count_of: see
        KeptRounds.
    :raises ScriptError, StorageError: one line naming the flag to change.
    """
    check_counts(args, "batch_size")
    folder = planned_output_dir(args)
    flag = "--out_dir" if getattr(args, "out_dir", "") else "--log_dir"
    if folder and "://" in folder:
        raise ScriptError(
            f"{flag} {folder}: the sampling scripts write to a local (or mounted) folder; pass "
            "one and copy the result to the bucket afterwards"
        )
    if folder:
        check_writable_folder(folder, flag)
    command = describe_command(script, vars(args), ignore=NOT_IN_COMMAND, inputs=INPUT_FLAGS)
    kept = KeptRounds(command, rounds, per_round=per_round, total=total, what=what,
                      overwrite=getattr(args, "overwrite", False), finished=finished,
                      needed_bytes=needed_bytes, folder_named=folder is not None,
                      count_of=count_of)
    kept.check(folder)
    return kept


def finished_files(*names):
    """A KeptRounds `finished` test for a result of fixed file names: the first that exists."""

    def first_existing(folder):
        return next((os.path.join(folder, name) for name in names
                     if os.path.exists(os.path.join(folder, name))), None)

    return first_existing


def keep_sample_rounds(args, script, image_size, num_samples=None, round_itemsize=1,
                       finished=None, channels=None):
    """
    keep_rounds for a run of --num_samples samples of image_size (side or (height, width)) and
    --in_channels (3 without the flag), --batch_size per rank and round, written as
    sampling.files.save_samples writes them (the npz, its grid, with --save_images the PNG
    folder).

    :param round_itemsize: bytes per pixel value the rounds keep (1: uint8, 4: float32).
    :param finished: the KeptRounds `finished` test, where the result has more files than
        save_samples writes (default: sampling.files.finished_samples).
    :param channels: the written images' channels (default --in_channels; a decoder's images
        with --vae_path).
    """
    num_samples = args.num_samples if num_samples is None else num_samples
    height, width = image_hw(image_size)
    channels = getattr(args, "in_channels", 3) if channels is None else channels
    shape = (num_samples, height, width, channels)
    rounds = num_rounds(num_samples, args.batch_size)
    per_round = args.batch_size * dist_util.get_world_size()
    one = height * width * shape[3]
    # The kept rounds (the last may overshoot) and the npz exist together for a moment.
    needed = (rounds * per_round * (one * round_itemsize + 8) + num_samples * (one + 8)
              + sample_files.GRID_MAX_SIDE ** 2 * 4)
    if getattr(args, "save_images", False):
        needed += num_samples * sample_files.png_bytes(height, width, shape[3])
    if finished is None:
        def finished(folder):
            return sample_files.finished_samples(folder, shape)
    return keep_rounds(args, script, rounds, per_round=per_round, total=num_samples,
                       finished=finished, needed_bytes=needed)


def sample_and_write(args, sample_fn, steps_per_batch, model_fn, batch_kwargs, *, image_size,
                     cond_fn=None, kept=None, streams=None, decode=None):
    """
    The sampling scripts' run: draw --num_samples images, --batch_size per rank and round, gather
    them on every rank and write samples_NxHxWxC.npz (+ PNG grid, + one PNG per sample with
    --save_images) to output_dir(args). Each finished round is kept (kept: the script's
    keep_sample_rounds(...)), so that the run stops cleanly on SIGTERM, SIGUSR1 or SIGINT and
    the same command continues it.

    :param args: the parsed flags (num_samples, batch_size, in_channels, clip_denoised,
        progress, save_images, out_dir).
    :param sample_fn: the sampling loop, make_sample_fn(...).
    :param steps_per_batch: its denoising steps per batch, sample_steps(...), for the progress bar.
    :param model_fn: the model the loop calls (e.g. with classifier-free guidance).
    :param batch_kwargs: a function giving the model_kwargs of the next batch; it is called
        before the batch's noise is drawn (labels first, as the reference draws them), and the
        "y" it gives, if any, are the labels saved as arr_1.
    :param image_size: the side (or height, width) of the samples.
    :param cond_fn: the classifier guidance gradient, or None.
    :param kept: the run's KeptRounds (default: keep_sample_rounds(args, "sample", ...), which
        checks the folder only now).
    :param streams: what batch_kwargs draws from besides torch's generators ({name: object
        with state_dict/load_state_dict}, e.g. {"labels": ClassLabels}).
    :param decode: latents -> images (sampling.latents.LatentDecoder, --vae_path), applied to
        each batch before it is kept; None writes the samples as they are.
    :return: the npz path (on rank 0; None on the others).
    """
    shape = sample_shape(args.batch_size, image_size, args.in_channels)
    if kept is None:
        kept = keep_sample_rounds(args, "sample", image_size)
    folder = output_dir(args)
    kept.open(folder)

    def make_batch(bar):
        model_kwargs = batch_kwargs()
        sample = sample_fn(
            model_fn,
            shape,
            clip_denoised=args.clip_denoised,
            model_kwargs=model_kwargs,
            cond_fn=cond_fn,
            device=dist_util.dev(),  # model_fn may be a plain function (guidance)
            progress=bar,
        )
        if decode is not None:
            sample = decode(sample)
        return to_uint8(sample.float()), model_kwargs.get("y")

    arr, labels = gather_samples(args.num_samples, args.batch_size, make_batch,
                                 progress=args.progress, steps_per_batch=steps_per_batch,
                                 kept=kept, streams=streams)

    path = kept.finish(lambda: _save_samples(arr, labels, folder, args.save_images))
    logger.log("sampling complete")
    return path


def write_samples(arr, label_arr, out_dir, save_images=False):
    """
    Save samples_NxHxWxC.npz (+ PNG grid) on rank 0, then wait for every rank.

    :param save_images: also write one PNG per sample (--save_images) into samples_NxHxWxC/
        beside the npz, named <index>_<label>.png (or <index>.png without labels).
    :return: the npz path (on every rank).
    """
    path = os.path.join(out_dir, sample_files.samples_npz_name(arr.shape))
    if dist_util.is_main_process():
        _save_samples(arr, label_arr, out_dir, save_images)
    dist_util.barrier()
    return path


def _save_samples(arr, label_arr, out_dir, save_images):
    """Rank 0's part of write_samples: save and log; returns the npz path."""
    path = os.path.join(out_dir, sample_files.samples_npz_name(arr.shape))
    logger.log(f"saving to {path}")
    sample_files.save_samples(arr, label_arr, out_dir, save_images=save_images)
    if save_images:
        logger.log(f"saved {len(arr)} images to {os.path.splitext(path)[0]}")
    return path


def num_rounds(num_samples, batch_size):
    """Sampling rounds needed for num_samples when every rank makes batch_size per round."""
    return math.ceil(num_samples / (batch_size * dist_util.get_world_size()))


def gather_samples(num_samples, batch_size, make_batch, progress=True, desc="sampling",
                   steps_per_batch=None, kept=None, streams=None):
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
    :param kept: an opened KeptRounds of num_rounds(...) rounds that keeps each round (and
        continues after the rounds an earlier run kept); None: the rounds are only gathered.
    :param streams: see KeptRounds.run.
    :return: (images array [num_samples, H, W, C], labels array or None), on every rank;
        with kept rounds on rank 0 only ((None, None) on the other ranks).
    """
    if num_samples < 1 or batch_size < 1:
        raise ScriptError(
            f"num_samples and batch_size must be at least 1, got {num_samples} and {batch_size}")
    show = progress and dist_util.is_main_process()
    rounds = num_rounds(num_samples, batch_size)
    per_round = batch_size * dist_util.get_world_size()
    if kept is None:
        kept = KeptRounds(None, rounds, per_round=per_round, total=num_samples)
    if kept.rounds != rounds:
        raise ValueError(f"the KeptRounds has {kept.rounds} rounds, the run {rounds}")
    unit, per_batch = ("step", steps_per_batch) if steps_per_batch else ("it", 1)
    resumed = {"initial": kept.kept * per_batch} if kept.kept else {}
    bar = tqdm(total=rounds * per_batch, disable=not show, desc=desc, unit=unit, **resumed)

    def make_round(index):
        if steps_per_batch is None:
            batch_images, batch_labels = make_batch()
            bar.update(1)
        else:
            batch_images, batch_labels = make_batch(bar)
        logger.log(f"created {(index + 1) * per_round} samples")
        return {"images": batch_images, "labels": batch_labels}

    try:
        kept.run(make_round, streams)
    finally:
        bar.close()
    arrays = kept.arrays()
    if arrays is None:
        return None, None
    labels = arrays.get("labels")
    return arrays["images"][:num_samples], None if labels is None else labels[:num_samples]


def kept_pass_rounds(args, script, passes, count, *, what, finished, item_bytes):
    """
    keep_rounds for runtime.kept_rounds.run_passes(...): the rounds of len(passes) passes over
    count items in batches of --batch_size.

    :param item_bytes: what one item of one pass keeps on disk, about (with the result's share).
    """
    batch_size = args.batch_size
    batches = math.ceil(count / batch_size) if batch_size > 0 else 0

    def count_of(rounds):
        # Whole passes, then the batches of the pass in progress (its last may be short).
        done, batch = divmod(rounds, batches) if batches else (0, 0)
        return done * count + min(batch * batch_size, count)

    return keep_rounds(args, script, len(passes) * batches, per_round=batch_size,
                       total=len(passes) * count, what=what, finished=finished,
                       needed_bytes=2 * len(passes) * count * item_bytes, count_of=count_of)


def sample_shape(batch_size, image_size, in_channels=3):
    """
    The shape of one sampling batch, (batch_size, in_channels, height, width).

    :param image_size: a side (square) or (height, width), as --image_size parses it.
    """
    height, width = image_hw(image_size)
    return (batch_size, in_channels, height, width)


class ClassLabels:
    """
    The labels of each sampling batch, one call per batch:

    - by default, torch.randint over [0, num_classes) right before the batch's noise, as the
      reference draws them (the seed contract: same seed, same labels and samples);
    - class_label k: every label is k (no random draw, so the noise differs from the default);
    - balanced: sample i of the run (in gathered order: round, then rank, then position) gets
      label i % num_classes, so the first num_classes * m samples hold m of every class.

    :param num_classes: the label count.
    :param batch_size: samples per batch on each rank.
    :param class_label: a class in [0, num_classes), or -1 for no fixed class.
    :param balanced: labels in turn instead of at random.
    :raises ScriptError: for a class out of range, or both class_label and balanced.
    """

    def __init__(self, num_classes, batch_size, class_label=-1, balanced=False):
        if class_label != -1 and not 0 <= class_label < num_classes:
            raise ScriptError(
                f"--class_label {class_label} is out of range: the model has --num_classes "
                f"{num_classes}, so pass a class from 0 to {num_classes - 1} (or -1 for all)"
            )
        if class_label != -1 and balanced:
            raise ScriptError(
                "--class_label and --balanced_labels True exclude each other: pick one"
            )
        self.num_classes = num_classes
        self.batch_size = batch_size
        self.class_label = class_label
        self.balanced = balanced
        self.rounds = 0

    def state_dict(self):
        """Where the balanced labels are (a resumed run continues from there)."""
        return {"rounds": self.rounds}

    def load_state_dict(self, state):
        self.rounds = int(state["rounds"])

    def __call__(self, device=None):
        """The labels of the next batch of this rank, an int64 tensor [batch_size]."""
        device = device if device is not None else dist_util.dev()
        if self.class_label != -1:
            return torch.full((self.batch_size,), self.class_label, dtype=torch.int64,
                              device=device)
        if self.balanced:
            first = (self.rounds * dist_util.get_world_size() + dist_util.get_rank()) * self.batch_size
            self.rounds += 1
            index = torch.arange(first, first + self.batch_size, dtype=torch.int64)
            return (index % self.num_classes).to(device)
        return torch.randint(low=0, high=self.num_classes, size=(self.batch_size,), device=device)


def class_labels(args, class_cond=True):
    """
    The ClassLabels of a sampling script's flags (--num_classes, --batch_size, --class_label,
    --balanced_labels).

    :param class_cond: whether the run uses labels at all; --class_label or --balanced_labels
        without them is refused (an unconditional model has no class to choose).
    :raises ScriptError: see ClassLabels.
    """
    chosen = getattr(args, "class_label", -1) != -1 or getattr(args, "balanced_labels", False)
    if chosen and not class_cond:
        raise ScriptError(
            "--class_label and --balanced_labels choose the classes of a class-conditional model: "
            "pass --class_cond True with a model trained with it, or use classifier_sample.py"
        )
    return ClassLabels(args.num_classes, args.batch_size,
                       class_label=getattr(args, "class_label", -1),
                       balanced=getattr(args, "balanced_labels", False))


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
    if use_fp16 or use_bf16:
        set_precision(model, "fp16" if use_fp16 else "bf16")
    model.eval()
    to_channels_last(model, channels_last)
    return compile_model(model, compile)


# Flags besides a model family's own defaults that change the network a script builds; each
# script passes those of them it has.
_ADDED_MODEL_FLAGS = ("num_classes", "channel_mult", "class_dropout_prob", "in_channels", "arch",
                      "dit_model")


def load_diffusion_model(args, super_res=False):
    """
    Build a diffusion model and its diffusion from a script's parsed flags and load --model_path
    into the model, before anything is written: a checkpoint that does not fit the flags is
    refused naming the flags to change.

    :param args: the parsed flags: model_and_diffusion_defaults() (sr_model_and_diffusion_defaults()
        with super_res) plus those of num_classes, channel_mult, class_dropout_prob and
        in_channels the script has, and model_path.
    :param super_res: build the super-resolution model (sr_create_model_and_diffusion).
    :return: (model, diffusion, flags): the model on the CPU, not yet prepared (prepare_network),
        and the keywords it was built with.
    """
    from ..script_util import (
        args_to_dict,
        create_model_and_diffusion,
        model_and_diffusion_defaults,
        sr_create_model_and_diffusion,
        sr_model_and_diffusion_defaults,
    )

    if super_res:
        create, defaults = sr_create_model_and_diffusion, sr_model_and_diffusion_defaults()
    else:
        create, defaults = create_model_and_diffusion, model_and_diffusion_defaults()
    flags = args_to_dict(args, defaults.keys())
    # Those the factory takes: the super-resolution one has no --dit_model.
    accepted = inspect.signature(create).parameters
    flags.update({name: getattr(args, name) for name in _ADDED_MODEL_FLAGS
                  if hasattr(args, name) and name in accepted})
    model, diffusion = _build_and_load(create, flags, args.model_path)
    check_training_schedule(args, flags, model)
    return model, diffusion, flags


def check_training_schedule(args, flags, model):
    """
    Refuse sampling a checkpoint with a --diffusion_steps, --noise_schedule or --rescale_timesteps
    other than it was trained with, where that is known: a released checkpoint (by file name and
    parameter count), or a run's args.json (--config, or the one beside --model_path). The
    weights load either way; the samples would be noise (cli/hints.explain_schedule_mismatch).

    :raises ScriptError: naming the flags to pass.
    """
    # deviation from reference: the reference sampled such a run and returned noise.
    from ..cli.hints import explain_schedule_mismatch, released_training_flags

    known = released_training_flags(args.model_path, model)
    if known is None:
        record = run_config.training_record(args)
        if record is not None:
            known = (record["flags"], f"{args.model_path} (its run's {record['path']})")
    if known is not None:
        problem = explain_schedule_mismatch(flags, *known)
        if problem:
            raise ScriptError(problem)


def _build_and_load(create, flags, model_path):
    """(model, diffusion) of create(**flags), the checkpoint model_path loaded into the model."""
    model, diffusion = create(**flags)
    if diffusers_export.is_diffusers_folder(model_path):
        diffusers_export.load_diffusers_weights(model, model_path)
    else:
        load_checkpoint_into(model, model_path, flags, build=lambda f: create(**f)[0])
    return model, diffusion


def load_ddim_tool_model(args, step_counts):
    """
    The networks of the DDIM tools (ddim_invert, ddim_consistency, ddim_interpolate): the model
    of their flags with --model_path loaded and prepared, and one deterministic-DDIM diffusion
    per step count ("ddim<steps>" respacing).

    :param args: the parsed flags (cli.families.ddim_tool_defaults() and model_path).
    :param step_counts: the step counts, e.g. parse_step_counts(args.steps).
    :return: (model, {steps: diffusion}).
    """
    from ..script_util import diffusion_for_steps

    flags = ddim_tool_model_flags(args)
    model = load_sampling_model(flags, args.model_path, **network_flags(args))
    return model, {steps: diffusion_for_steps(flags, steps) for steps in step_counts}


def load_guided_model(args):
    """
    The networks of the editing scripts (image_edit.py, image_inpaint.py), after their log folder
    is open: the model of the flags with --model_path loaded and prepared, the noisy classifier
    of --classifier_path when one is given, and the guidance they make (editing.guided_model:
    class labels, --guidance_scale, --classifier_scale).

    :param args: the parsed flags (cli.families.editing_defaults()).
    :return: (model_fn, cond_fn, diffusion, classifier or None).
    """
    model, diffusion, _ = load_diffusion_model(args)
    prepare_network(model, **network_flags(args))
    classifier = load_guidance_classifier(args) if args.classifier_path else None
    model_fn, cond_fn = editing.guided_model(
        model, class_cond=args.class_cond, guidance_scale=args.guidance_scale,
        num_classes=args.num_classes, classifier=classifier,
        classifier_scale=args.classifier_scale)
    return model_fn, cond_fn, diffusion, classifier


def open_run_log(args, model, loaded):
    """
    Open the log folder (--log_dir), apply --tf32, log what was loaded and get the model ready
    (prepare_network with --use_fp16, --use_bf16, --compile, --channels_last). Call it once the
    flags and inputs passed their checks, so that a refused run leaves no folder behind.

    :param loaded: the line to log, e.g. "loaded the model model.pt".
    :return: the prepared model.
    """
    logger.configure(dir=args.log_dir or None)
    set_tf32(args.tf32)
    logger.log(loaded)
    return prepare_network(model, **network_flags(args))


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


def check_sampler_flags(sampler, *, timestep_respacing="", evaluations=0, sigma_grid=""):
    """
    Refuse flags that mean nothing for the resolved sampler, before any work: ddpm and ddim take
    their steps from --timestep_respacing (the reference's meaning); the ODE solvers take a
    budget of model evaluations per sample, --evaluations, and need it.

    :raises ValueError: one line naming the flag to change.
    """
    if sigma_grid and sigma_grid not in SIGMA_GRIDS:
        raise ValueError(
            f"unknown --sigma_grid {sigma_grid!r}; known grids: {', '.join(SIGMA_GRIDS)}"
        )
    if sampler in solvers.SOLVERS:
        if timestep_respacing:
            raise ValueError(
                f"--timestep_respacing chooses the steps of --sampler ddpm or ddim; the "
                f"solver {sampler} chooses its own noise levels: drop --timestep_respacing and "
                f"give its model evaluations per sample with --evaluations N"
            )
        if evaluations <= 0:
            raise ValueError(
                f"--sampler {sampler} needs --evaluations N, its number of model evaluations "
                f"per sample (e.g. --evaluations 20)"
            )
        solvers.steps_for_evaluations(sampler, evaluations)
    elif evaluations:
        raise ValueError(
            f"--evaluations is the budget of the solvers; --sampler {sampler} takes its steps "
            f"from --timestep_respacing (e.g. --timestep_respacing {evaluations})"
        )
    elif sigma_grid:
        raise ValueError(
            f"--sigma_grid chooses the noise levels of the solvers; --sampler {sampler} "
            f"visits the steps of --timestep_respacing: drop --sigma_grid"
        )


def make_sample_fn(sampler, diffusion, evaluations=None, sigma_grid="", eta=0.0):
    """
    The sampling loop of a script for a resolved sampler name, called like p_sample_loop:
    fn(model, shape, noise=None, clip_denoised=..., denoised_fn=..., cond_fn=...,
    model_kwargs=..., device=..., progress=...).

    For ddpm and ddim it is the diffusion's own loop over its (respaced) steps. For the ODE
    solvers it is solver_sample_loop with `evaluations` model evaluations per sample, on the
    process the diffusion was built for (its base process when respaced).

    :param sampler: a name from resolve_sampler.
    :param diffusion: the diffusion built from the flags.
    :param evaluations: the solvers' budget (--evaluations); unused by ddpm and ddim.
    :param sigma_grid: the solvers' grid of noise levels (--sigma_grid; "" = the solver's
        default, denoiser.DEFAULT_SIGMA_GRID).
    :raises ValueError: when a solver gets no budget or one too small for it.
    :param eta: DDIM's eta (--eta): 0 is deterministic DDIM, 1 has DDPM's variance at each
        kept step (Song et al. 2021, eq. 16). The ddim sampler only.
    """
    if not 0.0 <= eta:
        raise ScriptError(f"--eta must be at least 0 (0 = deterministic DDIM), got {eta}")
    if eta and sampler != "ddim":
        raise ScriptError(
            f"--eta {eta} is DDIM's: pass --use_ddim True (or --sampler ddim), or drop --eta "
            f"(the {sampler} sampler takes none)"
        )
    if sampler == "ddpm":
        return diffusion.p_sample_loop
    if sampler == "ddim":
        if eta:
            return functools.partial(diffusion.ddim_sample_loop, eta=eta)
        return diffusion.ddim_sample_loop
    check_sampler_flags(sampler, evaluations=evaluations or 0, sigma_grid=sigma_grid)
    return functools.partial(
        solver_sample_loop, diffusion, sampler=sampler, evaluations=evaluations,
        sigma_grid=sigma_grid or None,
    )


def sample_steps(sampler, diffusion, evaluations=None):
    """
    The denoising steps one call of make_sample_fn(sampler, diffusion, evaluations) takes: the
    (respaced) steps of ddpm and ddim, the solver steps its evaluation budget buys otherwise.
    """
    if sampler in ("ddpm", "ddim"):
        return diffusion.num_timesteps
    return solvers.steps_for_evaluations(sampler, evaluations)


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
    model, _ = _build_and_load(create_model_and_diffusion, flags, model_path)
    return prepare_network(model, **network)


def load_guidance_classifier(args):
    """
    Build the noisy-image classifier of the classifier flags in `args` (classifier_defaults()
    plus num_classes and classifier_channel_mult), load --classifier_path into it and get it
    ready like the model (fp16 with --classifier_use_fp16, else bf16 with --use_bf16).

    :raises ScriptError: when the checkpoint does not fit the flags; a classifier trained at
        another image size is named as such.
    """
    from ..script_util import args_to_dict, classifier_defaults, create_classifier

    classifier_flags = args_to_dict(args, classifier_defaults().keys())
    classifier_flags["num_classes"] = args.num_classes
    classifier_flags["classifier_channel_mult"] = args.classifier_channel_mult
    classifier_flags["in_channels"] = getattr(args, "in_channels", 3)
    classifier = create_classifier(**classifier_flags)
    try:
        load_checkpoint_into(
            classifier, args.classifier_path, classifier_flags,
            build=lambda f: create_classifier(**f),
        )
    except ScriptError as exc:
        # The model and the classifier share --image_size: changing it for the classifier alone
        # is no fix (the hint may list --image_size among other flags to change).
        # (A missing or extra positional embedding is another --classifier_pool, not a size.)
        text = str(exc)
        if re.search(r"--image_size \d", text) or re.search(
                r"shape mismatches, e\.g\. \S*positional_embedding", text):
            raise ScriptError(
                f"the classifier {args.classifier_path} was trained at another image size than "
                f"the model's --image_size {args.image_size}: use a classifier trained at that "
                f"size ({exc})"
            ) from None
        raise
    return prepare_network(
        classifier,
        use_fp16=args.classifier_use_fp16,
        use_bf16=args.use_bf16 and not args.classifier_use_fp16,
        compile=args.compile,
        channels_last=args.channels_last,
    )
