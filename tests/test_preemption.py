"""The preemption watch on its own: handlers in and out, agreement cadence, the exit status."""

import os
import signal

import pytest

from guided_diffusion import logger
from guided_diffusion.runtime import preemption
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
        f"{tmp_path / 'model000012.pt'}; continue with --resume_checkpoint auto (exit status 75)"
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
        preemption.ignore_in_worker(0)
        assert all(signal.getsignal(sig) is signal.SIG_IGN for sig in preemption.SIGNALS)
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
