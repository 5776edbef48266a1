"""
The learning-rate schedule every training task shares (training.options): --lr_warmup_steps and
--lr_schedule constant|linear|cosine, with the reference's --lr_anneal_steps / --anneal_lr as
the linear case. Each task's script runs a few tiny steps; the rate of every step is read from
progress.csv (the "lr" column, the rate the step used) and compared with rates computed here
from the formulas, with the reference's loops re-enacted step by step, and with diffusers'
schedules (another library) where it is installed. A run stopped at step k and resumed gives the
uninterrupted run's rates. Bad flags are refused in one line before a log folder exists.
"""

import csv
import math

import pytest
import torch

from test_resume import CGAN, CLASSIFIER, DIFFUSION, SUPER_RES, VAE, data, run  # noqa: F401

pytestmark = pytest.mark.usefixtures("cpu_only", "single_thread")

LR = 1e-3
FLAGS = {
    "image_train": (DIFFUSION, "--lr_anneal_steps"),
    "super_res_train": (SUPER_RES, "--lr_anneal_steps"),
    "classifier_train": (CLASSIFIER, "--iterations"),
    "cgan_train": (CGAN, "--iterations"),
    "vae_train": (VAE, "--iterations"),
}
# The diffusion loop of the reference sets the rate after each step from that step's index, so
# its decay runs one step behind (the first two steps both take --lr).
LAGGED = {"image_train", "super_res_train"}


def expected_rate(name, k, schedule, warmup, horizon):
    """The rate of step k (0-based), from the formulas of docs/training.md."""
    if k < warmup:
        return LR * k / warmup
    if schedule == "constant":
        return LR
    since = max(k - warmup - (1 if name in LAGGED else 0), 0)
    progress = since / (horizon - warmup)
    if schedule == "linear":
        return LR * (1 - progress)
    return LR * 0.5 * (1 + math.cos(math.pi * progress))


def logged_rates(folder):
    """{step taken: lr} from a run's progress.csv."""
    with open(folder / "progress.csv") as f:
        return {int(row["step"]): float(row["lr"]) for row in csv.DictReader(f)}


def train(name, folder, monkeypatch, data, *extra):
    flags, _ = FLAGS[name]
    args = ["--data_dir", data, *flags, "--lr", LR, "--log_interval", 1, "--save_interval", 100,
            *extra]
    assert run(name, args, folder, monkeypatch) == 0
    return logged_rates(folder)


# name: schedule, warm-up, horizon (each schedule on at least two tasks, a warm-up on most)
CASES = {
    "image_train": ("cosine", 2, 6),
    "super_res_train": ("linear", 0, 5),
    "classifier_train": ("linear", 2, 6),
    "cgan_train": ("cosine", 2, 6),
    "vae_train": ("constant", 3, 6),
}


@pytest.mark.parametrize("name", list(CASES))
def test_every_task_follows_the_schedule_and_resume_continues_it(name, data, tmp_path,
                                                                  monkeypatch):
    schedule, warmup, horizon = CASES[name]
    _, horizon_flag = FLAGS[name]
    flags = ["--lr_schedule", schedule, "--lr_warmup_steps", warmup, horizon_flag, horizon]
    full = train(name, tmp_path / "full", monkeypatch, data, *flags)
    assert sorted(full) == list(range(1, horizon + 1))
    for step, rate in full.items():
        assert rate == pytest.approx(expected_rate(name, step - 1, schedule, warmup, horizon),
                                     rel=1e-12, abs=1e-15), (step, full)
    if warmup:
        assert full[1] == 0.0 and full[warmup + 1] == pytest.approx(LR)
    # Stopped after 3 steps (inside or just after the warm-up), then resumed to the horizon.
    first = train(name, tmp_path / "parts", monkeypatch, data, *flags, "--max_steps", 3)
    rest = train(name, tmp_path / "parts", monkeypatch, data, *flags, "--resume_checkpoint",
                 "auto")
    assert {**first, **rest} == full


def reference_diffusion_rates(steps, lr_anneal_steps):
    """The reference TrainLoop's rates: step k runs with the optimizer's rate, which
    _anneal_lr then sets to lr * (1 - k / lr_anneal_steps) for the next step."""
    rates, current = [], LR
    for step in range(steps):
        rates.append(current)
        current = LR * (1 - step / lr_anneal_steps)
    return rates


def reference_classifier_rates(iterations):
    """The reference classifier_train's --anneal_lr: the rate is set before each step."""
    return [LR * (1 - step / iterations) for step in range(iterations)]


def test_the_reference_decays_are_kept_bit_for_bit(data, tmp_path, monkeypatch):
    diffusion = train("image_train", tmp_path / "d", monkeypatch, data, "--lr_anneal_steps", 5)
    assert [diffusion[s] for s in sorted(diffusion)] == reference_diffusion_rates(5, 5)
    classifier = train("classifier_train", tmp_path / "c", monkeypatch, data, "--iterations", 5,
                       "--anneal_lr", True)
    assert [classifier[s] for s in sorted(classifier)] == reference_classifier_rates(5)
    # --lr_schedule linear is the same decay.
    linear = train("classifier_train", tmp_path / "l", monkeypatch, data, "--iterations", 5,
                   "--lr_schedule", "linear")
    assert linear == classifier


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_the_schedule_equals_diffusers(schedule):
    optimization = pytest.importorskip("diffusers.optimization")
    from guided_diffusion.training.options import TrainOptions

    warmup, horizon = 3, 11
    ours = TrainOptions(lr=LR, lr_schedule=schedule, lr_warmup_steps=warmup,
                        iterations=horizon).lr_schedule_for()
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=LR)
    theirs = optimization.get_scheduler(schedule, opt, num_warmup_steps=warmup,
                                        num_training_steps=horizon)
    for step in range(horizon):
        assert ours.rate(step) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12, abs=1e-18)
        opt.step()
        theirs.step()


REFUSED = [
    (["--lr_warmup_steps", -1], "--lr_warmup_steps must be >= 0"),
    (["--lr_schedule", "exponential"], "--lr_schedule 'exponential' is unknown"),
    (["--lr_schedule", ""], "--lr_schedule '' is unknown"),
    (["--lr_schedule", "cosine", "ITER", 0], "--lr_schedule cosine decays the rate to 0 at ITER"),
    (["--lr_warmup_steps", 7, "ITER", 6], "--lr_warmup_steps 7 leaves no step"),
    (["--lr_schedule", "linear", "--lr_warmup_steps", 6, "ITER", 6],
     "--lr_warmup_steps 6 leaves no step of the linear schedule before ITER 6"),
]


@pytest.mark.parametrize("name", list(FLAGS))
def test_bad_schedules_are_refused_in_one_line_before_any_work(name, data, tmp_path, monkeypatch,
                                                                capsys):
    flags, horizon_flag = FLAGS[name]
    for extra, words in REFUSED:
        extra = [horizon_flag if a == "ITER" else a for a in extra]
        words = words.replace("ITER", horizon_flag)
        log = tmp_path / "log"
        capsys.readouterr()
        status = run(name, ["--data_dir", data, *flags, *extra], log, monkeypatch)
        err = capsys.readouterr().err.strip().splitlines()
        assert status == 2 and len(err) == 1 and words in err[0], (extra, err)
        assert not log.exists(), extra
    # A number where one is needed: argparse's own refusal.
    assert run(name, ["--data_dir", data, *flags, "--lr_warmup_steps", "ten"], tmp_path / "log",
               monkeypatch) == 2
    assert "--lr_warmup_steps: invalid int value: 'ten'" in capsys.readouterr().err


def test_the_papers_sgd_keeps_its_own_schedule(data, tmp_path, monkeypatch, capsys):
    flags, _ = FLAGS["cgan_train"]
    status = run("cgan_train", ["--data_dir", data, *flags, "--optimizer", "sgd", "--lr_schedule",
                                "cosine", "--iterations", 4], tmp_path / "log", monkeypatch)
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1
    assert "--lr_schedule and --lr_warmup_steps apply to --optimizer adam" in err[0]
    assert not (tmp_path / "log").exists()
