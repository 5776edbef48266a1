"""
One training job per log folder (one sampling job per output folder), and no leftovers of an
interrupted save in it.

Two jobs writing one folder interleave progress.csv, truncate each other's log.txt and replace
each other's checkpoints. A job therefore holds an exclusive lock on the file `job.lock` in its
log folder while it runs: a POSIX record lock (fcntl), which the kernel releases when the process
ends however it ends (killed, crashed, out of memory), so a dead job never leaves a stale lock
behind. Unlike flock(2) locks, record locks are not inherited by forked children, so a data-loader
worker that outlives its parent for a moment does not keep the folder locked; they also work over
NFS. The file's text (who took it, when) is only used to say who holds the lock; the file is never
removed, since removing it could let two jobs lock two different files of the same name.

Holding the lock also makes it safe to delete the temporary files (".<name>.<random>.tmp", see
runtime.files.atomic_write) that a save killed mid-write left behind: no live job is writing them.

Where a file system offers no locks (some Lustre and old NFS mounts), the job runs without one
after a warning.
"""

import datetime
import errno
import os
import re
import socket

from .. import dist_util
from ..errors import LogFolderInUseError

try:
    import fcntl
except ImportError:  # Windows: no fcntl locks; the folder stays unlocked there
    fcntl = None

LOCK_NAME = "job.lock"

# atomic_write's temporary names: "." + the final name + "." + mkstemp's random part + ".tmp".
_TEMPORARY = re.compile(r"\..+\.[A-Za-z0-9_]{6,}\.tmp")

# Locked folders of this process: real path -> the open lock file (the lock lives as long as it).
_held = {}

# Log folders this process created for a run that has not started yet (note_new_folder): a run
# refused before its first step removes them again (remove_unstarted_folders).
_unstarted = []
# What a refused start may have written into a folder it created: the lock and the logger's files.
_RUN_START_FILES = re.compile(r"job\.lock|log(-rank\d+)?\.txt|progress(-rank\d+)?\.(csv|json)|tb(-rank\d+)?")


class Use:
    """
    What a job uses a folder for, as its refusal of a second job says it: "the <what> <folder> is
    in use by another <job> (...): <why>: wait for that job to end (or stop it), or pass another
    <flag>"; and where in the folder its lock file is (lock_name, a relative path).
    """

    def __init__(self, what, job, why, flag, lock_name=LOCK_NAME):
        self.what, self.job, self.why, self.flag = what, job, why, flag
        self.lock_name = lock_name


TRAINING = Use("log folder", "training job",
               "two jobs in one folder would overwrite each other's checkpoints and logs",
               "--log_dir")


def lock_folder(folder, use=TRAINING):
    """
    Take the exclusive lock of a log folder for this process (again: nothing happens).

    :param folder: the log folder; created when missing.
    :param use: what the folder is for, in the refusal's words, and its lock file (a Use:
        TRAINING, or runtime.kept_rounds.SAMPLING).
    :return: None when locked (or locks are unsupported: then a warning text is returned
        instead, for the caller to log).
    :raises LogFolderInUseError: when another live process holds it, with a one-line message.
    :raises OSError: when the folder or the lock file cannot be created.
    """
    real = os.path.realpath(folder)
    if real in _held or fcntl is None:
        return None
    path = os.path.join(folder, use.lock_name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    handle = open(path, "a+")
    try:
        fcntl.lockf(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            handle.seek(0)
            holder = " ".join(handle.read().split()) or "a process that did not say who it is"
            handle.close()
            raise LogFolderInUseError(
                f"the {use.what} {folder} is in use by another {use.job} ({holder}; lock "
                f"file {path}): {use.why}: wait for that job to end (or stop it), or pass "
                f"another {use.flag}"
            ) from None
        handle.close()
        return (
            f"warning: {folder} does not support file locks ({exc.strerror or exc}): nothing "
            f"stops a second job from using this {use.what} at the same time"
        )
    started = datetime.datetime.now().isoformat(sep=" ", timespec="seconds")
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {started}\n")
    handle.flush()
    _held[real] = handle
    return None


def claim_folder(folder, use=TRAINING, clean=True):
    """
    Make this job the only one using `folder`: rank 0 takes its lock and removes the temporary
    files an interrupted save left there; every rank learns the outcome, so all refuse together
    (every rank must call it at the same point).

    :param use: what the folder is for (see lock_folder).
    :param clean: remove the stray temporaries (only safe where no other kind of job, holding
        another lock, may be writing into the folder).
    :return: lines to log once the logger is open (what was removed, a file system without
        locks).
    :raises LogFolderInUseError: on every rank, when another live job holds the folder.
    """
    problem, notes = None, []
    if dist_util.is_main_process():
        try:
            warning = lock_folder(folder, use)
            notes += [warning] if warning else []
            removed = remove_stray_temporaries(folder) if clean else []
            if removed:
                notes.append(
                    f"removed {len(removed)} temporary file(s) that an interrupted save left in "
                    f"{folder}: {', '.join(removed)}"
                )
        except LogFolderInUseError as exc:
            problem = str(exc)
        except OSError:
            pass  # an unwritable folder: the first write there says so in its own words
    problem = dist_util.broadcast_from_main(problem)
    if problem:
        error = LogFolderInUseError(problem)
        error.same_on_every_rank = True  # rank 0 prints it; the others leave quietly
        raise error
    return notes


def release_folders():
    """Give up every lock this process holds (the end of a run that stays in-process)."""
    for handle in _held.values():
        try:
            handle.close()  # closing the file releases its lock
        except OSError:
            pass
    _held.clear()


def remove_stray_temporaries(folder):
    """
    Delete the temporary files of interrupted atomic writes in `folder` (call it while holding
    the folder's lock, so that no live save owns them).

    :return: the names removed.
    """
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    removed = []
    for name in sorted(names):
        if _TEMPORARY.fullmatch(name) and os.path.isfile(os.path.join(folder, name)):
            try:
                os.remove(os.path.join(folder, name))
            except FileNotFoundError:
                continue
            removed.append(name)
    return removed


def note_new_folder(folder):
    """
    Remember that this process made `folder` for a run that has not started yet: if the run is
    refused before it starts (bad flags, a model that cannot be built, an unreadable data
    folder), remove_unstarted_folders deletes it, so a refused start leaves no folder behind.
    Replaces what an earlier run of this process noted (None: nothing to remember).
    """
    _unstarted[:] = [os.fspath(folder)] if folder else []


def mark_started():
    """The run has started (its first step is next): its folder stays, whatever happens."""
    _unstarted.clear()


def remove_unstarted_folders():
    """
    Delete the folders note_new_folder named whose run never started, when they hold only what
    the start wrote (the lock file and the logger's files); anything else keeps the folder.

    :return: the folders removed.
    """
    removed = []
    for folder in _unstarted:
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        if not all(_RUN_START_FILES.fullmatch(name) for name in names):
            continue
        try:
            for name in names:
                path = os.path.join(folder, name)
                if os.path.isdir(path) and not os.path.islink(path):
                    for inner in os.listdir(path):
                        os.remove(os.path.join(path, inner))
                    os.rmdir(path)
                else:
                    os.remove(path)
            os.rmdir(folder)
        except OSError:
            continue
        removed.append(folder)
    _unstarted.clear()
    return removed
