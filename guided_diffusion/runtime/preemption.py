"""
Stopping a run cleanly when the scheduler or the user asks: SIGTERM (sent by SLURM, Kubernetes
and cloud schedulers before they kill a job, and forwarded to every rank by mpiexec and
torchrun), SIGUSR1 (SLURM's `#SBATCH --signal=USR1@120`) or SIGINT (Ctrl-C).

The protocol, used by every training loop and by the sampling and editing loops
(runtime.kept_rounds):

1. While the loop runs, a handler for those signals only records that one arrived (nothing is
   done inside a signal handler; the step or batch in progress finishes untouched). A second
   Ctrl-C is the exception: it stops at once (runtime.signals.second_interrupt).
2. At the end of every `check_every`-th step of the run, all ranks take the maximum of their
   flags in one small collective (on the CPU, over gloo, so it never waits for the GPU). They
   call it at the same steps, so they agree on the same step, and a signal that reached any rank,
   at any time, is seen at the next check: it is never lost.
3. When the agreed flag is set, every rank saves the complete checkpoint (as at save_interval:
   rank 0 writes, the model file last), rank 0 logs where it is, and each process leaves through
   TrainingPreempted, a SystemExit with status EXIT_PREEMPTED (75, EX_TEMPFAIL: "try again
   later"), so a job script can tell "stopped for preemption, checkpoint saved" (75) from success
   (0), bad input (2) and crashes; after a Ctrl-C the status is EXIT_INTERRUPTED (130, what a
   shell reports for an interrupted command), the checkpoint saved all the same.
   `--resume_checkpoint auto` continues from that checkpoint.

A signal that arrived before the loop started (the scripts record it from their first line, see
runtime.signals) is agreed on before the first step: the run then leaves with status 75 (130)
without writing anything.

The check interval is 1 step by default; GD_PREEMPT_CHECK_STEPS=K checks every K steps (at most
K - 1 more steps run after the signal).
"""

import os
import signal
import threading

from .. import dist_util, logger
from ..errors import EXIT_INTERRUPTED, EXIT_PREEMPTED, TrainingPreempted  # noqa: F401
from . import signals
from .signals import SIGNALS, ignore_in_worker  # noqa: F401  (public here)

CHECK_STEPS_ENV = "GD_PREEMPT_CHECK_STEPS"


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
    Catch SIGTERM, SIGUSR1 and SIGINT while a training or sampling loop runs (a context manager;
    the previous handlers come back on exit).

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
        signals.second_interrupt(signum, self.received)
        if not self.received:
            self.received = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        else:  # Python only delivers signals to the main thread
            logger.warn("running outside the main thread: SIGTERM/SIGUSR1/SIGINT are not caught")
        # A signal recorded since the script started (runtime.signals) belongs to this run; taken
        # after our handler is in place, so none falls between the two.
        early = signals.take_received()
        if early and not self.received:
            self.received = early
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
        return self.agree()

    def agree(self):
        """
        Whether any rank received a signal, now (a collective every rank calls at the same
        point, whatever check_every is).

        :return: the same bool on every rank.
        """
        agreed = dist_util.max_over_ranks(self.received)
        if agreed:
            # Every rank names (and exits with the status of) the same signal, whichever it got.
            self.received = agreed
        return bool(agreed)

    def signal_name(self):
        try:
            return signal.Signals(self.received).name
        except ValueError:
            return f"signal {self.received}"

    def interrupted(self):
        """Whether the agreed signal is Ctrl-C (SIGINT) rather than a scheduler's."""
        return self.received == getattr(signal, "SIGINT", None)

    def stopped_by(self):
        """How the stop is described: "preempted by SIGTERM", "interrupted by SIGINT (Ctrl-C)"."""
        if self.interrupted():
            return f"interrupted by {self.signal_name()} (Ctrl-C)"
        return f"preempted by {self.signal_name()}"

    def training_status(self):
        """A stopped training run's exit status: 130 after Ctrl-C, else 75."""
        return EXIT_INTERRUPTED if self.interrupted() else EXIT_PREEMPTED

    def stop(self, step, checkpoint):
        """
        Log where the checkpoint is and leave through TrainingPreempted (exit status 75, or 130
        after Ctrl-C).

        :param step: the step the checkpoint holds.
        :param checkpoint: the path of its model file.
        """
        status = self.training_status()
        message = (
            f"{self.stopped_by()}: stopped after step {step} with a complete "
            f"checkpoint {checkpoint}; {continue_hint(os.path.dirname(os.fspath(checkpoint)))} "
            f"(exit status {status})"
        )
        logger.log(message)
        raise TrainingPreempted(message, checkpoint, status)

    def stop_before_first_step(self, folder, checkpoint=None):
        """
        Leave through TrainingPreempted before any step was taken: nothing is written.

        :param folder: the run's log folder (where a rerun looks for checkpoints).
        :param checkpoint: the checkpoint the run was to resume from, or None.
        """
        kept = (
            f"the checkpoint {checkpoint} it resumed from is unchanged" if checkpoint
            else "no checkpoint was written"
        )
        status = self.training_status()
        message = (
            f"{self.stopped_by()} before the first step: {kept}; run the same "
            f"command again, or {continue_hint(folder)} (exit status {status})"
        )
        logger.log(message)
        raise TrainingPreempted(message, checkpoint, status)


def continue_hint(folder):
    """How to continue a run whose checkpoints are in `folder`: the flags naming that folder."""
    return f"continue with --resume_checkpoint auto --log_dir {folder}"
