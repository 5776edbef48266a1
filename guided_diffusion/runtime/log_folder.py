"""
One training job per log folder, and no leftovers of an interrupted save in it.

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


def lock_folder(folder):
    """
    Take the exclusive lock of a log folder for this process (again: nothing happens).

    :param folder: the log folder; created when missing.
    :return: None when locked (or locks are unsupported: then a warning text is returned
        instead, for the caller to log).
    :raises LogFolderInUseError: when another live process holds it, with a one-line message.
    :raises OSError: when the folder or the lock file cannot be created.
    """
    real = os.path.realpath(folder)
    if real in _held or fcntl is None:
        return None
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK_NAME)
    handle = open(path, "a+")
    try:
        fcntl.lockf(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            handle.seek(0)
            holder = " ".join(handle.read().split()) or "a process that did not say who it is"
            handle.close()
            raise LogFolderInUseError(
                f"the log folder {folder} is in use by another training job ({holder}; lock "
                f"file {path}): two jobs in one folder would overwrite each other's checkpoints "
                "and logs: wait for that job to end (or stop it), or pass another --log_dir"
            ) from None
        handle.close()
        return (
            f"warning: {folder} does not support file locks ({exc.strerror or exc}): nothing "
            "stops a second job from using this log folder at the same time"
        )
    started = datetime.datetime.now().isoformat(sep=" ", timespec="seconds")
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {started}\n")
    handle.flush()
    _held[real] = handle
    return None


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
