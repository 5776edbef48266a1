"""
How every script starts and ends: `run_main(main)` runs a script's main(argv) and turns bad input
into one line "error: ..." with exit status 2 (a full disk, an unwritable folder and a checkpoint
that does not fit are bad input too); on several ranks a failure of one rank ends every rank at
once with one line; single-process tools refuse several ranks.
"""

import errno
import os
import re
import sys
import traceback

import torch

from .. import dist_util, logger
from ..errors import EXIT_INTERRUPTED, NonFiniteLossError, ScriptError, StorageError
from ..runtime import log_folder, run_record
from ..runtime.files import os_error_text
from ..runtime.perf import preserved_float32_precision, set_tf32


def run_main(main, argv=None):
    """
    Run a script's main(argv) and turn bad input into one line "error: ..." and exit status 2,
    instead of a traceback.

    ValueError (ScriptError, unreadable images, a launcher/MPI mismatch, ...), FileNotFoundError
    and NotImplementedError (an unknown schedule sampler) count as bad input, and so do storage
    failures (an unwritable log folder, a checkpoint that cannot be written, a full disk) and
    running out of memory (the line names the flags that use less). Set GD_TRACEBACK=1 to see
    the traceback. A training or sampling run stopped by SIGTERM/SIGUSR1/SIGINT leaves through
    errors.RunStopped (exit status 75, or 130 for training after Ctrl-C), untouched here; a
    Ctrl-C that stops at once gives one line and exit status 130 (stop_at_once).

    On several ranks a failure of one rank ends the whole job at once (dist_util.abort_job),
    with one line for it: its own "error (rank r): ..." line, or, on a rank whose collective
    failed because another rank is gone, "error (rank r): lost contact with the other ranks";
    a bug prints its traceback once, on the rank that hit it.

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
        if isinstance(exc, OSError) and storage_error_message(exc) is None:
            _fail_distributed(exc)
            raise
        # A training run refused before it started leaves no log folder it made.
        log_folder.remove_unstarted_folders()
        exit_with_error(exc, _prefix(), 2)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        stop_at_once()
    except BaseException as exc:
        _fail_distributed(exc)
        raise
    finally:
        log_folder.release_folders()
        # A run this script began but never started must not record its flags later in this
        # process (a library Trainer run after a refused script, a notebook's next cell).
        run_record.drop_held_record()


def stop_at_once():
    """
    Leave after a Ctrl-C that no loop turned into a clean stop (one before the loop started in a
    process that does not record signals, or a second one): one line instead of a traceback,
    exit status EXIT_INTERRUPTED (130). Every file is written atomically, so the one being
    written when it came was discarded whole.
    """
    if os.environ.get("GD_TRACEBACK"):
        traceback.print_exc()
    rank = dist_util.get_rank()
    if rank == 0:  # on several ranks every rank got it: one line is enough
        print(
            f"interrupted: stopped at once by Ctrl-C; a file being written was discarded, the "
            f"files finished before are intact (exit status {EXIT_INTERRUPTED})",
            file=sys.stderr, flush=True,
        )
    sys.stdout.flush()
    if dist_util.is_distributed():
        dist_util.abort_job(EXIT_INTERRUPTED)
    sys.exit(EXIT_INTERRUPTED)


def _prefix():
    rank = dist_util.get_rank()
    return "error" if rank == 0 else f"error (rank {rank})"


def _fail_distributed(exc):
    """
    An exception that is not bad input, on one rank of several: print it (one line for a lost
    peer or an out-of-memory error, else the traceback) and end the job; on one process, return
    (the caller re-raises: out-of-memory errors get their line there too).
    """
    out_of_memory = _out_of_memory_message(exc)
    if not dist_util.is_distributed():
        if out_of_memory is not None:
            exit_with_error(exc, _prefix(), 2, message=out_of_memory)
        return
    if out_of_memory is not None:
        exit_with_error(exc, _prefix(), 2, message=out_of_memory)
    if dist_util.is_collective_failure(exc):
        line = (
            f"{_prefix()}: lost contact with the other ranks ({_backend_reason(exc)}): another "
            "rank failed, was killed or hangs (its own line says why)"
        )
        if os.environ.get("GD_TRACEBACK"):
            traceback.print_exc()
        print(line, file=sys.stderr, flush=True)
        # Not the cause: no torchrun error file, so torchrun names the failing rank as the root.
        dist_util.abort_job(1)
    # A bug: its traceback, once, on the rank that hit it; then the job ends.
    print(f"{_prefix()}: {type(exc).__name__} (traceback below)", file=sys.stderr, flush=True)
    traceback.print_exc()
    dist_util.abort_job(1, message=f"{_prefix()}: {type(exc).__name__}: {_shorten(str(exc))}")


def _backend_reason(exc):
    """
    What a failed collective says, in a few words: gloo's message starts with its source
    position ("[.../pair.cc:553] Connection closed by peer [127.0.0.1]:31450. This is ...").
    """
    text = " ".join(str(exc).split()) or type(exc).__name__
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)
    return _shorten(text.split(". ")[0], 120)


def _shorten(text, limit=200):
    # gloo's and NCCL's messages run on (source paths, advice); the first sentence says it.
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _out_of_memory_message(exc):
    """One line for an out-of-memory error (naming the flags that use less), else None."""
    oom = getattr(torch, "OutOfMemoryError", None)
    if not ((oom is not None and isinstance(exc, oom)) or isinstance(exc, MemoryError)):
        return None
    first = (str(exc).strip().splitlines() or ["out of memory"])[0].split(". ")[0]
    return (
        f"out of memory ({_shorten(first, 120)}): lower --batch_size, or set --microbatch to a "
        "part of it (training), or use --use_fp16/--use_bf16"
    )


def exit_with_error(exc, prefix, status, message=None):
    """
    Print an exception as the one line "<prefix>: <first line of its message>" on stderr and
    leave with `status`; an OSError that is not a storage problem (storage_error_message) is
    re-raised with its traceback instead. Call it from an except block.

    On several ranks an error every rank raised alike (exc.same_on_every_rank, e.g. a log folder
    in use, decided by rank 0) is printed by rank 0 alone and every rank leaves normally; any
    other error ends the whole job at once (dist_util.abort_job).

    :param message: the line to print instead of the exception's own.
    """
    if message is None and isinstance(exc, OSError):
        message = storage_error_message(exc)
        if message is None:
            raise exc
    if os.environ.get("GD_TRACEBACK"):
        traceback.print_exc()
    if message is None:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    line = f"{prefix}: {message}"
    agreed = getattr(exc, "same_on_every_rank", False)
    if not (agreed and dist_util.get_rank() > 0):
        print(line, file=sys.stderr, flush=True)
    sys.stdout.flush()
    if dist_util.is_distributed() and not agreed:
        # Other ranks may wait in a collective for this one: leaving through the normal
        # shutdown (process-group teardown, MPI_Finalize) would wait for them in turn.
        dist_util.abort_job(status, message=line)
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
        return os_error_text(exc)
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
    refuse several ranks and apply --tf32. The log folder comes later (open_tool_log), once the
    model and the inputs are checked, so that a run refused on them leaves no folder behind.

    :param script: the script's file name, for the refusal message.
    :param args: the parsed flags (tf32).
    """
    dist_util.setup_dist()
    require_single_process(script)
    set_tf32(args.tf32)


def open_tool_log(args):
    """Open a one-process tool's log folder (--log_dir, else $OPENAI_LOGDIR or a dated one)."""
    logger.configure(dir=args.log_dir or None)


def step_table(results, columns):
    """
    The text table the DDIM tools print: one line per step count, each value right-aligned
    under its column's title.

    :param results: {steps: {key: number}}.
    :param columns: [(title, key, decimals)], in print order.
    :return: the table as one string.
    """
    lines = ["  ".join(["steps", *(title for title, _, _ in columns)])]
    for steps, row in results.items():
        cells = [f"{row[key]:>{len(title)}.{decimals}f}" for title, key, decimals in columns]
        lines.append("  ".join([f"{steps:>5}", *cells]))
    return "\n".join(lines)
