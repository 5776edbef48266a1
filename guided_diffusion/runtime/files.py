"""
Writing files so that readers never see half of one: a temporary file in the destination folder,
flushed to disk, then renamed over the final name. Checkpoints, sample npz files and JSON reports
all go through atomic_write.
"""

import json
import os
import tempfile

from ..errors import ScriptError


def atomic_write(path, write):
    """
    Write a local file so that path holds either its old content or the complete new one.

    :param path: the destination file; its folder must exist.
    :param write: a function that writes the content into the binary file object it is given.
    :return: path.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        # Say so in terms of the file asked for, not of the hidden temporary file mkstemp names.
        raise FileNotFoundError(f"cannot write {path}: the folder {folder} does not exist")
    # The temporary name starts with "." and ends with ".tmp" so it never matches "<prefix>NNN.pt".
    fd, tmp_path = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    recorder = None
    try:
        with os.fdopen(fd, "wb") as f:
            recorder = _ErrorRecorder(f)
            write(recorder)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates the file private (0600); give it the permissions open() would, so that
        # collaborators on a shared cluster can read checkpoints as with the reference.
        os.chmod(tmp_path, 0o666 & ~_current_umask())
        os.replace(tmp_path, path)
    except BaseException as exc:
        # Also on KeyboardInterrupt: leave no temporary file behind.
        try:
            os.remove(tmp_path)
        except FileNotFoundError:
            pass
        if recorder is not None and recorder.error is not None and not isinstance(exc, OSError):
            # torch.save's writer swallows the OSError of a failed write (a full disk) and
            # fails later with "unexpected pos ..."; the OSError is the real cause.
            raise recorder.error from None
        raise
    _fsync_dir(folder)
    return path


def _current_umask():
    # Linux reports the umask without changing it; elsewhere os.umask can only read it by setting
    # it, which is briefly visible to other threads, so it is the fallback.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class _ErrorRecorder:
    """A binary file that remembers the first OSError its write or flush raised."""

    def __init__(self, f):
        self._f = f
        self.error = None

    def write(self, data):
        try:
            return self._f.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self):
        try:
            return self._f.flush()
        except OSError as exc:
            self.error = self.error or exc
            raise

    def __getattr__(self, name):  # seek, tell, fileno, ... for writers that need them
        return getattr(self._f, name)


def _fsync_dir(folder):
    # Makes the rename itself durable on POSIX; not possible (nor needed) everywhere.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path, obj):
    """Write obj as indented JSON, atomically. :return: path."""
    return atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def os_error_text(exc):
    """
    What an OSError says, in a few words: "<file>: <the system's reason>" ("No space left on
    device"), or its own message when it was raised with one.
    """
    if exc.strerror is None:  # raised by our code with a message of its own
        return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    # A rename (os.replace of atomic_write's temporary file) names the destination second: that
    # is the file the user knows, not the hidden temporary one.
    name = getattr(exc, "filename2", None) or exc.filename
    return f"{name}: {exc.strerror}" if name else exc.strerror


def blobfile():
    """
    The blobfile module, needed for remote paths (gs://, az://, https://) only.

    :raises ScriptError: naming the extra to install when it is missing.
    """
    try:
        import blobfile as bf
    except ImportError:
        raise ScriptError(
            "remote paths (gs://, az://, https://) need blobfile: pip install 'guided-diffusion[remote]'"
        ) from None
    return bf


# The first bytes of the files people pass where an npz (or a checkpoint) is expected.
KNOWN_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"\x93NUMPY", "a single .npy array (np.save), not an npz (np.savez)"),
    (b"PK", None),  # a zip archive: what an npz is
)


def file_kind(path):
    """
    What a file is by its first bytes: None for a zip (an npz), else a phrase such as
    "a PNG image", or "not an npz file" when it is none of the known kinds.
    """
    with open(path, "rb") as f:
        head = f.read(8)
    for magic, kind in KNOWN_MAGIC:
        if head.startswith(magic):
            return kind
    return "not an npz file"
