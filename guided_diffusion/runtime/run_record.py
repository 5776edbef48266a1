"""
args.json: the record a training run writes into its log folder when it starts, so that the
folder says how its checkpoints were made (every flag after parsing, the command line, the
package version and git commit, torch and Python versions, world size, launcher). The sampling
scripts read it back (cli/run_config) to take the model's flags from it.

A run started again in the same folder (a resumed run) keeps the earlier records: the previous
args.json is first copied to args-NNN.json (001 the oldest), then args.json is replaced, both
atomically.
"""

import datetime
import json
import os
import platform
import shutil
import subprocess
import sys

import torch

from .. import __version__, dist_util
from ..errors import ScriptError
from .files import atomic_write, write_json

RECORD_FILE = "args.json"
RECORD_FORMAT = "guided_diffusion.args/1"

# The model family each training script trains, as args.json names it; a sampling script refuses
# the record of another family.
SCRIPT_FAMILIES = {
    "image_train.py": "diffusion",
    "super_res_train.py": "super_res",
    "classifier_train.py": "classifier",
    "cgan_train.py": "cgan",
    "vae_train.py": "vae",
}
FAMILY_WORDS = {
    "diffusion": "a diffusion model (image_train.py)",
    "super_res": "a super-resolution model (super_res_train.py)",
    "classifier": "a noisy classifier (classifier_train.py)",
    "cgan": "a conditional GAN (cgan_train.py)",
    "vae": "a VAE (vae_train.py)",
}

# What a sampling script can do about an unreadable record (cli/run_config: --config).
_FIXES = ("pass --config none to ignore it (and give the model's flags), or --config with the "
          "args.json of the training run")

# git answers in milliseconds; a hung network file system must not hold up the start of a run.
_GIT_SECONDS = 10


def git_state(root):
    """
    (commit, dirty) of the git checkout whose top folder is `root`, or (None, None) when root is
    not the top of a checkout (an installed package, even one inside some other repository such
    as a project holding its virtual environment) or git is missing. dirty: tracked files differ
    from the commit.
    """
    def git(*args):
        return subprocess.run(
            ["git", "-C", root, *args], capture_output=True, text=True, timeout=_GIT_SECONDS,
            check=True,
        ).stdout.strip()

    try:
        top = git("rev-parse", "--show-toplevel")
        if os.path.realpath(top) != os.path.realpath(root):
            return None, None
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit or None, dirty


def _plain(value):
    """A flag value as JSON takes it (flags are str/int/float/bool; anything else as text)."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


def describe_run(flags, script, argv=None):
    """
    The content of args.json.

    :param flags: every parsed flag, {name: value} (vars(args)).
    :param script: the training script's file name or path (e.g. __file__).
    :param argv: the command line's arguments (None: sys.argv[1:]).
    :return: a dict of plain JSON values.
    """
    name = os.path.basename(os.fspath(script))
    # The checkout is the folder above the package (guided_diffusion/runtime/ -> two up).
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    commit, dirty = git_state(os.path.dirname(package))
    return {
        "format": RECORD_FORMAT,
        "script": name,
        "family": SCRIPT_FAMILIES.get(name),
        "flags": {key: _plain(value) for key, value in sorted(flags.items())},
        "command_line": [str(a) for a in (sys.argv[1:] if argv is None else argv)],
        "package_version": __version__,
        "git_commit": commit,
        "git_dirty": dirty,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "world_size": dist_util.get_world_size(),
        "launcher": dist_util.launcher(),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


# The record of the run start_run began, held until that run really starts: [(folder, record)].
_held = []


def hold_run_record(folder, record):
    """Keep `record` for `folder` until the run starts (take_held_record) or ends (drop)."""
    _held[:] = [(folder, record)]


def take_held_record():
    """:return: the held (folder, record), given once, or None."""
    return _held.pop() if _held else None


def drop_held_record():
    """
    Forget the held record: the script that began the run has ended without starting it, and
    its flags must not reach a later run of this process (its folder's args.json stays the one
    of the checkpoints there).
    """
    _held.clear()


def write_run_record(folder, record):
    """
    Write args.json into `folder` atomically, keeping an existing one as args-NNN.json first.

    :return: the path of args.json.
    """
    path = os.path.join(folder, RECORD_FILE)
    if os.path.exists(path):
        number = 1
        while os.path.exists(os.path.join(folder, f"args-{number:03d}.json")):
            number += 1
        kept = os.path.join(folder, f"args-{number:03d}.json")
        with open(path, "rb") as source:
            atomic_write(kept, lambda f: shutil.copyfileobj(source, f))
    return write_json(path, record)


def read_run_record(path):
    """
    Read an args.json.

    :raises FileNotFoundError: when it does not exist.
    :raises ScriptError: when it is not a record written by a training script of this package.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, RECORD_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"--config {path} does not exist: pass the args.json in a training run's log folder"
        )
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError) as exc:
        why = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise ScriptError(f"cannot read {path} as JSON ({why}): {_FIXES}") from None
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT \
            or not isinstance(record.get("flags"), dict):
        raise ScriptError(
            f"{path} is not an args.json written by a training script of this package (no "
            f"{RECORD_FORMAT!r} format field, or no flags): {_FIXES}"
        )
    record["path"] = path
    return record
