"""
The stop signals (SIGTERM, SIGUSR1, SIGINT) from a training or sampling process's first moment
to its last.

A scheduler's signal may arrive at any time: while Python imports torch, while the process group
forms, while a data-loader worker starts, while a checkpoint is written, or twice. Python's
default action for SIGTERM and SIGUSR1 kills the process (exit status 143 or 138), which a
requeue recipe reads as a crash, and SIGINT (Ctrl-C) raises KeyboardInterrupt wherever the
process is, which loses the work since the last save. So a training or sampling script's entry
point calls catch_preemption_signals() before anything else, and from then on a signal is only
recorded here; the loop (runtime.preemption.PreemptionWatch) takes the record over when it
starts and acts on it between steps or batches.

One exception: a Ctrl-C that comes after a signal was already recorded means "stop now" (the
user does not want to wait for the step or batch in progress): it raises KeyboardInterrupt at
once (second_interrupt). Files being written are atomic (runtime.files), so nothing partial is
left behind, and cli.main.run_main turns it into one line and exit status 130.

Loader workers must not die of the signal either (SLURM, torchrun and mpiexec's proxies signal
the whole process group, workers included, and a dead worker crashes its parent before it can
save). torch installs its own SIGTERM handler in a new worker before any user code runs there, so
ignoring the signal from a worker_init_fn leaves a window. hold_preemption_signals() closes it: the
parent blocks the signals while it starts workers, a forked worker inherits the blocked mask, and
ignore_in_worker (the worker_init_fn) ignores them before unblocking. A signal that reaches the
parent meanwhile stays pending and is recorded the moment the block ends.

This module imports only the standard library, so a script can install the handlers before its
heavy imports.
"""

import contextlib
import signal
import threading

# SIGUSR1 does not exist on Windows.
SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1", "SIGINT")
                if hasattr(signal, name))

_received = 0  # the first signal recorded and not yet taken over, 0 for none
_installed = False


def second_interrupt(signum, already):
    """
    Raise KeyboardInterrupt for a Ctrl-C (SIGINT) that comes when a signal was already recorded
    (`already`, 0 for none): the second Ctrl-C stops at once. Any other signal only counts once.
    """
    if signum == signal.SIGINT and already:
        raise KeyboardInterrupt


def _record(signum, frame):
    # Only record: whatever the process is doing (importing, writing a file) must go on intact.
    global _received
    second_interrupt(signum, _received)
    if not _received:
        _received = signum


def catch_preemption_signals():
    """
    Record SIGTERM, SIGUSR1 and SIGINT instead of dying of them, for the rest of the process's
    life (the training and sampling scripts call it first thing). Does nothing outside the main thread, where
    Python cannot set handlers, and nothing the second time.
    """
    global _installed
    if _installed or threading.current_thread() is not threading.main_thread():
        return
    for sig in SIGNALS:
        signal.signal(sig, _record)
    _installed = True


def take_received():
    """
    The signal recorded so far (0 for none), forgetting it: whoever takes it acts on it, and a
    later run in the same process starts with a clean record.
    """
    global _received
    received, _received = _received, 0
    return received


def received():
    """The signal recorded so far (0 for none), without taking it."""
    return _received


@contextlib.contextmanager
def hold_preemption_signals():
    """
    Block the stop signals in this thread for the duration (e.g. while starting loader
    workers); a signal arriving meanwhile is delivered when the block ends. A no-op where
    pthread_sigmask does not exist.
    """
    if not hasattr(signal, "pthread_sigmask") or not SIGNALS:
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def ignore_in_worker(worker_id=None):
    """
    Make a data-loader worker ignore the stop signals (a DataLoader worker_init_fn), then
    unblock them (see hold_preemption_signals; a signal pending until now is discarded).

    Killed by the signal, a worker would take the training process down with "DataLoader worker
    exited unexpectedly" before it could save; its parent ends it anyway when it shuts the
    loader down or dies.
    """
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask") and SIGNALS:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
