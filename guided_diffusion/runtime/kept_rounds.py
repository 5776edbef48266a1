"""
Work done in rounds (the batches of a sampling or editing run) that loses nothing when it is
stopped: every finished round is kept on disk at once, with the random state that follows it,
so that running the same command again continues where the run stopped and ends with exactly
what an uninterrupted run writes, byte for byte.

A run's kept rounds live in <folder>/partial/:

    command.json     what made them: the script, the flags that change what is drawn, the number
                     of ranks, the identity of each input file (size and digests of its first and
                     last MiB); a run of another command is refused, never mixed in
    round000000.pt   one file per finished round, written atomically by rank 0: the round's
                     arrays (every rank's part, in rank order) and each rank's random-number
                     states and stream positions (e.g. the label counter) after it

The kept rounds are the unbroken run of readable round files from round 0. Once the last round
is done, the caller's result is written and partial/ is removed.

Stopping follows runtime.preemption: SIGTERM, SIGUSR1 or SIGINT, on any rank, is agreed on after
the round in progress is kept, and every rank leaves through SamplingPreempted (exit status 75)
once rank 0 has logged one line saying what is kept and how to continue. A second Ctrl-C stops at
once; every file is written atomically, so nothing partial is left.

The folder is one job's at a time (runtime.log_folder, its job.lock), a folder holding a
finished result is not written over unless the caller's overwrite flag says so, and a disk too
small for the run is refused before the first round.
"""

import hashlib
import json
import os
import re

import numpy as np
import torch

from .. import dist_util, logger
from ..errors import EXIT_PREEMPTED, SamplingPreempted, ScriptError, StorageError
from . import checkpoints, log_folder
from .files import os_error_text, write_json
from .preemption import PreemptionWatch
from .train_state import capture_rng, restore_rng

PARTIAL = "partial"
COMMAND_FILE = "command.json"
FORMAT = "guided_diffusion.kept_rounds/1"
_ROUND_FILE = "round{:06d}.pt"
_ROUND = re.compile(r"round(\d{6,})\.pt")
# One job per output folder: its lock file lives in partial/, so a finished folder holds only
# the result, and a sampling run into a training run's log folder does not take its lock.
SAMPLING = log_folder.Use("output folder", "job",
                          "two jobs in one folder would mix or replace each other's results",
                          "--out_dir", lock_name=os.path.join(PARTIAL, log_folder.LOCK_NAME))
# The flag that replaces a finished result or discards the kept rounds of another command.
OVERWRITE_FLAG = "--overwrite True"
# Bytes of an input file read for its identity, at each end.
_IDENTITY_BYTES = 1 << 20


# ------------------------------------------------------------------------------ the command


def input_identity(path):
    """
    What tells one input apart from another without reading all of it: for a file its size and
    a digest of its first and last MiB; for a folder the names and sizes of the files in it.
    A copy of the same file has the same identity; an edited or replaced one almost surely not.

    :return: a short string (or None for a remote path, whose content is not looked at).
    """
    path = os.fspath(path)
    if "://" in path:
        return None
    digest = hashlib.sha256()
    if os.path.isdir(path):
        count = 0
        for root, dirs, names in os.walk(path):
            dirs.sort()
            for name in sorted(names):
                full = os.path.join(root, name)
                try:
                    size = os.path.getsize(full)
                except OSError:
                    continue
                digest.update(f"{os.path.relpath(full, path)}\0{size}\0".encode())
                count += 1
        return f"folder of {count} files, {digest.hexdigest()[:16]}"
    if not os.path.isfile(path):
        return "missing"
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        digest.update(f.read(_IDENTITY_BYTES))
        if size > _IDENTITY_BYTES:
            f.seek(max(size - _IDENTITY_BYTES, _IDENTITY_BYTES))
            digest.update(f.read(_IDENTITY_BYTES))
    return f"{size} bytes, {digest.hexdigest()[:16]}"


def describe_command(script, flags, *, ignore=(), inputs=()):
    """
    What makes a run's rounds what they are, to tell a rerun of the same command from another.

    :param script: the script (its file name or path).
    :param flags: {flag name: value}, e.g. vars(args).
    :param ignore: flags that change nothing the rounds hold (where outputs go, progress bars).
    :param inputs: flags naming input files or folders: their identity is recorded too.
    :return: a JSON-compatible dict.
    """
    kept = {name: value for name, value in sorted(flags.items()) if name not in ignore}
    identities = {name: input_identity(flags[name]) for name in inputs if flags.get(name)}
    command = {
        "script": os.path.basename(os.fspath(script)),
        "world_size": dist_util.get_world_size(),
        "flags": kept,
        "inputs": identities,
    }
    # As it reads back from command.json (tuples become lists, odd values strings).
    return json.loads(json.dumps(command, default=str))


def _shown(value):
    return json.dumps(value) if isinstance(value, str) and not value else str(value)


def command_differences(saved, current):
    """
    How the command of kept rounds differs from this one, one phrase per difference.

    :return: a list of phrases ("--seed 1 there, 2 here"), empty when they are the same.
    """
    found = []
    if saved.get("script") != current.get("script"):
        found.append(f"made by {saved.get('script')}, this run is {current.get('script')}")
    if saved.get("world_size") != current.get("world_size"):
        found.append(
            f"drawn on {saved.get('world_size')} rank(s), this run has {current.get('world_size')}"
        )
    old, new = saved.get("flags", {}), current.get("flags", {})
    old_inputs, new_inputs = saved.get("inputs", {}), current.get("inputs", {})
    for name in sorted(set(old) | set(new)):
        if old_inputs.get(name) is not None and new_inputs.get(name) is not None:
            # An input is what it holds: the same file moved or named another way is the same.
            if old_inputs[name] != new_inputs[name]:
                found.append(f"--{name} {new.get(name)} is not the file they were drawn with "
                             f"({old_inputs[name]} then, {new_inputs[name]} now)")
        elif old.get(name, "(none)") != new.get(name, "(none)"):
            found.append(f"--{name} {_shown(old.get(name, '(none)'))} there, "
                         f"{_shown(new.get(name, '(none)'))} here")
    return found


# ------------------------------------------------------------------------------ disk space


def free_bytes(folder):
    """Bytes this process may still write on the disk of `folder` (or its nearest existing
    parent), or None where the system cannot tell."""
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        parent = os.path.dirname(existing)
        if parent == existing:
            return None
        existing = parent
    try:
        stats = os.statvfs(existing)
    except (OSError, AttributeError):
        return None
    return stats.f_bavail * stats.f_frsize


def _megabytes(count):
    return f"{count / 1e6:.1f} MB" if count < 1e9 else f"{count / 1e9:.2f} GB"


def _folder_bytes(folder):
    total = 0
    for root, _, names in os.walk(folder):
        for name in names:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total


# ------------------------------------------------------------------------------ the rounds


class KeptRounds:
    """
    A run of `rounds` rounds whose finished rounds are kept in <folder>/partial/ (see the module
    docstring). Every rank makes the same calls, in this order:

        kept = KeptRounds(command, rounds, per_round=..., total=..., ...)
        kept.check(folder)          # before any work: may refuse the folder (any process)
        ...load the model...
        kept.open(folder)           # lock the folder, find the kept rounds (a collective)
        kept.run(make_round)        # the remaining rounds, kept one by one; may stop (exit 75)
        kept.finish(write)          # rank 0 writes the result; partial/ is removed

    Without open() (no folder: e.g. a library call) nothing is kept and no signal is caught:
    run() and finish() then only collect the rounds in memory.

    :param command: describe_command(...) of this run.
    :param rounds: how many rounds the run has.
    :param per_round: results a round adds over all ranks (for the messages).
    :param total: results of the whole run (for the messages; the last round may overshoot).
    :param what: the results' name in messages ("samples", "edited images").
    :param overwrite: the run may replace a finished result and discard the kept rounds of
        another command (OVERWRITE_FLAG).
    :param finished: finished(folder) -> the path of a finished result of this run already in
        the folder (what the result would replace), or None.
    :param needed_bytes: what the kept rounds and the result take on disk together, about.
    :param folder_flag: the flag that chooses the folder, for the messages.
    :param folder_named: whether the folder is chosen by a flag or the environment (False: a new
        dated folder, which a rerun would not find: the stop message then names it).
    :param count_of: count_of(rounds) -> the results the first `rounds` rounds hold, where
        rounds are not all per_round (default: rounds * per_round, at most total).
    """

    def __init__(self, command, rounds, *, per_round, total, what="samples", overwrite=False,
                 finished=None, needed_bytes=0, folder_flag="--out_dir", folder_named=True,
                 count_of=None):
        self.command = command
        self.rounds = int(rounds)
        self.per_round = int(per_round)
        self.total = int(total)
        self.what = what
        self.overwrite = bool(overwrite)
        self.finished = finished
        self.needed_bytes = int(needed_bytes)
        self.folder_flag = folder_flag
        self.folder_named = folder_named
        self.count_of = count_of
        self.folder = None
        self.partial = None
        self.kept = 0  # rounds finished, earlier runs' included
        self._arrays = []  # rank 0: the arrays of each finished round, in order
        self._resume = None  # this rank's states after the last kept round
        self._keep_to_disk = False

    # ---------------------------------------------------------------------------- checks

    def kept_count(self, rounds=None):
        """Results held by the first `rounds` rounds (default: the kept ones)."""
        rounds = self.kept if rounds is None else rounds
        if self.count_of is not None:
            return self.count_of(rounds)
        return min(rounds * self.per_round, self.total)

    def check(self, folder):
        """
        Refuse, before any work, a folder this run must not write to: one holding a finished
        result (unless overwrite), the kept rounds of another command (unless overwrite), or a
        disk without room for the run. Reads only. On several ranks rank 0 looks and every rank
        learns the answer (a collective), so all refuse together.

        :param folder: the output folder, or None when it is not known yet (nothing to check).
        :raises ScriptError: one line naming the flag to change.
        """
        problem = None
        if dist_util.is_main_process():
            try:
                self._check(folder)
            except (ScriptError, StorageError) as exc:
                problem = str(exc)
        _raise_on_every_rank(dist_util.broadcast_from_main(problem))

    def _check(self, folder):
        if not folder:
            return
        partial = os.path.join(folder, PARTIAL)
        differences = self._other_command(partial)
        # Result files beside this command's kept rounds are its own result being written when
        # it stopped: the rerun writes them again.
        ours = not differences and os.path.exists(os.path.join(partial, COMMAND_FILE))
        if not self.overwrite and self.finished is not None and not ours:
            path = self.finished(folder)
            if path:
                raise ScriptError(
                    f"{folder} already holds a finished result ({path}): pass {OVERWRITE_FLAG} "
                    f"to replace it, or another {self.folder_flag}"
                )
        if differences and not self.overwrite:
            rounds = len(self._round_files(partial))
            raise ScriptError(
                f"{partial} holds {rounds} kept batch(es) of another command "
                f"({'; '.join(differences[:3])}"
                f"{f'; and {len(differences) - 3} more' if len(differences) > 3 else ''}): run "
                f"that command again to finish them, or pass {OVERWRITE_FLAG} to discard them, "
                f"or another {self.folder_flag}"
            )
        self._check_space(folder, 0 if differences else self._kept_bytes(partial))

    def _other_command(self, partial):
        """[] when partial/ holds nothing or this command's rounds; else how it differs."""
        path = os.path.join(partial, COMMAND_FILE)
        if not os.path.isdir(partial):
            return []
        if not os.path.exists(path):
            # Round files without their command (written by hand?) cannot be trusted.
            return ["no command.json beside them"] if self._round_files(partial) else []
        try:
            with open(path) as f:
                saved = json.load(f)
            if saved.get("format") != FORMAT:
                raise ValueError("not a command.json of kept rounds")
        except (OSError, ValueError) as exc:
            return [f"its command.json cannot be read: {exc}"]
        return command_differences(saved.get("command", {}), self.command)

    @staticmethod
    def _round_files(partial):
        try:
            names = os.listdir(partial)
        except OSError:
            return []
        return sorted(name for name in names if _ROUND.fullmatch(name))

    @staticmethod
    def _kept_bytes(partial):
        return _folder_bytes(partial) if os.path.isdir(partial) else 0

    def _check_space(self, folder, kept_bytes):
        free = free_bytes(folder)
        needed = self.needed_bytes - kept_bytes
        if free is None or needed <= free:
            return
        raise StorageError(
            f"not enough space for this run in {folder}: it needs about {_megabytes(needed)} "
            f"(the kept batches and the {self.what} files) and the disk has {_megabytes(free)} "
            f"free: free space, or pass another {self.folder_flag}"
        )

    # ---------------------------------------------------------------------------- opening

    def open(self, folder):
        """
        Take the folder for this job and find what earlier runs of this command kept there;
        rounds of another command are discarded only with overwrite. A collective: rank 0 reads
        and decides, every rank learns the outcome (and its own random state to continue from).

        :raises LogFolderInUseError: when another live job holds the folder.
        :raises ScriptError, StorageError: as check().
        """
        self.folder = os.fspath(folder)
        self.partial = os.path.join(self.folder, PARTIAL)
        self._keep_to_disk = True
        # A training job may be writing into the same folder (samples drawn into its log
        # folder): its temporaries are left alone unless no training job ever used the folder.
        clean = not os.path.exists(os.path.join(self.folder, log_folder.LOCK_NAME))
        notes = log_folder.claim_folder(self.folder, SAMPLING, clean=clean)
        problem, found = None, None
        if dist_util.is_main_process():
            try:
                self._check(self.folder)  # again, now that no other job can change the folder
                if self._other_command(self.partial):
                    logger.log(f"{OVERWRITE_FLAG}: discarding the kept batches of another "
                               f"command in {self.partial}")
                    self._discard()
                found = self._load()
            except (ScriptError, StorageError) as exc:
                problem = str(exc)
        problem, found = dist_util.broadcast_from_main((problem, found))
        _raise_on_every_rank(problem)
        for note in notes:
            logger.log(note)
        self.kept = found["kept"]
        if found["ranks"] is not None:
            self._resume = found["ranks"][dist_util.get_rank()]
        if self.kept:
            logger.log(
                f"continuing this command's earlier run: {self.kept_count()} of {self.total} "
                f"{self.what} ({self.kept} of {self.rounds} batches) are kept in {self.partial}"
            )

    def _discard(self):
        """Remove the kept rounds and their command (not the lock file beside them)."""
        for name in [*self._round_files(self.partial), COMMAND_FILE]:
            path = os.path.join(self.partial, name)
            if os.path.exists(path):
                os.remove(path)

    def _load(self):
        """Rank 0: read the kept rounds; returns {"kept": rounds, "ranks": states or None}."""
        if not os.path.isdir(self.partial):
            return {"kept": 0, "ranks": None}
        log_folder.remove_stray_temporaries(self.partial)
        last = None
        for index in range(self.rounds):
            path = os.path.join(self.partial, _ROUND_FILE.format(index))
            if not os.path.exists(path):
                break
            try:
                record = checkpoints.load_checkpoint(path)
                if not isinstance(record, dict) or record.get("format") != FORMAT \
                        or record.get("round") != index:
                    raise ValueError("not a kept round of this run")
            except ValueError as exc:
                logger.warn(f"warning: {path} cannot be read ({exc}): the run continues from "
                            f"the batch before it")
                break
            self._arrays.append({name: tensor.numpy() for name, tensor in record["arrays"].items()})
            last = record["ranks"]
        kept = len(self._arrays)
        # Files past a gap or an unreadable one are drawn again (with the same random state).
        for name in self._round_files(self.partial):
            if int(_ROUND.fullmatch(name).group(1)) >= kept:
                os.remove(os.path.join(self.partial, name))
        return {"kept": kept, "ranks": last}

    # ---------------------------------------------------------------------------- the rounds

    def run(self, make_round, streams=None):
        """
        Run the rounds not kept yet. On every rank, right before the first of them, the random
        streams and `streams` are put back where the last kept round left them.

        :param make_round: make_round(index) -> {name: this rank's tensor (or None)} for round
            index; each tensor is gathered from every rank in rank order.
        :param streams: {name: object with state_dict() and load_state_dict()} that the rounds
            draw from besides torch's generators (e.g. the class labels' counter).
        :raises SamplingPreempted: after a stop signal (exit status 75).
        """
        streams = dict(streams or {})
        if not self._keep_to_disk:
            for index in range(self.kept, self.rounds):
                self._collect(make_round(index), streams, index, write=False)
            return
        with PreemptionWatch(check_every=1) as watch:
            if watch.agree():
                self._stop(watch, before=True)
            self._restore(streams)
            for index in range(self.kept, self.rounds):
                self._collect(make_round(index), streams, index, write=True)
                if index + 1 < self.rounds and watch.requested():
                    self._stop(watch)

    def _restore(self, streams):
        if self._resume is None:
            return
        saved = self._resume.get("streams", {})
        for name, stream in streams.items():
            if name in saved:
                stream.load_state_dict(saved[name])
        restore_rng(self._resume["rng"])
        self._resume = None

    def _holds_arrays(self):
        # Kept rounds are read back on rank 0 alone; without them every rank has every round.
        return dist_util.is_main_process() or not self._keep_to_disk

    def _collect(self, parts, streams, index, write):
        gathered = {}
        for name, tensor in parts.items():
            if tensor is None:
                continue
            pieces = dist_util.all_gather_tensors(tensor.contiguous())
            if self._holds_arrays():
                gathered[name] = np.concatenate([piece.cpu().numpy() for piece in pieces])
        if write:
            local = {"rng": capture_rng(),
                     "streams": {name: stream.state_dict() for name, stream in streams.items()}}
            ranks = dist_util.gather_objects(local)
            if dist_util.is_main_process():
                self._write_round(index, gathered, ranks)
        if self._holds_arrays():
            self._arrays.append(gathered)
        self.kept = index + 1

    def _write_round(self, index, arrays, ranks):
        record = {"format": FORMAT, "round": index,
                  "arrays": {name: torch.from_numpy(array) for name, array in arrays.items()},
                  "ranks": ranks}
        try:
            os.makedirs(self.partial, exist_ok=True)
            command = os.path.join(self.partial, COMMAND_FILE)
            if not os.path.exists(command):
                write_json(command, {"format": FORMAT, "command": self.command,
                                     "per_round": self.per_round, "total": self.total})
            checkpoints.save_atomic(record, os.path.join(self.partial, _ROUND_FILE.format(index)))
        except OSError as exc:
            reason = os_error_text(exc)
            raise StorageError(
                f"cannot keep batch {index + 1} of {self.rounds} in {self.partial} ({reason}): "
                f"{self.kept_count(index)} of {self.total} {self.what} are kept there; "
                f"{self.continue_hint(fix='free space (or fix the permissions)')}"
            ) from None

    def continue_hint(self, fix=None):
        """How to continue this run: the same command again (naming the folder if it was a
        new dated one)."""
        again = "run the same command again"
        if not self.folder_named:
            again += f" with {self.folder_flag} {self.folder}"
        return f"{fix + ', then ' if fix else ''}{again} to continue"

    def _stop(self, watch, before=False):
        kept = self.kept_count()
        if before and not self.kept:
            where = "before its first batch: nothing was drawn yet"
        elif before:
            where = (f"before its next batch: the {kept} of {self.total} {self.what} kept in "
                     f"{self.partial} are unchanged")
        else:
            where = (f"after batch {self.kept} of {self.rounds}: {kept} of {self.total} "
                     f"{self.what} are kept in {self.partial}")
        message = (f"{watch.stopped_by()}: stopped {where}; {self.continue_hint()} (exit "
                   f"status {EXIT_PREEMPTED})")
        logger.log(message)
        raise SamplingPreempted(message, kept)

    # ---------------------------------------------------------------------------- the result

    def arrays(self):
        """
        Every round's arrays joined in round order, {name: array} (names missing from a round
        are left out): on rank 0, and on every rank when nothing is kept on disk; else None.
        """
        if not self._holds_arrays():
            return None
        names = [name for name in (self._arrays[0] if self._arrays else {})
                 if all(name in parts for parts in self._arrays)]
        return {name: np.concatenate([parts[name] for parts in self._arrays]) for name in names}

    def finish(self, write):
        """
        Rank 0 writes the result (write(), which returns its path), then the kept rounds are
        removed; every rank waits for it.

        :return: what write() returned on rank 0, None elsewhere.
        :raises StorageError: naming the folder and what is kept, when the result cannot be
            written (a full disk, no permission).
        """
        result = None
        if dist_util.is_main_process():
            try:
                result = write()
            except OSError as exc:
                reason = os_error_text(exc)
                kept = (f"all {self.total} {self.what} are kept in {self.partial}; "
                        f"{self.continue_hint(fix='free space (or fix the permissions)')}"
                        if self._keep_to_disk else "nothing was kept")
                raise StorageError(
                    f"cannot write the {self.what} to {self.folder} ({reason}): {kept}"
                ) from None
            if self._keep_to_disk:
                self._remove_partial()
        dist_util.barrier()
        return result

    def _remove_partial(self):
        """Remove partial/ once the result is written: the files of ours (whatever else is
        there, someone else's, stays, and so does the folder then)."""
        self._discard()
        log_folder.remove_stray_temporaries(self.partial)
        for name in (log_folder.LOCK_NAME,):
            try:
                os.remove(os.path.join(self.partial, name))
            except FileNotFoundError:
                pass
        try:
            os.rmdir(self.partial)
        except OSError:
            pass


def _raise_on_every_rank(problem):
    """Raise rank 0's refusal (a message, or None for none) on every rank alike."""
    if problem:
        error = ScriptError(problem)
        error.same_on_every_rank = True  # rank 0 prints it; the others leave quietly
        raise error


def run_passes(kept, passes, count, batch_size, run_batch):
    """
    The batches of a one-process tool (the DDIM tools, the editing scripts) as the rounds of a
    KeptRounds: every pass (e.g. a step count) over `count` items, batch_size at a time, pass
    after pass, each round kept as it finishes.

    :param kept: an opened KeptRounds with len(passes) * ceil(count / batch_size) rounds, or
        None (nothing is kept).
    :param passes: the passes' keys, in order.
    :param run_batch: run_batch(key, items) -> {name: tensor} for the items (a slice) of a pass.
    :return: {key: {name: array over the pass's items}} (on rank 0).
    """
    if batch_size < 1:
        raise ScriptError(f"--batch_size must be at least 1, got {batch_size}")
    batches = -(-count // batch_size)
    if kept is None:
        kept = KeptRounds(None, len(passes) * batches, per_round=batch_size,
                          total=len(passes) * count)
    if kept.rounds != len(passes) * batches:
        raise ValueError(f"the KeptRounds has {kept.rounds} rounds, the passes "
                         f"{len(passes) * batches}")

    def make_round(index):
        start = (index % batches) * batch_size
        return run_batch(passes[index // batches], slice(start, min(start + batch_size, count)))

    kept.run(make_round)
    arrays = kept.arrays()
    return {key: {name: array[i * count:(i + 1) * count] for name, array in arrays.items()}
            for i, key in enumerate(passes)}
