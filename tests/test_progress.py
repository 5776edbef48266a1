"""Training progress: the StepMeter's throughput and time left, and the progress line TrainLoop
logs every log interval (step of total, the loss logged since the last dump, samples/s)."""

import csv
import math

import pytest
import torch

from guided_diffusion import logger
from guided_diffusion.runtime.progress import StepMeter, format_seconds
from guided_diffusion.script_util import create_gaussian_diffusion, create_model
from guided_diffusion.train_util import TrainLoop

pytestmark = pytest.mark.usefixtures("cpu_only")


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_meter_rate_and_eta_from_the_clock():
    clock = FakeClock()
    meter = StepMeter(global_batch=32, total_steps=100, start_step=20, clock=clock)
    clock.now += 4.0
    figures = meter.measure(30)  # 10 steps of 32 images in 4 s
    assert figures["samples_per_sec"] == pytest.approx(80.0)
    assert figures["elapsed"] == pytest.approx(4.0)
    assert figures["eta"] == pytest.approx(70 * 0.4)  # 70 steps left at 0.4 s a step
    clock.now += 1.0
    # The rate is over the last interval only (5 steps in 1 s), the eta over the whole run.
    figures = meter.measure(35)
    assert figures["samples_per_sec"] == pytest.approx(160.0)
    assert figures["eta"] == pytest.approx(65 * 5.0 / 15)
    clock.now += 2.0
    line = meter.line(40, loss=0.123456)
    assert line == "step 40/100 (40%) | loss 0.1235 | 80.0 samples/s | 7.0 s elapsed | eta 21.0 s"


def test_meter_without_an_end_has_no_eta_and_refuses_empty_batches():
    clock = FakeClock()
    meter = StepMeter(global_batch=4, clock=clock)
    clock.now += 2.0
    assert meter.line(8) == "step 8 | 16.0 samples/s | 2.0 s elapsed"
    assert math.isnan(meter.measure(8)["samples_per_sec"])  # no step since the last call
    with pytest.raises(ValueError, match="global_batch"):
        StepMeter(global_batch=0)


def test_format_seconds():
    assert format_seconds(12.34) == "12.3 s"
    assert format_seconds(245) == "4 min 05 s"
    assert format_seconds(7380) == "2 h 03 min"


def test_train_loop_logs_a_progress_line_every_log_interval(tmp_path):
    logger.configure(dir=str(tmp_path), format_strs=["csv", "log"])
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)

    def data():
        while True:
            yield torch.rand(2, 3, 16, 16, generator=gen) * 2 - 1, {}

    model = create_model(16, 32, 1, channel_mult="1,2", attention_resolutions="8",
                         num_head_channels=16)
    TrainLoop(
        model=model, diffusion=create_gaussian_diffusion(steps=50), data=data(), batch_size=2,
        microbatch=-1, lr=1e-3, ema_rate="0.9", log_interval=2, save_interval=100,
        resume_checkpoint="", lr_anneal_steps=5,
    ).run_loop()
    lines = [l for l in (tmp_path / "log.txt").read_text().splitlines() if l.startswith("step ")]
    # Dumps follow steps 0, 2 and 4 (indices), i.e. after 1, 3 and 5 steps taken.
    assert [l.split(" | ")[0] for l in lines] == ["step 1/5 (20%)", "step 3/5 (60%)",
                                                  "step 5/5 (100%)"]
    rows = list(csv.DictReader(open(tmp_path / "progress.csv")))
    assert len(rows) == 3
    for line, row in zip(lines, rows):
        fields = line.split(" | ")
        # The loss shown is the one the diagnostics table got for the same interval.
        assert float(fields[1].removeprefix("loss ")) == pytest.approx(float(row["loss"]), rel=1e-3)
        rate = float(fields[2].removesuffix(" samples/s"))
        assert rate > 0 and float(row["samples_per_sec"]) == pytest.approx(rate, rel=0.01, abs=0.051)
