"""
Stopping a training run cleanly when the scheduler asks: SIGTERM (sent by SLURM, Kubernetes and
cloud schedulers before they kill a job, and forwarded to every rank by mpiexec and torchrun) or
SIGUSR1 (SLURM's `#SBATCH --signal=USR1@120`).

The protocol, used by every training loop:

1. While the loop runs, a handler for those signals only records that one arrived (nothing is
   done inside a signal handler; the step in progress finishes untouched).
2. At the end of every `check_every`-th step of the run, all ranks take the maximum of their
   flags in one small collective (on the CPU, over gloo, so it never waits for the GPU). They
   call it at the same steps, so they agree on the same step, and a signal that reached any rank,
   at any time, is seen at the next check: it is never lost.
3. When the agreed flag is set, every rank saves the complete checkpoint (as at save_interval:
   rank 0 writes, the model file last), rank 0 logs where it is, and each process leaves through
   TrainingPreempted, a SystemExit with status EXIT_PREEMPTED (75, EX_TEMPFAIL: "try again
   later"), so a job script can tell "stopped for preemption, checkpoint saved" (75) from success
   (0), bad input (2) and crashes. `--resume_checkpoint auto` continues from that checkpoint.

The check interval is 1 step by default; GD_PREEMPT_CHECK_STEPS=K checks every K steps (at most
K - 1 more steps run after the signal).
"""

import os
import signal
import threading

from .. import dist_util, logger
from ..errors import EXIT_PREEMPTED, TrainingPreempted  # noqa: F401  (public here)

# SIGUSR1 does not exist on Windows.
SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name))
CHECK_STEPS_ENV = "GD_PREEMPT_CHECK_STEPS"



def ignore_in_worker(worker_id=None):
    """
    Make a data-loader worker ignore SIGTERM and SIGUSR1 (a DataLoader worker_init_fn).

    SLURM signals every process of a job step and torchrun its workers' whole process groups, so
    loader workers receive the preemption signal too. Killed by it, they would take the training
    process down with "DataLoader worker exited unexpectedly" before it could save; their parent
    ends them anyway when it shuts the loader down or dies.
    """
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def check_interval():
    """Steps between two preemption checks: $GD_PREEMPT_CHECK_STEPS, default 1."""
    text = os.environ.get(CHECK_STEPS_ENV, "").strip()
    if not text:
        return 1
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{CHECK_STEPS_ENV}={text!r}: give a whole number of steps >= 1")
    return int(text)


class PreemptionWatch:
    """
    Catch SIGTERM and SIGUSR1 while a training loop runs (a context manager; the previous
    handlers come back on exit).

        with PreemptionWatch() as watch:
            while training:
                ...one step...
                if watch.requested():
                    ...save...
                    watch.stop(step, checkpoint_path)   # raises TrainingPreempted

    :param check_every: steps between checks (default: check_interval()).
    """

    def __init__(self, check_every=None):
        self.check_every = check_interval() if check_every is None else int(check_every)
        self.received = 0  # the first signal number received, 0 for none
        self._previous = {}
        self._checks = 0

    def _handle(self, signum, frame):
        # Only record: the step being computed must finish, and collectives cannot run here.
        if not self.received:
            self.received = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        else:  # Python only delivers signals to the main thread
            logger.warn("training outside the main thread: SIGTERM/SIGUSR1 are not caught")
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        return False

    def requested(self):
        """
        Whether any rank received a signal; a collective every check_every calls (every rank
        must call it after each step, so they agree on the same step).

        :return: the same bool on every rank.
        """
        self._checks += 1
        if self._checks % self.check_every:
            return False
        agreed = dist_util.max_over_ranks(self.received)
        if agreed and not self.received:
            self.received = agreed
        return bool(agreed)

    def signal_name(self):
        try:
            return signal.Signals(self.received).name
        except ValueError:
            return f"signal {self.received}"

    def stop(self, step, checkpoint):
        """
        Log where the checkpoint is and leave through TrainingPreempted (exit status 75).

        :param step: the step the checkpoint holds.
        :param checkpoint: the path of its model file.
        """
        message = (
            f"preempted by {self.signal_name()}: stopped after step {step} with a complete "
            f"checkpoint {checkpoint}; continue with --resume_checkpoint auto (exit status "
            f"{EXIT_PREEMPTED})"
        )
        logger.log(message)
        raise TrainingPreempted(message, checkpoint)
