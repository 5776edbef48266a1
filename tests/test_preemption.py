"""The preemption watch on its own: handlers in and out, agreement cadence, the exit status."""

import os
import signal
import threading

import pytest

from guided_diffusion import logger
from guided_diffusion.runtime import preemption, signals
from guided_diffusion.runtime.preemption import PreemptionWatch, TrainingPreempted


def test_signals_are_recorded_while_watching_and_handlers_come_back(tmp_path):
    logger.configure(dir=str(tmp_path), format_strs=["log"])
    before = {sig: signal.getsignal(sig) for sig in preemption.SIGNALS}
    with PreemptionWatch(check_every=1) as watch:
        assert not watch.requested()
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal changes nothing
        assert watch.requested() and watch.signal_name() == "SIGUSR1"
        with pytest.raises(TrainingPreempted) as info:
            watch.stop(12, str(tmp_path / "model000012.pt"))
    assert {sig: signal.getsignal(sig) for sig in preemption.SIGNALS} == before
    assert isinstance(info.value, SystemExit) and info.value.code == preemption.EXIT_PREEMPTED == 75
    assert info.value.checkpoint == str(tmp_path / "model000012.pt")
    logger.get_current().close()
    assert (
        f"preempted by SIGUSR1: stopped after step 12 with a complete checkpoint "
        f"{tmp_path / 'model000012.pt'}; continue with --resume_checkpoint auto --log_dir "
        f"{tmp_path} (exit status 75)"
    ) in (tmp_path / "log.txt").read_text()


def test_checks_every_k_steps_and_never_loses_a_signal(monkeypatch):
    monkeypatch.setenv(preemption.CHECK_STEPS_ENV, "3")
    with PreemptionWatch() as watch:
        assert watch.check_every == 3
        os.kill(os.getpid(), signal.SIGTERM)  # arrives before the first check
        # Steps 1 and 2 run on; the check after step 3 sees it.
        assert [watch.requested() for _ in range(3)] == [False, False, True]


@pytest.mark.parametrize("value", ["0", "x", "-1"])
def test_bad_check_interval(monkeypatch, value):
    monkeypatch.setenv(preemption.CHECK_STEPS_ENV, value)
    with pytest.raises(ValueError, match="GD_PREEMPT_CHECK_STEPS"):
        PreemptionWatch()


def test_loader_workers_ignore_the_signals():
    saved = {sig: signal.getsignal(sig) for sig in preemption.SIGNALS}
    try:
        with signals.hold_preemption_signals():
            # As in a worker forked inside the block: the signals are blocked until it ignores
            # them, and a signal pending meanwhile is dropped rather than delivered.
            # (to this thread: a signal to the process may go to another thread of pytest's)
            signal.pthread_kill(threading.get_ident(), signal.SIGTERM)
            assert signal.SIGTERM in signal.sigpending()
            preemption.ignore_in_worker(0)
            assert signal.SIGTERM not in signal.sigpending()
            assert all(signal.getsignal(sig) is signal.SIG_IGN for sig in preemption.SIGNALS)
            assert not set(preemption.SIGNALS) & signal.pthread_sigmask(signal.SIG_BLOCK, [])
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_a_signal_recorded_before_the_watch_belongs_to_the_next_run(tmp_path):
    logger.configure(dir=str(tmp_path), format_strs=["log"])
    before = {sig: signal.getsignal(sig) for sig in preemption.SIGNALS}
    monkeypatched = signals._installed
    try:
        signals._installed = False
        signals.catch_preemption_signals()
        os.kill(os.getpid(), signal.SIGUSR1)  # e.g. while the script imports torch
        assert signals.received() == signal.SIGUSR1
        with PreemptionWatch(check_every=5) as watch:
            assert signals.received() == 0  # taken over: a later run starts clean
            assert watch.agree() and watch.signal_name() == "SIGUSR1"
            with pytest.raises(TrainingPreempted) as info:
                watch.stop_before_first_step(str(tmp_path))
        assert info.value.code == 75 and info.value.checkpoint is None
        assert "before the first step: no checkpoint was written" in str(info.value)
        assert f"--resume_checkpoint auto --log_dir {tmp_path}" in str(info.value)
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
        signals._installed = monkeypatched
        signals.take_received()
