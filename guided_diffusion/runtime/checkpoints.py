"""
Saving and finding checkpoint files safely.

A save writes a temporary file in the destination folder and renames it over the final name, so a
process killed mid-save leaves the previous checkpoint untouched and never a half-written file under
the final name. Loading always uses torch.load(weights_only=True): a checkpoint is data, and
unpickling arbitrary objects from a downloaded file would run arbitrary code.

Every checkpoint may also be a .safetensors file (runtime.safetensors_files): the name chooses the
format, on saving and on loading, and the step-numbered names of a training run
("model000400.safetensors") are found like the .pt ones.
"""

import os
import pickle
import re
import zipfile

import torch

from ..errors import CheckpointWriteError
from . import safetensors_files
from .files import atomic_write, blobfile, file_kind

# The file name endings of checkpoints: torch.save files and safetensors files.
SUFFIXES = (".pt", safetensors_files.SUFFIX)


def _is_remote(path):
    return "://" in str(path)


def save_atomic(obj, path):
    """
    torch.save obj to path so that path holds either the old file or the complete new one.

    :param obj: anything torch.save accepts (a state dict, usually).
    :param path: the destination file; its folder must exist.
    :return: path.
    """
    path = os.fspath(path)
    if safetensors_files.is_safetensors_path(path):
        # The whole file is built in memory first (safetensors writes bytes, not a stream), then
        # written like any other: a full disk or a kill mid-write leaves no file of that name.
        data = safetensors_files.to_bytes(obj, path)
        write = lambda f: f.write(data)  # noqa: E731
    else:
        write = lambda f: torch.save(obj, f)  # noqa: E731
    if _is_remote(path):
        # Object stores publish a blob only when its upload completes, which is atomic already.
        with blobfile().BlobFile(path, "wb") as f:
            write(f)
        return path
    return atomic_write(path, write)


def _exists(path):
    return blobfile().exists(path) if _is_remote(path) else os.path.isfile(path)


def load_checkpoint(path, map_location="cpu", **kwargs):
    """
    Read a checkpoint written by torch.save, allowing only tensors and plain containers, or a
    .safetensors file (the name decides; safetensors_files).

    :param path: the checkpoint file.
    :param map_location: where tensors are placed (as in torch.load).
    :param kwargs: further torch.load arguments (weights_only defaults to True).
    :raises FileNotFoundError: when path does not exist.
    :raises ValueError: when the file is truncated, corrupt, or holds more than tensors.
    :raises ScriptError: for a .safetensors file without the safetensors package.
    """
    path = os.fspath(path)
    if not _exists(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if safetensors_files.is_safetensors_path(path):
        return _load_safetensors(path, map_location)
    kwargs.setdefault("weights_only", True)
    try:
        if _is_remote(path):
            with blobfile().BlobFile(path, "rb") as f:
                return torch.load(f, map_location=map_location, **kwargs)
        return torch.load(path, map_location=map_location, **kwargs)
    except pickle.UnpicklingError as exc:
        # A disallowed class shows up as "Unsupported global" (older torch: "Unsupported class");
        # any other unpickling failure means the bytes themselves are damaged.
        if "Unsupported global" in str(exc) or "Unsupported class" in str(exc):
            raise ValueError(
                f"{path} holds objects other than tensors and plain containers, so it was not "
                "loaded (only state-dict checkpoints are accepted)"
            ) from None
        raise ValueError(_unreadable_message(path, "not a valid torch.save file")) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as exc:
        raise ValueError(_unreadable_message(path, exc)) from None


def _other_kind(path):
    """What a file that is no checkpoint is, when its bytes say (an image, an npz ...), or None."""
    if _is_remote(path):
        return None
    try:
        kind = file_kind(path)
        if kind is None:  # a zip: torch.save's format, or an npz of arrays
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
            if names and all(n.endswith(".npy") for n in names):
                return "an npz file of arrays (np.savez)"
            return None
        with open(path, "rb") as f:
            head = f.read(64).lstrip()
    except (OSError, zipfile.BadZipFile):
        return None
    if kind.startswith("a single .npy"):
        return "a .npy array file (np.save)"
    if kind != "not an npz file":
        return kind
    if head[:1] in (b"{", b"["):
        return "a JSON text file"
    return None


def _unreadable_message(path, exc):
    """A file of another kind (an image given as a checkpoint, a misnamed file) is named as such;
    the advice to delete it is only for a file that really is a damaged checkpoint."""
    kind = _other_kind(path)
    if kind is not None:
        return (
            f"cannot read checkpoint {path}: it is {kind}, not a checkpoint (a torch.save file "
            "such as modelNNNNNN.pt or a released .pt, or a .safetensors file): pass a "
            "checkpoint file"
        )
    kind = _misnamed(path)
    if kind is not None:
        return f"cannot read checkpoint {path}: it is {kind}"
    # torch's messages run to paragraphs; the first sentence says what failed.
    text = str(exc).strip()
    reason = text.splitlines()[0].split(". ")[0] if text else type(exc).__name__
    return (
        f"cannot read checkpoint {path}: the file is truncated or corrupt ({reason}); "
        "delete it or pass another checkpoint"
    )


def _load_safetensors(path, map_location):
    safetensors_files.safetensors_torch(path)  # refuse at once when the package is missing
    try:
        if _is_remote(path):
            with blobfile().BlobFile(path, "rb") as f:
                obj = safetensors_files.from_bytes(f.read(), path)
        else:
            obj = safetensors_files.load_file(path)
    except Exception as exc:  # safetensors raises its own SafetensorError (an Exception)
        raise ValueError(_unreadable_message(path, exc)) from None
    if map_location is None or (isinstance(map_location, (str, torch.device))
                                and torch.device(map_location).type == "cpu"):
        return obj
    return _to_device(obj, map_location)


def _to_device(node, device):
    if isinstance(node, torch.Tensor):
        return node.to(device)
    if isinstance(node, dict):
        return {k: _to_device(v, device) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return type(node)(_to_device(v, device) for v in node)
    return node


def _misnamed(path):
    """A checkpoint of one format named as the other ("... (rename it ...)"), or None."""
    if _is_remote(path):
        return None
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return None
    named_safetensors = safetensors_files.is_safetensors_path(path)
    if named_safetensors and (head.startswith(b"PK") or head.startswith(b"\x80")):
        return "a torch.save file named .safetensors (rename it to .pt)"
    if not named_safetensors and safetensors_files.looks_like_safetensors(head) \
            and safetensors_files.is_complete(path):
        return "a safetensors file not named .safetensors (rename it so)"
    return None


def _step_pattern(prefix):
    return re.compile(re.escape(prefix) + r"(\d+)(\.pt|\.safetensors)")


def other_format(path):
    """The same checkpoint name in the other format: a.pt <-> a.safetensors."""
    path = os.fspath(path)
    for mine, other in (SUFFIXES, SUFFIXES[::-1]):
        if path.endswith(mine):
            return path[: -len(mine)] + other
    return None


def parse_step(path, prefix):
    """
    The training step in a checkpoint name of the form "<prefix>NNNNNN.pt" (or .safetensors).

    :param path: a file path, e.g. "logs/ema_0.9999_001000.pt".
    :param prefix: the part before the digits, e.g. "model", "opt" or "ema_0.9999_".
    :raises ValueError: when the file name does not have that form.
    """
    name = os.path.basename(os.fspath(path))
    match = _step_pattern(prefix).fullmatch(name)
    if match is None:
        raise ValueError(
            f"{name!r} is not a checkpoint name of the form '{prefix}NNNNNN.pt' (or .safetensors)"
        )
    return int(match.group(1))


def is_complete_checkpoint(path):
    """True when torch.load can read path's structure (a truncated or partial file fails); a
    .safetensors file when its header parses and its data fill the file exactly."""
    if safetensors_files.is_safetensors_path(path):
        return safetensors_files.is_complete(path)
    try:
        # mmap reads the pickled structure and the zip directory without pulling every tensor
        # into memory, so checking a multi-GB checkpoint stays cheap.
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return True
    except Exception:
        pass
    # Old torch (no mmap argument) or the legacy non-zip format: read the whole file instead.
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return False
    return True


def checkpoint_candidates(log_dir, prefix):
    """
    Every file named "<prefix>NNNNNN.pt" or "<prefix>NNNNNN.safetensors" in log_dir, highest
    step first (at one step, .safetensors before .pt), readable or not.

    :param log_dir: the folder to search (a missing folder, or None, gives []).
    :param prefix: e.g. "model", "opt" or "ema_0.9999_".
    :return: a list of paths.
    """
    if log_dir is None:
        return []
    log_dir = os.fspath(log_dir)
    if _is_remote(log_dir):
        if not blobfile().isdir(log_dir):
            return []
        names = blobfile().listdir(log_dir)
        join = blobfile().join
    else:
        if not os.path.isdir(log_dir):
            return []
        names = os.listdir(log_dir)
        join = os.path.join
    pattern = _step_pattern(prefix)
    candidates = []
    for name in names:
        match = pattern.fullmatch(name)
        if match is not None:
            candidates.append((int(match.group(1)), match.group(2) == ".safetensors", name))
    return [join(log_dir, name) for _, _, name in sorted(candidates, reverse=True)]


def find_latest_checkpoint(log_dir, prefix):
    """
    The complete checkpoint "<prefix>NNNNNN.pt" with the highest step in log_dir.

    Temporary files from interrupted saves never match the name pattern; files that match but
    cannot be read (cut short by a crash or a full disk) are skipped in favour of older ones.

    :param log_dir: the folder to search (a missing folder gives None).
    :param prefix: e.g. "model", "opt" or "ema_0.9999_".
    :return: the path, or None when there is no complete checkpoint.
    """
    for path in checkpoint_candidates(log_dir, prefix):
        if _is_remote(path) or is_complete_checkpoint(path):
            return path
    return None


def save_checkpoint_files(files, previous=None):
    """
    Write the files of one checkpoint atomically, in order; the last one marks it complete.

    Readers (find_latest_checkpoint) look for the last file, so it is written last, and an old
    file of that name (in either format, .pt or .safetensors) is removed first: a save that fails
    half-way must not leave it paired with files of another run. When a write fails (disk full,
    permissions), the files of this checkpoint written so far are removed again, which frees
    their space and leaves the previous checkpoint the newest complete one; so they are when a
    Ctrl-C stops the save at once.

    :param files: a list of (object, path) pairs; the last path is the marker (the model file).
        An object may be a function without arguments that builds it, so that only one of
        several large state dicts is held at a time.
    :param previous: the previous complete checkpoint, named in the error message.
    :raises CheckpointWriteError: with one line saying which file failed, why, and what is intact.
    """
    paths = [os.fspath(path) for _, path in files]
    marker = paths[-1]
    written = []
    current = None
    try:
        if not _is_remote(marker):
            for old in (marker, other_format(marker)):
                if old and os.path.exists(old):
                    os.remove(old)
        for (obj, _), path in zip(files, paths):
            current = path
            save_atomic(obj() if callable(obj) else obj, path)
            written.append(path)
    except (OSError, KeyboardInterrupt) as exc:
        # Also on a second Ctrl-C (stop at once): no incomplete set is left behind, not even
        # the file it came right after.
        interrupted = isinstance(exc, KeyboardInterrupt)
        unfinished = [current] if interrupted and current not in (None, *written) else []
        for path in written + unfinished:
            try:
                blobfile().remove(path) if _is_remote(path) else os.remove(path)
            except Exception:  # best effort: the error below is what matters
                pass
        if interrupted:
            raise
        reason = exc.strerror or str(exc) or type(exc).__name__
        failed = paths[len(written)]
        kept = (
            f"the previous checkpoint {previous} is intact" if previous
            else "no earlier checkpoint of this run exists"
        )
        raise CheckpointWriteError(
            f"cannot write checkpoint file {failed}: {reason}; the files of this checkpoint were "
            f"removed and {kept}: free space (or fix the folder's permissions) and continue with "
            f"--resume_checkpoint auto --log_dir {os.path.dirname(marker) or '.'}"
        ) from None
