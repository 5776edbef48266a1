"""
Key-value and text logging with the interface of OpenAI's baselines logger (as used by
guided-diffusion).

Typical use: configure() once, then per iteration logkv()/logkv_mean() and finally dumpkvs(), which
writes one row of diagnostics to every output format; log() writes free text.

- The folder is configure(dir=...), else $OPENAI_LOGDIR, else a new dated folder in the temp dir.
- Rank 0 writes the formats in $OPENAI_LOG_FORMAT (default "stdout,log,csv": the terminal,
  log.txt, progress.csv); other ranks write $OPENAI_LOG_FORMAT_MPI (default "log") with the suffix
  "-rankNNN", i.e. log-rank001.txt.
- In a distributed job dumpkvs() averages every numeric value over the ranks, weighting each
  logkv_mean() value by how many times it was logged; every rank must then call dumpkvs() at the
  same point, as with any collective operation.
"""

import datetime
import errno
import json
import os
import os.path as osp
import secrets
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from contextlib import contextmanager

from .errors import UnwritableLogDirError
from .runtime.files import atomic_write

DEBUG = 10
INFO = 20
WARN = 30
ERROR = 40

DISABLED = 50


class KVWriter:
    """An output that records one dict of diagnostics per dumpkvs()."""

    def writekvs(self, kvs):
        raise NotImplementedError


class SeqWriter:
    """An output that records free-text log lines."""

    def writeseq(self, seq):
        raise NotImplementedError


def _plain(value):
    """Turn 0-dim tensors and numpy scalars into Python numbers so they print like numbers."""
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        return value.item()
    return value


def _table_text(value):
    """
    A value as the human-readable table shows it: whole numbers in full (a step count of 2000
    is "2000", not "2e+03", even after dumpkvs() averaged it over ranks into a float), other
    numbers with 3 significant digits, anything else as str().
    """
    value = _plain(value)
    if isinstance(value, bool) or not hasattr(value, "__float__"):
        return str(value)
    number = float(value)
    if number.is_integer() and abs(number) < 1e15:
        return "%-8d" % number
    return "%-8.3g" % number


class HumanOutputFormat(KVWriter, SeqWriter):
    """A table of key | value rows for people, written to a file name or an open text stream."""

    def __init__(self, filename_or_file):
        """
        :param filename_or_file: a path to create, or an open text stream (e.g. sys.stdout) that
                                 stays open when this writer is closed.
        """
        if isinstance(filename_or_file, (str, os.PathLike)):
            self.file = open(filename_or_file, "wt")
            self.own_file = True
        else:
            if not hasattr(filename_or_file, "write"):
                raise TypeError(f"expected a file name or a text stream, got {filename_or_file!r}")
            self.file = filename_or_file
            self.own_file = False

    @staticmethod
    def _truncate(text, max_len=30):
        return text if len(text) <= max_len else text[: max_len - 3] + "..."

    def writekvs(self, kvs):
        rows = {}
        for key, value in kvs.items():
            rows[self._truncate(str(key))] = self._truncate(_table_text(value))
        if not rows:
            warnings.warn("logger: dumpkvs() with nothing logged")
            return
        key_width = max(len(k) for k in rows)
        value_width = max(len(v) for v in rows.values())
        rule = "-" * (key_width + value_width + 7)
        lines = [rule]
        for key in sorted(rows, key=str.lower):
            lines.append(f"| {key.ljust(key_width)} | {rows[key].ljust(value_width)} |")
        lines.append(rule)
        self.file.write("\n".join(lines) + "\n")
        self.file.flush()

    def writeseq(self, seq):
        self.file.write(" ".join(seq) + "\n")
        self.file.flush()

    def close(self):
        if self.own_file:
            self.file.close()


class JSONOutputFormat(KVWriter):
    """One JSON object per dumpkvs(), one per line."""

    def __init__(self, filename):
        self.file = open(filename, "wt")

    def writekvs(self, kvs):
        row = {}
        for key, value in sorted(kvs.items()):
            value = _plain(value)
            row[key] = float(value) if hasattr(value, "dtype") else value
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def close(self):
        self.file.close()


class CSVOutputFormat(KVWriter):
    """
    A CSV table, one row per dumpkvs(). When a row brings keys not seen before, the header is
    rewritten with the new columns appended and earlier rows get empty cells for them.

    deviation from reference: the file is created at the first dumpkvs(), not at configure(), so
    a run that logs no diagnostics (sampling) leaves no empty progress.csv behind, and a resumed
    run that fails before its first row keeps the previous run's table.
    """

    def __init__(self, filename):
        folder = osp.dirname(osp.abspath(filename))
        if not os.access(folder, os.W_OK):  # say so now, not at the first row
            raise PermissionError(errno.EACCES, "Permission denied", folder)
        self.filename = filename
        self.file = None
        self.keys = []
        self.sep = ","

    def writekvs(self, kvs):
        if self.file is None:
            self.file = open(self.filename, "w+t")
        new_keys = sorted(set(kvs) - set(self.keys))
        if new_keys:
            self.keys.extend(new_keys)
            self.file.seek(0)
            old_rows = self.file.read().splitlines()[1:]
            self.file.seek(0)
            self.file.truncate()
            self.file.write(self.sep.join(self.keys) + "\n")
            padding = self.sep * len(new_keys)
            for row in old_rows:
                self.file.write(row + padding + "\n")
        cells = []
        for key in self.keys:
            value = kvs.get(key)
            cells.append("" if value is None else str(_plain(value)))
        self.file.write(self.sep.join(cells) + "\n")
        self.file.flush()

    def close(self):
        if self.file is not None:
            self.file.close()


class TensorBoardOutputFormat(KVWriter):
    """
    Scalars in TensorBoard's event format, one step per dumpkvs().

    deviation from reference: written with torch.utils.tensorboard (needs the tensorboard package)
    instead of TensorFlow.
    """

    def __init__(self, dir):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ImportError(
                "the 'tensorboard' log format needs the tensorboard package: pip install "
                "'guided-diffusion[tensorboard]' (or pip install tensorboard)"
            ) from exc
        os.makedirs(dir, exist_ok=True)
        self.writer = SummaryWriter(log_dir=dir)
        self.step = 1

    def writekvs(self, kvs):
        for key, value in kvs.items():
            value = _plain(value)
            if hasattr(value, "__float__"):
                self.writer.add_scalar(key, float(value), self.step)
        self.writer.flush()
        self.step += 1

    def write_image(self, key, image, step):
        """
        Add one uint8 HWC image (e.g. a grid of samples) under `key` at training step `step`.
        Images are indexed by the training step, scalars by the dumpkvs() count.
        """
        self.writer.add_image(key, image, step, dataformats="HWC")
        self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class WandbOutputFormat(KVWriter):
    """
    A Weights & Biases run: the rows of progress.csv as scalars and the sample grids as images
    (images/samples), both at the training step (the row's "step"; a counter of rows when it has
    none).

    Offline unless $WANDB_MODE says otherwise: the run is written under wandb/ in the log folder
    (or $WANDB_DIR) and needs no network; `wandb sync` uploads it later. Other W&B variables
    ($WANDB_PROJECT, $WANDB_NAME, $WANDB_ENTITY, $WANDB_RUN_ID ...) keep their meaning. The run id
    is kept in the log folder (wandb-run-id.txt), so a resumed run continues the same W&B run.
    An addition to the reference (needs the wandb package).
    """

    ID_FILE = "wandb-run-id.txt"

    def __init__(self, dir):
        try:
            import wandb
        except ImportError:
            raise ImportError(
                "the 'wandb' log format needs the wandb package: pip install "
                "'guided-diffusion[wandb]' (or pip install wandb)"
            ) from None
        self._wandb = wandb
        self.step = 1
        env = os.environ
        settings = wandb.Settings(
            # The terminal stays ours (log.txt has it all): no console capture, no banners.
            console=env.get("WANDB_CONSOLE", "off"),
            silent=env.get("WANDB_SILENT", "true").lower() in ("1", "true", "yes"),
            # args.json records the commit already; W&B's own look-up warns outside a checkout.
            disable_git=True,
        )
        self.run = wandb.init(
            project=env.get("WANDB_PROJECT") or "guided-diffusion",
            name=env.get("WANDB_NAME") or osp.basename(osp.abspath(dir)),
            dir=None if env.get("WANDB_DIR") else dir,
            # A cluster node often has no network: never let a run wait for one unasked.
            mode=None if env.get("WANDB_MODE") else "offline",
            id=None if env.get("WANDB_RUN_ID") else self._run_id(dir),
            resume="allow",
            settings=settings,
        )

    @classmethod
    def _run_id(cls, dir):
        path = osp.join(dir, cls.ID_FILE)
        try:
            with open(path) as f:
                run_id = f.read().strip()
            if run_id:
                return run_id
        except FileNotFoundError:
            pass
        # W&B ids are short strings of letters and digits; any unique one does.
        run_id = secrets.token_hex(4)
        # Atomic: a run stopped here leaves no empty id file for its resume to trip over.
        atomic_write(path, lambda f: f.write((run_id + "\n").encode()))
        return run_id

    def writekvs(self, kvs):
        scalars = {}
        for key, value in kvs.items():
            value = _plain(value)
            if hasattr(value, "__float__") and not isinstance(value, str):
                scalars[key] = float(value)
        step = int(scalars["step"]) if "step" in scalars else self.step
        self.run.log(scalars, step=step)
        self.step = step + 1

    def write_image(self, key, image, step):
        """
        Add one uint8 HWC image as images/<key> at training step `step` (a key of its own: the
        sample grid's "samples" is also the scalar counting the images trained on, and a W&B row
        holds one value per key).
        """
        self.run.log({f"images/{key}": self._wandb.Image(image)}, step=int(step))

    def write_config(self, config):
        """Record the run's flags as the W&B run's config."""
        self.run.config.update(dict(config), allow_val_change=True)

    def close(self):
        if self.run is not None:
            self.run.finish()
            self.run = None


class _CurrentStdout:
    """sys.stdout as it is at each write (see make_output_format)."""

    def write(self, text):
        return sys.stdout.write(text)

    def flush(self):
        sys.stdout.flush()


def make_output_format(format, ev_dir, log_suffix=""):
    """
    Build one output: "stdout", "log" (log<suffix>.txt), "json" (progress<suffix>.json),
    "csv" (progress<suffix>.csv), "tensorboard" (tb<suffix>/) or "wandb" (a W&B run, offline
    unless $WANDB_MODE says otherwise).
    """
    os.makedirs(ev_dir, exist_ok=True)
    if format == "stdout":
        # deviation from reference: the reference holds the stream that was sys.stdout when the
        # logger was made; the default logger outlives redirections of stdout (redirect_stdout,
        # a notebook's cell capture, pytest's capsys), and a stream held from before one may
        # since have been closed ("I/O operation on closed file").
        return HumanOutputFormat(_CurrentStdout())
    if format == "log":
        return HumanOutputFormat(osp.join(ev_dir, f"log{log_suffix}.txt"))
    if format == "json":
        return JSONOutputFormat(osp.join(ev_dir, f"progress{log_suffix}.json"))
    if format == "csv":
        return CSVOutputFormat(osp.join(ev_dir, f"progress{log_suffix}.csv"))
    if format == "tensorboard":
        return TensorBoardOutputFormat(osp.join(ev_dir, f"tb{log_suffix}"))
    if format == "wandb":
        return WandbOutputFormat(ev_dir)
    raise ValueError(
        f"unknown log format {format!r}: use stdout, log, json, csv, tensorboard or wandb "
        "(check OPENAI_LOG_FORMAT / OPENAI_LOG_FORMAT_MPI)"
    )


# ================================================================
# Module-level API: forwards to the current logger
# ================================================================


def logkv(key, val):
    """Record a diagnostic for this iteration; a later call with the same key replaces it."""
    get_current().logkv(key, val)


def logkv_mean(key, val, count=1):
    """
    Like logkv(), but repeated calls in one iteration are averaged.

    :param val: a number, or a tensor (e.g. on a GPU). Tensors are accumulated on their device and
        read once, at dumpkvs(): logging from a training step then never waits for the device.
    :param count: how many observations val is the mean of (a number or a tensor; 0 ignores val,
        even a non-finite one). An addition to the reference, which counts every call as one.
    """
    get_current().logkv_mean(key, val, count)


def logkvs(d):
    """logkv() every item of a dict."""
    for key, value in d.items():
        logkv(key, value)


def dumpkvs():
    """Write this iteration's diagnostics to every output and start a new row; returns the row."""
    return get_current().dumpkvs()


def getkvs():
    """The diagnostics recorded so far in this iteration (reads any pending tensor values)."""
    return get_current().getkvs()


def log(*args, level=INFO):
    """Write the arguments, separated by spaces, to the text outputs (terminal, log.txt)."""
    get_current().log(*args, level=level)


def log_config(config):
    """Send the run's flags (a dict) to the outputs that keep them (W&B); the others ignore it."""
    for fmt in get_current().output_formats:
        if hasattr(fmt, "write_config"):
            fmt.write_config(config)


def log_image(key, image, step):
    """
    Send an image to the outputs that take images (TensorBoard, W&B); the others ignore it.

    :param key: its name, e.g. "samples".
    :param image: a uint8 array [H, W, C].
    :param step: the training step it belongs to.
    """
    for fmt in get_current().output_formats:
        if hasattr(fmt, "write_image"):
            fmt.write_image(key, image, step)


# Lines said before the log folder exists (e.g. which flags an args.json gave), written by the
# next configure() right after it opens the outputs; see hold_lines.
_held_lines = []


def hold_lines(lines):
    """
    Keep these lines for the next configure(), which logs them first thing, replacing any lines
    held before (so a run refused before configure() leaves none for the next one). Scripts that
    read their flags before they may create the log folder use it.
    """
    _held_lines[:] = [str(line) for line in lines]


def debug(*args):
    log(*args, level=DEBUG)


def info(*args):
    log(*args, level=INFO)


def warn(*args):
    log(*args, level=WARN)


def error(*args):
    log(*args, level=ERROR)


def set_level(level):
    """Drop log() messages below this level (DEBUG, INFO, WARN, ERROR or DISABLED)."""
    get_current().set_level(level)


def set_comm(comm):
    """Average dumpkvs() values over this mpi4py communicator."""
    get_current().set_comm(comm)


def get_dir():
    """The folder the current logger writes to."""
    return get_current().get_dir()


record_tabular = logkv
dump_tabular = dumpkvs


@contextmanager
def profile_kv(scopename):
    """Add the seconds spent inside the block to the diagnostic "wait_<scopename>"."""
    key = "wait_" + scopename
    start = time.time()
    try:
        yield
    finally:
        get_current().name2val[key] += time.time() - start


def profile(n):
    """Decorator form of profile_kv: @profile("name")."""

    def decorate(func):
        def timed(*args, **kwargs):
            with profile_kv(n):
                return func(*args, **kwargs)

        return timed

    return decorate


# ================================================================
# Backend
# ================================================================


def get_current():
    """The logger the module-level functions use (configured with defaults on first use)."""
    if Logger.CURRENT is None:
        _configure_default_logger()
    return Logger.CURRENT


def _torch_dist():
    """torch.distributed when a process group of more than one rank is running, else None."""
    try:
        import torch.distributed as dist
    except ImportError:
        return None
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist
    return None


class Logger:
    """Collects one iteration's diagnostics and sends them and log lines to its outputs."""

    DEFAULT = None  # the logger made on first use without configure()
    CURRENT = None  # the logger the module-level functions use

    def __init__(self, dir, output_formats, comm=None):
        """
        :param dir: the log folder.
        :param output_formats: a list of KVWriter/SeqWriter objects.
        :param comm: an mpi4py communicator to average over; None averages over the
                     torch.distributed group when one is running.
        """
        self.name2val = defaultdict(float)
        self.name2cnt = defaultdict(int)
        # key -> [weighted sum, count] of tensor values not read yet (see logkv_mean).
        self.name2pending = {}
        self.level = INFO
        self.dir = dir
        self.output_formats = output_formats
        self.comm = comm

    def logkv(self, key, val):
        self.name2val[key] = val

    def logkv_mean(self, key, val, count=1):
        if _is_tensor(val) or _is_tensor(count):
            self._add_pending(key, val, count)
            return
        if not count:
            return
        # Running mean, so only the mean and the count need storing.
        old, seen = self.name2val[key], self.name2cnt[key]
        self.name2val[key] = old * seen / (seen + count) + val * count / (seen + count)
        self.name2cnt[key] = seen + count

    def _add_pending(self, key, val, count):
        # deviation from reference: tensors are summed where they live, so a training step can
        # log without a device-to-host copy; _read_pending() reads them all in one go.
        import torch

        if _is_tensor(val):
            val = val.detach()
            dtype = torch.float32 if val.device.type == "mps" else torch.float64
            val = val.to(dtype)
        if _is_tensor(count):
            count = count.detach().to(val.dtype if _is_tensor(val) else torch.float64)
            # A value that does not count (count 0) may be inf or NaN (a skipped step's norm).
            weighted = torch.where(count > 0, val * count, 0.0)
        else:
            weighted = val * count
        pending = self.name2pending.get(key)
        if pending is None:
            self.name2pending[key] = [weighted, count]
        else:
            pending[0] = pending[0] + weighted
            pending[1] = pending[1] + count

    def _read_pending(self):
        """Fold the pending tensor sums into the running means (one copy per device)."""
        if not self.name2pending:
            return
        import torch

        pending, self.name2pending = self.name2pending, {}
        by_device = defaultdict(list)
        for key, (total, count) in pending.items():
            device = next((v.device for v in (total, count) if _is_tensor(v)), None)
            by_device[device].append(key)
        for device, keys in by_device.items():
            table = [torch.stack([_as_device_scalar(v, device) for v in pending[key]]) for key in keys]
            values = torch.stack(table).cpu().tolist()
            for key, (total, count) in zip(keys, values):
                if count > 0:
                    self.logkv_mean(key, total / count, count)

    def getkvs(self):
        """The diagnostics recorded so far in this iteration."""
        self._read_pending()
        return self.name2val

    def _value_counts(self):
        # Values set with logkv() weigh 1, as in the reference.
        return {key: (val, self.name2cnt.get(key, 1)) for key, val in self.name2val.items()}

    def dumpkvs(self):
        self._read_pending()
        if self.comm is not None:
            row = mpi_weighted_mean(self.comm, self._value_counts())
        else:
            # deviation from reference: without an explicit comm the reference wrote each rank's
            # own values; we average over the torch.distributed group whenever one is running.
            dist = _torch_dist()
            if dist is None:
                row = dict(self.name2val)
            else:
                row = _torch_weighted_mean(dist, self._value_counts())
        for fmt in self.output_formats:
            if isinstance(fmt, KVWriter):
                fmt.writekvs(row)
        self.name2val.clear()
        self.name2cnt.clear()
        self.name2pending.clear()
        return dict(row)

    def log(self, *args, level=INFO):
        if self.level <= level:
            for fmt in self.output_formats:
                if isinstance(fmt, SeqWriter):
                    fmt.writeseq([str(a) for a in args])

    def set_level(self, level):
        self.level = level

    def set_comm(self, comm):
        self.comm = comm

    def get_dir(self):
        return self.dir

    def close(self):
        for fmt in self.output_formats:
            fmt.close()


def _is_tensor(value):
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def _as_device_scalar(value, device):
    """A pending sum or count as a 0-dim float tensor on `device` (numbers are filled there)."""
    import torch

    dtype = torch.float32 if device is not None and device.type == "mps" else torch.float64
    if _is_tensor(value):
        return value.reshape(()).to(dtype)
    return torch.full((), float(value), dtype=dtype, device=device)


def _as_float(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _combine(per_rank):
    """Weighted means over a list of {key: (value, count)} dicts; non-numbers are skipped."""
    sums = defaultdict(float)
    counts = defaultdict(float)
    for name2valcount in per_rank:
        for key, (value, count) in name2valcount.items():
            number = _as_float(value)
            if number is None:
                warnings.warn(f"logger: cannot average non-numeric {key}={value!r}")
                continue
            sums[key] += number * count
            counts[key] += count
    return {key: sums[key] / counts[key] for key in sums}


def mpi_weighted_mean(comm, local_name2valcount):
    """
    Weighted mean of {key: (value, count)} over the ranks of an mpi4py communicator.

    deviation from reference: every rank receives the means (allgather), not only rank 0.
    """
    return _combine(comm.allgather(local_name2valcount))


def _torch_weighted_mean(dist, local_name2valcount):
    """Weighted mean of {key: (value, count)} over the torch.distributed group."""
    import torch

    numeric = {}
    row = {}
    for key, (value, count) in local_name2valcount.items():
        number = _as_float(value)
        if number is None:
            row[key] = value  # text stays as this rank logged it
        else:
            numeric[key] = (number, count)
    # Ranks may have logged different keys; agree on their union before reducing a table.
    key_lists = [None] * dist.get_world_size()
    dist.all_gather_object(key_lists, sorted(numeric))
    keys = sorted(set().union(*key_lists))
    if not keys:
        return row
    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    table = torch.zeros(len(keys), 2, dtype=torch.float64, device=device)
    for i, key in enumerate(keys):
        if key in numeric:
            number, count = numeric[key]
            table[i, 0] = number * count
            table[i, 1] = count
    dist.all_reduce(table)
    table = table.cpu()
    for i, key in enumerate(keys):
        row[key] = (table[i, 0] / table[i, 1]).item()
    return row


def _get_rank():
    """This process's rank, also before torch.distributed is set up (from launcher variables)."""
    dist = _torch_dist()
    if dist is not None:
        return dist.get_rank()
    for name in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"):
        if name in os.environ:
            return int(os.environ[name])
    return 0


def get_rank_without_mpi_import():
    """Rank from the launcher's environment variables (never imports mpi4py)."""
    return _get_rank()


def _shared_dated_dir():
    path = osp.join(
        tempfile.gettempdir(), datetime.datetime.now().strftime("openai-%Y-%m-%d-%H-%M-%S-%f")
    )
    dist = _torch_dist()
    if dist is not None:
        # deviation from reference: every rank would otherwise date its own folder; use rank 0's.
        box = [path]
        dist.broadcast_object_list(box, src=0)
        path = box[0]
    return path



def configure(dir=None, format_strs=None, comm=None, log_suffix=""):
    """
    Start a new current logger.

    :param dir: the log folder; default $OPENAI_LOGDIR, else a dated folder in the temp dir.
    :param format_strs: output formats; default $OPENAI_LOG_FORMAT ("stdout,log,csv") on rank 0
                        and $OPENAI_LOG_FORMAT_MPI ("log") on other ranks.
    :param comm: an mpi4py communicator to average diagnostics over (default: the
                 torch.distributed group when one is running).
    :param log_suffix: appended to the file names; ranks above 0 also add "-rankNNN".
    """
    if dir is None:
        dir = os.getenv("OPENAI_LOGDIR")
    if dir is None:
        dir = _shared_dated_dir()
    dir = osp.expanduser(os.fspath(dir))

    rank = _get_rank()
    if rank > 0:
        log_suffix = log_suffix + "-rank%03i" % rank
    if format_strs is None:
        if rank == 0:
            format_strs = os.getenv("OPENAI_LOG_FORMAT", "stdout,log,csv").split(",")
        else:
            format_strs = os.getenv("OPENAI_LOG_FORMAT_MPI", "log").split(",")
    try:
        os.makedirs(dir, exist_ok=True)
        output_formats = [make_output_format(f, dir, log_suffix) for f in format_strs if f]
    except OSError as exc:
        # deviation from reference: one line saying what to do instead of a traceback.
        raise UnwritableLogDirError(
            f"cannot write to the log folder {dir} ({exc.strerror or exc}): pass --log_dir (or "
            "set OPENAI_LOGDIR to) a folder you can write to"
        ) from None

    Logger.CURRENT = Logger(dir=dir, output_formats=output_formats, comm=comm)
    if output_formats:
        log("Logging to %s" % dir)
    held, _held_lines[:] = list(_held_lines), []
    for line in held:
        log(line)


def _configure_default_logger():
    configure()
    Logger.DEFAULT = Logger.CURRENT


def reset():
    """Close the current logger and go back to the default one."""
    if Logger.CURRENT is not Logger.DEFAULT:
        Logger.CURRENT.close()
        Logger.CURRENT = Logger.DEFAULT
        log("Reset logger")


@contextmanager
def scoped_configure(dir=None, format_strs=None, comm=None):
    """Use a new logger inside a with-block, then close it and restore the previous one."""
    previous = Logger.CURRENT
    configure(dir=dir, format_strs=format_strs, comm=comm)
    try:
        yield
    finally:
        Logger.CURRENT.close()
        Logger.CURRENT = previous
