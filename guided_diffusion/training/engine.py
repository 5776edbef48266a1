"""
The one training engine. It owns a run: its log folder (one live job per folder, leftovers of an
interrupted save removed), where it starts (a fresh start, a checkpoint, or the newest readable
checkpoint in the log folder), the exact training state (every rank's random streams and data
positions, restored before the first step), the settings a resumed run may change (--lr, the
intervals: applied and logged), when to log, save and stop, the progress line, preemption
(SIGTERM/SIGUSR1 -> checkpoint -> exit status 75; before the first step: nothing written), and
writing each checkpoint set atomically with its marker file last.

A model family plugs in a TrainTask: one optimizer step, the files its checkpoint holds, and how
to load them back. The diffusion model (train_util.TrainLoop), the noisy classifier
(training.classifier), the super-resolution model (a TrainLoop too), the cGAN and the VAE all
run through Trainer, so a run feature is written here once. The run's settings come in one
TrainOptions (training.options), and the engine sets every optimizer's learning rate from its
schedule before each step, so a learning-rate feature is written once too.

Step numbering: `global_step` counts the optimizer steps taken, resumed ones included. Checkpoint
files carry it (model000400.pt holds 400 steps), the progress line and the logged "step" show it,
so the three always agree.
"""

import os
import re

import torch

from .. import dist_util, logger
from ..cli.flags import explicit_flags
from ..errors import NonFiniteLossError, ScriptError
from ..fp16_util import checked_grad_clip
from ..runtime import checkpoints, log_folder, train_state
from ..runtime.files import os_error_text, write_json
from ..runtime.safetensors_files import safetensors_torch
from ..runtime.run_record import (
    describe_run, drop_held_record, hold_run_record, take_held_record, write_run_record,
)
from ..runtime.perf import set_tf32
from ..runtime.preemption import PreemptionWatch
from ..runtime.progress import StepMeter
from ..runtime.seeding import seed_training
from .ema import check_ema_warmup
from .finetune import check_init_flags
from .options import KEEP_ALL, TrainOptions

__all__ = ["TrainTask", "Trainer", "NonFiniteSteps", "resolve_resume_checkpoint", "start_run",
           "parse_run_args", "check_run_flags", "KEEP_ALL", "TrainOptions"]

# The output formats of the logger that --log_format takes.
LOG_FORMATS = ("stdout", "log", "json", "csv", "tensorboard", "wandb")
# --save_format: the file format of a checkpoint set's weight files (model and EMA).
SAVE_FORMATS = {"pt": ".pt", "safetensors": ".safetensors"}

# The journal of a --keep_checkpoints deletion in progress: .pruneNNNNNN.json in the log folder.
PRUNE_JOURNAL = ".prune"

# Companion files of a checkpoint set: never a checkpoint to resume from on their own.
_COMPANION_PREFIXES = ("opt", "ema_", train_state.STATE_PREFIX)


def start_run(*, log_dir="", seed=0, tf32=None, args=None, script=None, argv=None,
              resume_checkpoint=None):
    """
    The first lines of every training script: join the process group (if launched on several
    ranks), claim and open the log folder, record the run in args.json there (when `args` is
    given), seed torch/numpy/random with seed + rank (so that model initialisation, noise,
    timesteps and data order repeat across runs and differ across ranks), and apply the TF32
    choice.

    :param log_dir: the log folder ("" = $OPENAI_LOGDIR, else a dated folder).
    :param seed: the base seed.
    :param tf32: True/False to set TF32 matmuls on CUDA; None leaves torch's setting.
    :param args: the parsed flags (an argparse namespace): rank 0 writes them, with the versions,
        git commit, world size and launcher, to args.json (runtime.run_record); their
        --log_format (if any) chooses rank 0's log outputs.
    :param script: the training script (its __file__), named in args.json.
    :param argv: the script's arguments, as main(argv) received them (None: sys.argv[1:]).
    :param resume_checkpoint: the --resume_checkpoint flag (None: args.resume_checkpoint):
        "auto" needs a fixed log folder.
    :raises ScriptError: for --resume_checkpoint auto without --log_dir or $OPENAI_LOGDIR.
    :raises LogFolderInUseError: when another live job holds the log folder.
    """
    if args is not None:
        # Before the log folder exists: a run refused on its flags leaves nothing behind.
        check_run_flags(args)
    dist_util.setup_dist()
    if resume_checkpoint is None:
        resume_checkpoint = getattr(args, "resume_checkpoint", "") if args is not None else ""
    folder = log_dir or os.environ.get("OPENAI_LOGDIR") or ""
    check_auto_resume_folder(resume_checkpoint, folder)
    formats = _log_formats(getattr(args, "log_format", "") if args is not None else "")
    existed = bool(folder) and os.path.exists(os.path.expanduser(folder))
    notes = claim_log_folder(os.path.expanduser(folder)) if folder else []
    _configure_logger(log_dir, formats)
    # Made by this start: a start refused later (a model flag, the data) removes it again.
    log_folder.note_new_folder(
        logger.get_dir() if not existed and dist_util.is_main_process() else None)
    for note in notes:
        logger.log(note)
    drop_held_record()  # an earlier start's record is replaced, never written
    if args is not None and dist_util.is_main_process():
        # Written by Trainer.run once the run really starts (model built, data listed,
        # checkpoint loaded): a refused start leaves the folder's record as it was, so the
        # checkpoints already there still sample with their own flags.
        hold_run_record(logger.get_dir(), describe_run(vars(args), script or "unknown", argv))
    seed_training(seed)
    if tf32 is not None:
        set_tf32(tf32)


def write_pending_record():
    """
    Write the args.json of the run start_run began (rank 0; once): called when the run really
    starts, so a start refused on its flags, its data or its checkpoint never replaces the
    record of the checkpoints already in the folder. Also marks the log folder as in use for
    good (log_folder.mark_started).

    :return: the path written, or None.
    """
    log_folder.mark_started()
    held = take_held_record()
    if held is None:
        return None
    folder, record = held
    path = write_run_record(folder, record)
    logger.log(f"recorded the flags of this run in {path}")
    logger.log_config(record.get("flags", {}))  # the trackers' copy (W&B config)
    return path


def parse_run_args(parser, argv=None):
    """
    Parse a training script's flags. With --init_num_classes K the model is built for K classes,
    so --num_classes becomes K (refused when given with another value).

    :raises ValueError: naming the contradicting flags.
    """
    args = parser.parse_args(argv)
    classes = getattr(args, "init_num_classes", 0)
    if classes and classes != args.num_classes:
        if "num_classes" in explicit_flags(parser, argv):
            raise ValueError(
                f"--num_classes {args.num_classes} and --init_num_classes {classes} disagree: the "
                "re-initialised label embedding is the model's; drop --num_classes"
            )
        args.num_classes = classes
    return args


def check_run_flags(args):
    """
    Refuse the run features' flags that cannot work (those a script has), naming the fix.

    :raises ValueError: with one line.
    """
    get = lambda name, default: getattr(args, name, default)  # noqa: E731
    TrainOptions.from_flags(args)  # the learning-rate schedule
    check_keep_checkpoints(get("keep_checkpoints", KEEP_ALL))
    weights_suffix(get("save_format", "pt"))
    checked_grad_clip(get("grad_clip", 0.0))
    check_ema_warmup(get("ema_warmup_power", 0.0), get("ema_inv_gamma", 1.0))
    if hasattr(args, "init_checkpoint"):
        check_init_flags(
            init_checkpoint=args.init_checkpoint,
            init_num_classes=get("init_num_classes", 0),
            init_add_null_class=get("init_add_null_class", False),
            # A classifier (no --class_cond flag) always has classes: its output head.
            class_cond=get("class_cond", True),
            class_dropout_prob=get("class_dropout_prob", 0.0),
        )
        # A run that will resume does not read the init file again (Trainer._start_from): a
        # requeued fine-tuning run continues even once that file was moved or cleaned away.
        if args.init_checkpoint and not os.path.isfile(args.init_checkpoint) \
                and not _will_resume(args):
            raise FileNotFoundError(
                f"--init_checkpoint {args.init_checkpoint} does not exist: pass the checkpoint "
                "file to fine-tune (e.g. a released 256x256_diffusion.pt)"
            )
    if get("fid_interval", 0):
        from .fid import check_fid_flags  # scipy and the Inception network only when asked

        check_fid_flags(args)
    for name, least in (("sample_interval", 0), ("sample_steps", 1), ("val_interval", 1),
                        ("val_num_images", 1)):
        if get(name, least) < least:
            raise ValueError(f"--{name} must be at least {least}, got {getattr(args, name)}")


def _will_resume(args):
    """
    Whether the run will resume from a checkpoint (not start fresh), as far as can be told
    before the log folder is claimed: an explicit --resume_checkpoint, or auto with a checkpoint
    file in the log folder.
    """
    resume = getattr(args, "resume_checkpoint", "")
    if not resume:
        return False
    if resume != "auto":
        return True
    folder = getattr(args, "log_dir", "") or os.environ.get("OPENAI_LOGDIR") or ""
    return bool(folder) and bool(checkpoints.checkpoint_candidates(os.path.expanduser(folder), "model"))
def weights_suffix(save_format):
    """
    The file name ending of the model and EMA files for --save_format ("pt" or "safetensors").

    :raises ValueError: naming the choices, for another value.
    :raises ScriptError: for safetensors without the safetensors package (naming the extra).
    """
    if save_format not in SAVE_FORMATS:
        raise ValueError(
            f"--save_format {save_format!r}: use pt (torch.save files, the reference's) or "
            "safetensors (model and EMA files as .safetensors; the optimizer and state files "
            "stay .pt)"
        )
    suffix = SAVE_FORMATS[save_format]
    if suffix == ".safetensors":
        safetensors_torch("--save_format safetensors: the checkpoint files")
    return suffix


def _log_formats(log_format):
    """
    Rank 0's logger outputs from --log_format (a comma-separated list of LOG_FORMATS); None
    keeps $OPENAI_LOG_FORMAT (default stdout,log,csv), as do the other ranks
    ($OPENAI_LOG_FORMAT_MPI).

    :raises ValueError: naming an unknown format (before any log folder exists).
    """
    if not log_format:
        return None
    formats = [f.strip() for f in log_format.split(",") if f.strip()]
    unknown = [f for f in formats if f not in LOG_FORMATS]
    if unknown:
        raise ValueError(
            f"--log_format {log_format}: unknown format {', '.join(unknown)}; use a "
            f"comma-separated list of {', '.join(LOG_FORMATS)}"
        )
    return formats if dist_util.is_main_process() else None


def _configure_logger(log_dir, formats):
    """logger.configure with rank 0's formats (None: the environment's)."""
    try:
        logger.configure(dir=log_dir or None, format_strs=formats)
    except ImportError as exc:
        # The tensorboard or wandb format without its package: the message names both.
        raise ScriptError(f"{exc}; or drop it from --log_format / OPENAI_LOG_FORMAT") from None


def check_auto_resume_folder(resume_checkpoint, folder):
    """
    --resume_checkpoint auto looks for checkpoints in the log folder, so the folder must be the
    same in every run: without --log_dir or $OPENAI_LOGDIR each run gets a new dated folder and
    auto would never find anything.

    :raises ScriptError: naming the fix.
    """
    if resume_checkpoint == "auto" and not folder:
        raise ScriptError(
            "--resume_checkpoint auto looks for checkpoints in the log folder, but without "
            "--log_dir (or $OPENAI_LOGDIR) every run writes to a new dated folder, so it would "
            "never resume: pass --log_dir DIR, the same in every run"
        )


def claim_log_folder(folder):
    """
    Make this job the only one using `folder` (runtime.log_folder.claim_folder): rank 0 takes
    its lock and removes the temporary files an interrupted save left there; every rank learns
    the outcome, so all refuse together.

    :return: lines to log once the logger is open (what was removed, a file system without
        locks).
    :raises LogFolderInUseError: on every rank, when another live job holds the folder.
    """
    return log_folder.claim_folder(folder, log_folder.TRAINING)


def resolve_resume_checkpoint(resume_checkpoint, log_dir=None, prefix="model"):
    """
    The checkpoint a run resumes from.

    :param resume_checkpoint: "" (fresh start), "auto" (the newest complete
        <prefix>NNNNNN.pt or .safetensors in log_dir; a fresh start when there is no such file)
        or a path.
    :param log_dir: where "auto" looks (default: the logger's folder).
    :param prefix: the marker file's prefix ("model", "cgan", "vae").
    :return: the checkpoint path, or None for a fresh start.
    :raises FileNotFoundError: when an explicit path does not exist.
    :raises ValueError: when the path is a companion file (optimizer, EMA, state) of a set, or
        when "auto" finds checkpoint files none of which can be read.
    """
    if not resume_checkpoint:
        return None
    if resume_checkpoint == "auto":
        return _newest_readable_checkpoint(log_dir or logger.get_dir(), prefix)
    if not os.path.exists(resume_checkpoint):
        raise FileNotFoundError(
            f"resume checkpoint not found: {resume_checkpoint} (pass a {prefix}NNNNNN.pt file (or "
            ".safetensors) or auto)"
        )
    name = os.path.basename(resume_checkpoint)
    if prefix == "model" and name.startswith(_COMPANION_PREFIXES):
        raise ValueError(
            f"--resume_checkpoint takes the modelNNNNNN.pt file, not {name}: the EMA, optimizer "
            "and state files next to it are found automatically (a modelNNNNNN.safetensors file "
            "works too)"
        )
    return resume_checkpoint


def _newest_readable_checkpoint(folder, prefix):
    """
    What --resume_checkpoint auto resumes from: the newest readable <prefix>NNNNNN.pt in folder
    (newer unreadable ones are skipped with a warning), None when there is none at all. Files
    that are all unreadable stop the run: starting over silently would train from scratch and
    then overwrite them.
    """
    candidates = checkpoints.checkpoint_candidates(folder, prefix)
    # Remote files are published whole (see checkpoints.save_atomic), so they count as readable.
    found = next((path for path in candidates
                  if "://" in path or checkpoints.is_complete_checkpoint(path)), None)
    skipped = candidates if found is None else candidates[: candidates.index(found)]
    unreadable = [os.path.basename(path) for path in skipped]
    if found is None and unreadable:
        raise ValueError(
            f"--resume_checkpoint auto: {folder} holds {', '.join(unreadable)}, but none can be "
            "read (cut short or corrupt), so the run would start over and overwrite them: move "
            "them away to start afresh, or pass --resume_checkpoint with a good checkpoint"
        )
    if found is None:
        logger.log(f"--resume_checkpoint auto: no checkpoint in {folder}, starting fresh")
        return None
    if unreadable:
        logger.warn(
            f"warning: --resume_checkpoint auto skipped {', '.join(unreadable)} in {folder}: "
            "cannot be read (cut short or corrupt)"
        )
    logger.log(f"--resume_checkpoint auto: resuming from {found}")
    return found


def checkpoint_step(path, prefix="model"):
    """
    The step a checkpoint holds: the digits after the last `prefix` in its file name, or 0
    (a released checkpoint such as 256x256_diffusion.pt starts a run at step 0, as the
    reference's parse_resume_step_from_filename does).
    """
    parts = os.fspath(path).split(prefix)
    if len(parts) < 2:
        return 0
    digits = parts[-1].split(".")[0]
    return int(digits) if digits.isdigit() else 0


class TrainTask:
    """
    What a model family gives the Trainer. Subclasses implement the methods; the Trainer calls
    them and owns everything else.

    checkpoint_prefix: the marker file of a checkpoint is <prefix>NNNNNN.pt in the log folder.
    checkpoint_suffix: the marker's file name ending, ".pt" or ".safetensors" (--save_format).
    loss_key: the logged value the progress line shows.

    A task keeps the Trainer that runs it in self.trainer; the properties and methods below
    that read it are the tasks' common public face.
    """

    checkpoint_prefix = "model"
    checkpoint_suffix = ".pt"
    loss_key = "loss"
    # The task's TrainOptions defaults (TrainOptions.build): its keyword and flag defaults; and
    # the options its script has no flags for (TrainOptions.task_flag_defaults).
    option_defaults = {}
    options_without = ()
    # Steps the learning-rate decay lags behind (training.options.LRSchedule).
    lr_lag = 0

    @property
    def step(self):
        """Steps taken, resumed ones included."""
        return self.trainer.global_step

    @property
    def last_checkpoint(self):
        """The marker file of the newest checkpoint written (or resumed from), or None."""
        return self.trainer.last_checkpoint

    def save(self):
        """Write the checkpoint set of the current step (see Trainer.save)."""
        return self.trainer.save()

    def train_step(self, batch, cond, step):
        """
        One optimizer step on a batch; log its values with logger.logkv(_mean) (device tensors
        are fine: the logger reads them at the next dump).

        :param step: the index of this step over the whole run, resumed steps included (0 for
            the first step ever): the position in learning-rate schedules.
        """
        raise NotImplementedError

    def optimizers(self):
        """The task's optimizers: the engine sets their learning rate before every step."""
        return [self.opt]

    def set_lr(self, lr, step=None):
        """
        Put the rate `lr` of the step `step` (the engine's schedule) into every optimizer.
        A task with a schedule of its own (the cGAN's paper SGD) overrides it.
        """
        for opt in self.optimizers():
            for group in opt.param_groups:
                group["lr"] = lr

    def health_problem(self):
        """
        Called at every log interval and before every save (it may synchronise with the device).

        :return: None when training is healthy, else why not (the run stops with
            NonFiniteLossError and saves nothing broken).
        """
        return None

    def checkpoint_files(self, folder, step, state):
        """
        The files of the checkpoint at `step`, as (object or function building it, path) pairs
        written in order; the last one must be folder/<prefix><step:06d><checkpoint_suffix>
        (the marker).

        :param state: the training state (train_state.gather) to store with them.
        """
        raise NotImplementedError

    def load_checkpoint(self, path, step):
        """
        Load a checkpoint set (weights, optimizer, EMA ...) given its marker file.

        :return: its training state (to restore when the run starts), or None when it has none.
        """
        raise NotImplementedError

    def shared_state(self):
        """Values equal on every rank that resuming must restore (e.g. the fp16 loss scale)."""
        return {}

    def load_shared_state(self, shared):
        """Restore what shared_state() returned."""

    def checkpoint_set_paths(self, folder, step):
        """
        The files of the checkpoint set of `step` that exist in `folder`, the marker first (what
        --keep_checkpoints deletes, in that order, so that a set is never left looking complete
        with files missing). The default: the marker alone (one-file checkpoints), in either
        format.
        """
        names = (f"{self.checkpoint_prefix}{step:06d}{suffix}" for suffix in checkpoints.SUFFIXES)
        return [p for p in (os.path.join(folder, name) for name in names) if os.path.exists(p)]

    def init_from_checkpoint(self, path):
        """
        Start from the weights of a checkpoint (--init_checkpoint): weights only, at step 0,
        with a fresh optimizer. Tasks that support fine-tuning override it.
        """
        raise ScriptError(
            f"--init_checkpoint is not supported by {type(self).__name__}: use "
            "--resume_checkpoint to continue a run"
        )

    def run_settings(self):
        """
        The task's flags that a resumed run may change (beyond the engine's: the intervals, the
        learning rate and its schedule), with this run's values: saved with every checkpoint,
        compared (and changes logged) on resume.
        """
        return {}

    def apply_settings(self, step):
        """
        Put this run's own settings into effect after a checkpoint was loaded, for the step
        `step` the run continues with (the engine already set the learning rate and weight
        decay: the optimizer state in the checkpoint brings back those it was saved with).
        """


class NonFiniteSteps:
    """
    Steps whose loss was not finite, counted on the device so that no step waits for the
    check; read at the health checks (TrainTask.health_problem).

    :param device: the device of the losses.
    """

    def __init__(self, device):
        self._count = torch.zeros((), device=device)
        self._seen = 0

    def add(self, finite):
        """:param finite: a bool device tensor, False when this step's loss is not finite."""
        self._count.add_((~finite).float())

    def new(self):
        """:return: the steps counted since the previous call (waits for the device)."""
        count = int(self._count)
        new, self._seen = count - self._seen, count
        return new


class Trainer:
    """
    Run a TrainTask: resume, restore the training state, step, log, save, stop.

    :param task: the TrainTask (its optimizers are built: the rate of the first step is set
        here).
    :param data: the training batches, an iterator of (batch, cond) pairs; its position is saved
        when it has state_dict/load_state_dict.
    :param options: the run's TrainOptions: batch_size (times the number of ranks: the global
        batch of the progress line and of "samples"), log_interval (values are dumped after the
        first step of each interval, as the reference), save_interval (checkpoints at its
        multiples of global_step and at the end), iterations and max_steps (the run's end),
        keep_checkpoints (never deleting the set the run resumed or started from),
        init_checkpoint (ignored with a log line when the run resumes), the rate's schedule.
    :param streams: further data streams whose positions travel with the checkpoint, {name:
        stream or None} (e.g. {"val": validation batches}).
    :param log_dir: where checkpoints go (default: the logger's folder).
    """

    def __init__(self, task, *, data, options, streams=None, log_dir=None):
        batch_size, log_interval = options.batch_size, options.log_interval
        save_interval, keep_checkpoints = options.save_interval, options.keep_checkpoints
        total_steps, max_steps = options.iterations, options.max_steps
        check_keep_checkpoints(keep_checkpoints)
        if log_interval < 1 or save_interval < 1:
            raise ValueError(
                f"--log_interval and --save_interval must be at least 1, got {log_interval} and "
                f"{save_interval}"
            )
        if total_steps < 0 or max_steps < 0:
            raise ValueError(
                f"step limits must be >= 0 (0 = no limit), got {total_steps} and {max_steps}"
            )
        self.task = task
        self.options = options
        self.lr_schedule = options.lr_schedule_for(lag=task.lr_lag)
        self.data = data
        self.global_batch = None if batch_size is None else batch_size * dist_util.get_world_size()
        self.log_interval = log_interval
        self.save_interval = save_interval
        self.total_steps = total_steps
        self.max_steps = max_steps
        self.streams = {"train": data, **(streams or {})}
        self.log_dir = log_dir or logger.get_dir()
        self.limit_flags = (options.iterations_flag, "--max_steps")
        prefix = task.checkpoint_prefix
        self.resume_checkpoint = resolve_resume_checkpoint(options.resume_checkpoint, self.log_dir,
                                                           prefix)
        # The step the run starts from, and the steps taken so far (resumed ones included).
        self.start_step = 0
        if self.resume_checkpoint:
            self.start_step = checkpoint_step(self.resume_checkpoint, prefix)
        self.global_step = self.start_step
        self.last_checkpoint = self.resume_checkpoint
        self._saved_at = None
        self._pending_state = None
        # A resumed run applies its own settings once, when it starts (_apply_resumed_settings).
        self._settings_pending = bool(self.resume_checkpoint)
        if self.resume_checkpoint:
            try:
                self._pending_state = task.load_checkpoint(self.resume_checkpoint, self.start_step)
            except ValueError as exc:
                if str(exc).startswith("cannot read checkpoint"):
                    raise ValueError(f"--resume_checkpoint: {exc}") from None
                raise
        self.keep_checkpoints = keep_checkpoints
        self._init_flag = options.init_checkpoint
        self.init_checkpoint = self._start_from(options.init_checkpoint)
        self.finish_interrupted_pruning()
        # (interval, function of the global step) pairs run after every step (add_periodic).
        self._periodic = []
        self.apply_lr(self.global_step)

    # ----------------------------------------------------------------------------- the loop

    @property
    def steps_this_run(self):
        return self.global_step - self.start_step

    def done(self):
        if self.total_steps and self.global_step >= self.total_steps:
            return True
        return bool(self.max_steps) and self.steps_this_run >= self.max_steps

    def end_step(self):
        """The global step the run ends at (0: unknown)."""
        ends = [s for s in (self.total_steps, self.max_steps and self.start_step + self.max_steps) if s]
        return min(ends) if ends else 0

    def run(self):
        """
        Train until the step limits (forever without one). A resumed run first restores the
        checkpoint's random streams and data positions. On SIGTERM, SIGUSR1 or SIGINT (to any
        rank) the step in progress finishes, a checkpoint is saved and every rank leaves through
        errors.TrainingPreempted (exit status 75; 130 after Ctrl-C).

        :raises NonFiniteLossError: when the task reports a broken state (checked at log
            intervals and before saving), naming the last good checkpoint.
        """
        if not self.end_step():
            logger.log(
                "no step limit (" + " / ".join(self.limit_flags) + "): this run trains until it "
                "is stopped; SIGTERM, SIGUSR1 or Ctrl-C saves a checkpoint first"
            )
        with PreemptionWatch() as preemption:
            self._stop_if_preempted_before_start(preemption)
            self._restore_train_state()
            # The run starts now: everything it needs has been checked and loaded.
            write_pending_record()
            meter = None
            while not self.done():
                batch, cond = next(self.data)
                if meter is None:
                    # Made once the first batch is here (it may tell the batch size).
                    self._note_batch_size(batch)
                    meter = StepMeter(
                        global_batch=self.global_batch,
                        total_steps=self.end_step(),
                        start_step=self.start_step,
                    )
                self.take_step(batch, cond)
                self.run_periodic()
                # As in the reference, values are dumped after the first step of every interval.
                if (self.steps_this_run - 1) % self.log_interval == 0:
                    self.check_health()
                    meter.report(self.global_step, loss_key=self.task.loss_key)
                    logger.dumpkvs()
                if self.global_step % self.save_interval == 0:
                    self.save()
                if not self.done() and preemption.requested():
                    if self._saved_at != self.global_step:
                        self.save()
                    self.close_streams()  # now, not when the collector finds the loader
                    preemption.stop(self.global_step, self.last_checkpoint)
            if self.steps_this_run and self._saved_at != self.global_step:
                self.save()
        self.close_streams()

    def close_streams(self):
        """Stop the data streams' loader workers (their positions are kept), now that the run
        is over, rather than leaving them to the garbage collector."""
        for stream in self.streams.values():
            close = getattr(stream, "close", None)
            if callable(close):
                close()

    def _stop_if_preempted_before_start(self, preemption):
        """
        A signal received while the run started up (model building, data listing, the process
        group forming) stops it before its first step, on every rank, with nothing written.
        """
        if preemption.agree():
            self.close_streams()
            preemption.stop_before_first_step(self.log_dir, self.resume_checkpoint)

    def take_step(self, batch, cond):
        """One optimizer step of the task, counted and logged; then the next step's rate."""
        self._note_batch_size(batch)
        self.task.train_step(batch, cond, self.global_step)
        self.global_step += 1
        self.log_step(self.global_step)
        self.apply_lr(self.global_step)

    def apply_lr(self, step):
        """Set the learning rate of the step `step` (0 = the first ever) from the schedule."""
        self.task.set_lr(self.lr_schedule.rate(step), step)

    def _note_batch_size(self, batch):
        if self.global_batch is None:
            self.global_batch = len(batch) * dist_util.get_world_size()

    def log_step(self, steps_taken):
        # deviation from reference: "step" counts the steps taken (the reference logged the
        # index of the step, one less), so the table, the progress line and the checkpoint names
        # agree.
        logger.logkv("step", steps_taken)
        logger.logkv("samples", steps_taken * self.global_batch)
        # The rate the step just taken used (a host number: no wait for the device).
        logger.logkv("lr", self.task.optimizers()[0].param_groups[0]["lr"])

    def _restore_train_state(self):
        state, self._pending_state = self._pending_state, None
        if self._settings_pending:
            self._settings_pending = False
            self._apply_resumed_settings(state)
        if state is None:
            return
        shared = train_state.restore(state, self.streams, source=self.resume_checkpoint)
        self.task.load_shared_state(shared)

    def run_settings(self):
        """The flags of this run that a resumed run may change (saved with each checkpoint)."""
        settings = {"--save_interval": self.save_interval, "--log_interval": self.log_interval}
        settings[self.limit_flags[0]] = self.total_steps
        return {**settings, **self.options.settings(), **self.task.run_settings()}

    def _apply_resumed_settings(self, state):
        """
        A resumed run trains with its own flags, not the checkpoint's (the optimizer state
        brings back the learning rate it was saved with): the task applies them, and what
        differs from the checkpoint's run is logged in one line.
        """
        # deviation from reference: the reference kept the optimizer file's learning rate, so
        # --lr given on resume was ignored.
        self.apply_lr(self.global_step)
        for opt in self.task.optimizers():
            for group in opt.param_groups:
                if "weight_decay" in group:
                    group["weight_decay"] = self.options.weight_decay
        self.task.apply_settings(self.start_step)
        saved = (state or {}).get("settings") or {}
        changed = [
            f"{flag} {saved[flag]!r} -> {value!r}"
            for flag, value in self.run_settings().items()
            if flag in saved and saved[flag] != value
        ]
        if changed:
            logger.log(f"resuming with changed settings: {', '.join(changed)}")

    def check_health(self):
        """Stop with NonFiniteLossError when the task reports a broken state."""
        problem = self.task.health_problem()
        if problem is None:
            return
        if self.last_checkpoint:
            advice = (
                f"the last good checkpoint is {self.last_checkpoint}: resume from it with a lower "
                "learning rate"
            )
        else:
            advice = "no checkpoint was saved in this run: start again with a lower learning rate"
        raise NonFiniteLossError(
            f"training stopped at step {self.global_step}: {problem}; nothing was saved after "
            f"that; {advice}"
        )

    # ----------------------------------------------------------------------------- saving

    def marker_path(self, step):
        name = f"{self.task.checkpoint_prefix}{step:06d}{self.task.checkpoint_suffix}"
        return os.path.join(self.log_dir, name)

    def save(self):
        """
        Write the checkpoint set of global_step on rank 0 (every file atomically, the marker
        last), with every rank's training state, then wait for every rank.

        :return: the marker path.
        :raises errors.CheckpointWriteError: when a file cannot be written (disk full, no
            permission); this checkpoint's files are removed and the previous one is intact.
        """
        # Never write a broken state (this may read the task's health flags from the device).
        self.check_health()
        step = self.global_step
        path = self.marker_path(step)
        # A collective: every rank's random streams and data positions go to rank 0.
        state = train_state.gather(step, self.streams, self.task.shared_state(),
                                   settings=self.run_settings())
        if dist_util.is_main_process():
            logger.log(f"saving checkpoint at step {step}: {path}")
            files = self.task.checkpoint_files(self.log_dir, step, state)
            if os.fspath(files[-1][1]) != path:
                raise RuntimeError(f"the last checkpoint file must be {path}, got {files[-1][1]}")
            checkpoints.save_checkpoint_files(files, previous=self.last_checkpoint)
            # Only once the new set is complete on disk.
            self.prune_checkpoints(step)
        self.last_checkpoint = path
        self._saved_at = step
        dist_util.barrier()
        return path

    # ----------------------------------------------------------------------------- run features
    # Kept apart from the loop above: fine-tuning's start, work done every N steps (sample
    # grids, validation), and deleting old checkpoint sets.

    def _start_from(self, init_checkpoint):
        """Load --init_checkpoint's weights into a fresh run; returns the path (or "")."""
        if not init_checkpoint:
            return ""
        if self.resume_checkpoint:
            logger.log(
                f"--init_checkpoint {init_checkpoint} is not used: the run resumes from "
                f"{self.resume_checkpoint}"
            )
            return ""
        if not os.path.exists(init_checkpoint):
            raise FileNotFoundError(
                f"--init_checkpoint {init_checkpoint} does not exist: pass the checkpoint file "
                "to fine-tune (e.g. a released 256x256_diffusion.pt)"
            )
        try:
            self.task.init_from_checkpoint(init_checkpoint)
        except ValueError as exc:
            if str(exc).startswith("cannot read checkpoint"):
                raise ValueError(f"--init_checkpoint: {exc}") from None
            raise
        return init_checkpoint

    def add_periodic(self, interval, function):
        """
        Call function(global_step) after every step whose global_step is a multiple of
        `interval` (on every rank; a function that only rank 0 needs checks the rank itself).
        Steps count resumed ones, so a resumed run calls it where the uninterrupted run does.
        The function must leave the training state alone (random streams, weights, data).
        """
        if interval < 1:
            raise ValueError(f"a periodic interval must be at least 1, got {interval}")
        self._periodic.append((interval, function))

    def run_periodic(self):
        """
        Call the periodic functions due at this step. They only watch the run (sample grids,
        validation), so one that fails (a grid that cannot be written, a full disk, a bad
        image) never costs training: one warning line says what failed, the run goes on and
        saves its checkpoints as usual, and the function is tried again at its next step.
        """
        for interval, function in self._periodic:
            if self.global_step % interval != 0:
                continue
            try:
                function(self.global_step)
            except Exception as exc:  # noqa: BLE001 -- any failure of an observer
                what = getattr(function, "what", getattr(function, "__name__", "a periodic task"))
                why = os_error_text(exc) if isinstance(exc, OSError) else (
                    (str(exc).strip().splitlines() or [type(exc).__name__])[0])
                logger.warn(
                    f"warning: step {self.global_step}: {what} failed ({why}); training goes on "
                    "and its checkpoints are saved as usual"
                )

    def _protected_paths(self):
        """
        The real paths --keep_checkpoints never deletes: the checkpoint this run resumed from
        and the --init_checkpoint file (even on a resumed run, which does not load it again).
        """
        return {os.path.realpath(p) for p in (self.resume_checkpoint, self._init_flag)
                if p and "://" not in os.fspath(p)}

    def _set_steps(self):
        """
        Steps of every checkpoint set in the log folder: (complete ones, all ones). A set counts
        from any of its files, so one whose marker is gone (an interrupted deletion, a crash
        mid-save) is still found and can be deleted whole.
        """
        prefix = self.task.checkpoint_prefix
        # Model and EMA files in either weight format (a run may have switched --save_format).
        marker = re.compile(re.escape(prefix) + r"(\d+)(?:\.pt|\.safetensors)")
        member = re.compile(
            r"(?:(?:" + re.escape(prefix) + r"|ema_.+_)(\d{6,})(?:\.pt|\.safetensors)"
            r"|(?:opt|" + re.escape(train_state.STATE_PREFIX) + r")(\d{6,})\.pt)")
        complete, every = set(), set()
        for name in os.listdir(self.log_dir):
            m = marker.fullmatch(name)
            if m:
                complete.add(int(m.group(1)))
            m = member.fullmatch(name)
            if m:
                every.add(int(m.group(1) or m.group(2)))
        return complete, every | complete

    def prune_checkpoints(self, step):
        """
        Delete the checkpoint sets older than the newest keep_checkpoints complete ones
        (counting the set of `step`, just written), each whole (model, EMA, optimizer, state;
        also the rest of a set whose marker an interrupted deletion removed), never a set that
        holds the file this run resumed from or the --init_checkpoint file, nor sets of later
        steps (another run's). Rank 0.

        Each deletion is written down first (a journal file, PRUNE_JOURNAL) and the journal
        removed last, so a process killed in the middle has its deletion finished at the next
        start (finish_interrupted_pruning).
        """
        if self.keep_checkpoints == KEEP_ALL:
            return
        if "://" in os.fspath(self.log_dir):
            # Object stores (gs://, az://) are listed through blobfile; not supported here.
            logger.warn("--keep_checkpoints applies to local log folders only: nothing deleted")
            return
        complete, every = self._set_steps()
        kept = sorted((s for s in complete if s <= step), reverse=True)[: self.keep_checkpoints]
        protected = self._protected_paths()
        for old in sorted(s for s in every if s <= step and s not in kept):
            paths = self.task.checkpoint_set_paths(self.log_dir, old)
            paths += [p for p in self._orphans(old) if p not in paths]
            if not paths or any(os.path.realpath(p) in protected for p in paths):
                continue
            if self._delete_set(old, paths):
                logger.log(
                    f"--keep_checkpoints {self.keep_checkpoints}: deleted the checkpoint set of "
                    f"step {old} ({', '.join(os.path.basename(p) for p in paths)})"
                )

    def _orphans(self, step):
        """Files of the set of `step` that checkpoint_set_paths may miss once the marker is gone."""
        digits = f"{step:06d}"
        names = [f"{self.task.checkpoint_prefix}{digits}{weights}"
                 for weights in SAVE_FORMATS.values()]
        names += [f"opt{digits}.pt", f"{train_state.STATE_PREFIX}{digits}.pt"]
        ema = re.compile(r"ema_.+_" + re.escape(digits) + r"(?:\.pt|\.safetensors)")
        found = [os.path.join(self.log_dir, n) for n in names
                 if os.path.exists(os.path.join(self.log_dir, n))]
        return found + sorted(os.path.join(self.log_dir, n) for n in os.listdir(self.log_dir)
                              if ema.fullmatch(n))

    def _journal_path(self, step):
        return os.path.join(self.log_dir, f"{PRUNE_JOURNAL}{step:06d}.json")

    def _delete_set(self, step, paths):
        """Delete one set's files, the marker first, under a journal; False on an OSError."""
        journal = self._journal_path(step)
        try:
            write_json(journal, {"step": step, "files": [os.path.basename(p) for p in paths]})
        except OSError as exc:
            logger.warn(f"--keep_checkpoints: nothing deleted ({os_error_text(exc)})")
            return False
        try:
            for path in paths:
                try:
                    os.remove(path)
                except FileNotFoundError:
                    pass
            os.remove(journal)
        except OSError as exc:
            logger.warn(f"--keep_checkpoints: could not delete {exc.filename}: {exc.strerror}")
            return False
        return True

    def finish_interrupted_pruning(self):
        """
        Finish the deletions a process killed while pruning left half done (their journals):
        the rest of each set goes, unless it holds a file this run resumes or starts from.
        Rank 0, at the start of every run (whatever its --keep_checkpoints).
        """
        if not dist_util.is_main_process() or "://" in os.fspath(self.log_dir):
            return
        try:
            names = os.listdir(self.log_dir)
        except OSError:
            return
        journal = re.compile(re.escape(PRUNE_JOURNAL) + r"(\d+)\.json")
        protected = self._protected_paths()
        for name in sorted(names):
            m = journal.fullmatch(name)
            if not m:
                continue
            step = int(m.group(1))
            paths = self.task.checkpoint_set_paths(self.log_dir, step)
            paths += [p for p in self._orphans(step) if p not in paths]
            if any(os.path.realpath(p) in protected for p in paths):
                logger.warn(
                    f"warning: an interrupted --keep_checkpoints deletion of step {step} is left "
                    "as it is: its set holds the checkpoint this run resumes or starts from"
                )
                continue
            if self._delete_set(step, paths) and paths:
                logger.log(
                    f"finished an interrupted --keep_checkpoints deletion: the checkpoint set of "
                    f"step {step} ({', '.join(os.path.basename(p) for p in paths)})"
                )


def check_keep_checkpoints(keep):
    """:raises ValueError: unless keep is KEEP_ALL (-1) or at least 1."""
    if keep != KEEP_ALL and keep < 1:
        raise ValueError(
            f"--keep_checkpoints {keep} would delete every checkpoint, the newest included: pass "
            f"K >= 1 to keep the newest K sets, or {KEEP_ALL} to keep them all"
        )
