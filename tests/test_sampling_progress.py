"""The sampling progress bar counts denoising steps over the whole run (every batch, every
sampler), so that a run of one large batch still shows progress; the loops only advance the
bar's counter."""

import pytest
import torch

from guided_diffusion import logger
from guided_diffusion.diffusion import progress as loop_progress
from guided_diffusion.sampling import loop
from guided_diffusion.script_util import create_gaussian_diffusion

pytestmark = pytest.mark.usefixtures("cpu_only", "quiet_logger")


@pytest.fixture
def quiet_logger(tmp_path):
    logger.configure(dir=str(tmp_path), format_strs=[])
    yield
    logger.reset()


class RecordingBar:
    """Stands in for tqdm: records how it was made and how far it was advanced."""

    made = []

    def __init__(self, iterable=None, total=None, disable=False, desc=None, unit=None):
        self.iterable, self.total, self.disable, self.desc, self.unit = iterable, total, disable, desc, unit
        self.n, self.closed = 0, False
        RecordingBar.made.append(self)

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.n += 1

    def update(self, n=1):
        self.n += n

    def close(self):
        self.closed = True


def _no_bar_of_its_own(*args, **kwargs):
    raise AssertionError("a loop given a bar must not open one of its own")


def _zero_model(x, t, **kwargs):
    return torch.zeros_like(x)


@pytest.mark.parametrize("sampler, steps", [("ddpm", 4), ("ddim", 4), ("euler", 4), ("heun", 2)])
def test_one_bar_counts_every_denoising_step_of_the_run(monkeypatch, sampler, steps):
    RecordingBar.made = []
    monkeypatch.setattr(loop, "tqdm", RecordingBar)
    monkeypatch.setattr(loop_progress, "tqdm", _no_bar_of_its_own)
    # ddpm/ddim: 4 respaced steps; the solvers: a budget of 4 model evaluations.
    respacing = "4" if sampler in ("ddpm", "ddim") else ""
    evaluations = None if sampler in ("ddpm", "ddim") else 4
    diffusion = create_gaussian_diffusion(steps=100, timestep_respacing=respacing)
    sample_fn = loop.make_sample_fn(sampler, diffusion, evaluations)
    assert loop.sample_steps(sampler, diffusion, evaluations) == steps  # heun: 2 steps of 2 evaluations
    seen = []

    def make_batch(bar):
        seen.append(bar.n)  # the bar has moved by whole batches of steps before each batch
        sample_fn(_zero_model, (2, 3, 4, 4), device="cpu", progress=bar)
        return torch.zeros(2, 4, 4, 3, dtype=torch.uint8), None

    images, _ = loop.gather_samples(5, 2, make_batch, steps_per_batch=steps)
    assert len(images) == 5
    (bar,) = RecordingBar.made
    # Three rounds of 2 images for 5 samples: 3 * steps denoising steps, each counted once.
    assert bar.total == 3 * steps and bar.n == 3 * steps and bar.unit == "step" and bar.closed
    assert seen == [0, steps, 2 * steps]
    assert not bar.disable


def test_without_steps_the_bar_counts_rounds_and_loops_keep_their_own_bars(monkeypatch):
    RecordingBar.made = []
    monkeypatch.setattr(loop, "tqdm", RecordingBar)
    loop.gather_samples(3, 1, lambda: (torch.zeros(1, 2, 2, 3, dtype=torch.uint8), None),
                        progress=False)
    (bar,) = RecordingBar.made
    assert bar.n == 3 and bar.disable
    # A loop called with progress=True (or False) still draws (or skips) a bar of its own.
    monkeypatch.setattr(loop_progress, "tqdm", RecordingBar)
    diffusion = create_gaussian_diffusion(steps=100, timestep_respacing="3")
    diffusion.ddim_sample_loop(_zero_model, (1, 3, 2, 2), device="cpu", progress=True)
    assert RecordingBar.made[-1].n == 3 and not RecordingBar.made[-1].disable
