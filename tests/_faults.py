"""
Run a training (or sampling) script exactly as from the command line, with one fault injected at
a precise moment (the tests of cluster faults use it as the program they launch):

    GD_TEST_FAULT='{"signal": "worker", "n": 2}' python tests/_faults.py scripts/image_train.py ...

The fault is a JSON object in $GD_TEST_FAULT:

- {"signal": WHEN, "n": N, "times": 1 or 2, "to": "group", "job" or "self", "rank": R,
  "name": "SIGTERM" or e.g. "SIGINT"}: send the signal to this process's whole process group
  (its loader workers included), or with "to": "job" to the launcher's process group as well
  (mpiexec then forwards it to every rank's group). WHEN:
  "import" (before the script's imports, once its first lines caught the signals), "start" (as
  the script opens its data), "worker" (while the N-th loader worker process starts: after torch
  installed its own SIGTERM handler in it, before worker_init_fn runs; every worker is held 0.6 s
  there), "save" (after the first file of the N-th
  checkpoint is written, the rest still to come). With "times": 2 a second signal follows 0.2 s
  later (during a save: after the second file). WHEN "round": after the N-th batch of a sampling
  run is gathered (runtime.kept_rounds), in any script. With "to": "self" the signal goes to this
  process alone.
- {"enospc": "dump", "n": N, "rank": R}: the N-th logger dump of rank R fails with "No space
  left on device" on its log file.
- {"raise": "oom" or "bug", "n": N, "rank": R}: rank R raises an out-of-memory error (or a
  ZeroDivisionError) in its N-th training step.

Faults with "rank" only fire on that rank (RANK, or PMI_RANK under mpiexec).
"""

import errno
import json
import multiprocessing.process
import os
import runpy
import signal
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

FAULT = json.loads(os.environ.get("GD_TEST_FAULT", "{}"))
RANK = int(os.environ.get("RANK", os.environ.get("PMI_RANK", "0")))
MINE = FAULT.get("rank", RANK) == RANK


def send_signal(times=1):
    targets = {os.getpgrp()}
    if FAULT.get("to") == "job":
        targets.add(os.getpgid(os.getppid()))  # the launcher (mpiexec's proxy and mpiexec)
    sig = getattr(signal, FAULT.get("name", "SIGTERM"))
    for i in range(times):
        if i:
            time.sleep(0.2)
        if FAULT.get("to") == "self":
            os.kill(os.getpid(), sig)
            continue
        for group in targets:
            os.killpg(group, sig)


def signal_as_asked():
    send_signal(FAULT.get("times", 1))


def counted(n, action):
    """A function that runs action() on its n-th call."""
    calls = [0]

    def tick():
        calls[0] += 1
        if calls[0] == n:
            action()

    return tick


def install():
    when = FAULT.get("signal")
    if when and MINE:
        if when == "import":
            from guided_diffusion.runtime.signals import catch_preemption_signals

            catch_preemption_signals()
            signal_as_asked()
        elif when == "start":
            from guided_diffusion import image_datasets

            real_load = image_datasets.load_data

            def load_data(*args, **kwargs):
                signal_as_asked()
                return real_load(*args, **kwargs)

            image_datasets.load_data = load_data
        elif when == "worker":
            # Hold every new worker for a moment right after torch installed its own SIGTERM
            # handler there (before worker_init_fn runs), and signal in that moment: the window
            # a signal to the process group hits by chance on a cluster, made certain.
            from torch.utils.data._utils import signal_handling

            real_handlers = signal_handling._set_worker_signal_handlers

            def set_worker_signal_handlers(*args, **kwargs):
                real_handlers(*args, **kwargs)
                time.sleep(0.6)

            signal_handling._set_worker_signal_handlers = set_worker_signal_handlers

            def signal_in_the_window():
                time.sleep(0.3)
                signal_as_asked()

            tick = counted(FAULT.get("n", 1), signal_in_the_window)
            real_start = multiprocessing.process.BaseProcess.start

            def start(self):
                real_start(self)
                tick()

            multiprocessing.process.BaseProcess.start = start
        elif when == "round":
            from guided_diffusion.runtime import kept_rounds

            real_collect = kept_rounds.KeptRounds._collect
            tick = counted(FAULT.get("n", 1), signal_as_asked)

            def collect(self, *args, **kwargs):
                result = real_collect(self, *args, **kwargs)
                tick()
                return result

            kept_rounds.KeptRounds._collect = collect
        elif when == "save":
            from guided_diffusion.runtime import checkpoints

            real_save, real_files = checkpoints.save_atomic, checkpoints.save_checkpoint_files
            count = {"sets": 0, "files": 0}

            def save_checkpoint_files(files, previous=None):
                count["sets"] += 1
                count["files"] = 0
                return real_files(files, previous=previous)

            def save_atomic(obj, path):
                result = real_save(obj, path)
                count["files"] += 1
                if count["sets"] == FAULT.get("n", 1) and (
                    count["files"] == 1 or (FAULT.get("times") == 2 and count["files"] == 2)
                ):
                    send_signal()
                return result

            checkpoints.save_checkpoint_files = save_checkpoint_files
            checkpoints.save_atomic = save_atomic
    if FAULT.get("enospc") == "dump" and MINE:
        from guided_diffusion import logger

        real_dump = logger.dumpkvs

        def full_disk():
            path = os.path.join(logger.get_dir(), f"log-rank{RANK:03d}.txt")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

        tick = counted(FAULT.get("n", 1), full_disk)

        def dumpkvs():
            tick()
            return real_dump()

        logger.dumpkvs = dumpkvs
    if FAULT.get("raise") and MINE:
        import torch

        from guided_diffusion.training import engine

        def fail():
            if FAULT["raise"] == "oom":
                raise torch.OutOfMemoryError(
                    "CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity "
                    "of 79.19 GiB of which 3.00 GiB is free."
                )
            raise ZeroDivisionError("division by zero")

        tick = counted(FAULT.get("n", 1), fail)
        real_take = engine.Trainer.take_step

        def take_step(self, batch, cond):
            tick()
            return real_take(self, batch, cond)

        engine.Trainer.take_step = take_step


if __name__ == "__main__":
    script = os.path.abspath(sys.argv[1])
    sys.argv = [script] + sys.argv[2:]
    install()
    runpy.run_path(script, run_name="__main__")
