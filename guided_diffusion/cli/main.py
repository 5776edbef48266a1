"""
How every script starts and ends: `run_main(main)` runs a script's main(argv) and turns bad input
into one line "error: ..." with exit status 2 (a full disk, an unwritable folder and a checkpoint
that does not fit are bad input too); single-process tools refuse several ranks.
"""

import errno
import os
import sys
import traceback

from .. import dist_util, logger
from ..errors import NonFiniteLossError, ScriptError, StorageError
from ..runtime.perf import preserved_float32_precision, set_tf32


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
    if isinstance(exc, StorageError):
        return str(exc).strip().splitlines()[0]
    if isinstance(exc, (FileNotFoundError, NotADirectoryError)) or exc.errno in _STORAGE_ERRNOS:
        if exc.strerror is None:  # raised by our code with a message of its own
            return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    return None


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
