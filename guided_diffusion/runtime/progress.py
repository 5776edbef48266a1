"""
Training progress for people watching a terminal: throughput (samples/s over all ranks), the
time left when the run has a known end, and one compact line per log interval,

    step 400/1600 (25%) | loss 0.0456 | 51.3 samples/s | 7.8 s elapsed | eta 23.4 s

written by rank 0 through the logger (terminal and log.txt) next to the usual diagnostics table.
The figures are wall-clock averages since the previous report, so the line costs no host syncs in
the steps between reports.
"""

import time

from .. import logger

__all__ = ["StepMeter", "format_seconds"]


def format_seconds(seconds):
    """
    :param seconds: a duration.
    :return: "12.3 s", "4 min 05 s" or "2 h 03 min".
    """
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        minutes, secs = divmod(int(round(seconds)), 60)
        return f"{minutes} min {secs:02d} s"
    hours, rest = divmod(int(round(seconds)), 3600)
    return f"{hours} h {rest // 60:02d} min"


class StepMeter:
    """
    Measure a training loop's speed between log reports.

    :param global_batch: images per optimizer step over all ranks.
    :param total_steps: the step count at which the run ends (0: unknown, no eta).
    :param start_step: the step the run starts (or resumes) from.
    :param clock: a function returning seconds (time.perf_counter; tests pass a fake one).
    """

    def __init__(self, *, global_batch, total_steps=0, start_step=0, clock=time.perf_counter):
        if global_batch < 1:
            raise ValueError(f"global_batch must be at least 1, got {global_batch}")
        self.global_batch = global_batch
        self.total_steps = total_steps
        self.clock = clock
        self.start_time = clock()
        self.start_step = start_step
        self._last_time = self.start_time
        self._last_step = start_step

    def measure(self, steps_done):
        """
        :param steps_done: optimizer steps completed so far (resume included).
        :return: dict with samples_per_sec (since the previous call), elapsed (seconds since the
            meter started) and eta (seconds left, None without a known end).
        """
        now = self.clock()
        span = now - self._last_time
        steps = steps_done - self._last_step
        rate = steps * self.global_batch / span if span > 0 and steps > 0 else float("nan")
        self._last_time, self._last_step = now, steps_done
        elapsed = now - self.start_time
        eta = None
        done_this_run = steps_done - self.start_step
        if self.total_steps and done_this_run > 0 and elapsed > 0:
            eta = (self.total_steps - steps_done) * elapsed / done_this_run
        return dict(samples_per_sec=rate, elapsed=elapsed, eta=eta)

    def line(self, steps_done, loss=None, figures=None):
        """
        :param steps_done: optimizer steps completed so far.
        :param loss: the loss to show (a float), or None.
        :param figures: what measure() returned (None: measure now).
        :return: the compact progress line.
        """
        if figures is None:
            figures = self.measure(steps_done)
        if self.total_steps:
            parts = [f"step {steps_done}/{self.total_steps} "
                     f"({100.0 * steps_done / self.total_steps:.0f}%)"]
        else:
            parts = [f"step {steps_done}"]
        if loss is not None:
            parts.append(f"loss {loss:.4g}")
        parts.append(f"{figures['samples_per_sec']:.1f} samples/s")
        parts.append(f"{format_seconds(figures['elapsed'])} elapsed")
        if figures["eta"] is not None:
            parts.append(f"eta {format_seconds(figures['eta'])}")
        return " | ".join(parts)

    def report(self, steps_done, loss_key="loss"):
        """
        Log the progress line with the mean of `loss_key` logged since the last dump; call it
        just before logger.dumpkvs(). Also logs samples_per_sec as a diagnostic (progress.csv).

        :return: the line.
        """
        loss = logger.getkvs().get(loss_key)
        figures = self.measure(steps_done)
        text = self.line(steps_done, None if loss is None else float(loss), figures)
        logger.logkv("samples_per_sec", figures["samples_per_sec"])
        logger.log(text)
        return text
