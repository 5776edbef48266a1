"""Cluster faults at the worst moments, on real processes (CPU, tiny model, tests/_faults.py
injects each fault at a precise point of a real image_train run):

- a SIGTERM to the whole process group (loader workers included) at start-up, while a loader
  worker starts, during a save, and twice, ends with exit status 75 and a checkpoint of the last
  completed step, or, before the first step, with 75 and no checkpoint; under mpiexec too;
- one rank's failure (a full disk, an out-of-memory error) ends every rank promptly with one line
  for it, under mpiexec and under torchrun (whose failure table then shows that line);
- a second job on a log folder that a live job holds is refused, and a killed job leaves no stale
  lock.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from guided_diffusion.data.digits import write_digits
from guided_diffusion.runtime import checkpoints

from _launch import child_env, mpiexec_prefix, torchrun_prefix

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVER = os.path.join(REPO, "tests", "_faults.py")
TRAIN = os.path.join(REPO, "scripts", "image_train.py")
MODEL = (
    "--image_size 16 --num_channels 32 --num_res_blocks 1 --channel_mult 1,2 "
    "--attention_resolutions 8 --num_head_channels 16 --diffusion_steps 50 --log_interval 1"
).split()
TIMEOUT = 240


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # 12 images: 3 batches of 4 per epoch on one process, 3 batches of 2 per rank on two.
    return write_digits(str(tmp_path_factory.mktemp("faults") / "digits"), image_size=16, limit=12)


def launch(prefix, log_dir, data, extra, fault=None, timeout=TIMEOUT, **env):
    """
    Run image_train through the fault driver in a session of its own; returns (status, stdout,
    stderr, seconds).
    """
    command = [*prefix, DRIVER, TRAIN, "--data_dir", data, *MODEL, *map(str, extra),
               "--log_dir", str(log_dir)]
    env = child_env(cpu=True, GD_TEST_FAULT=json.dumps(fault or {}), **env)
    started = time.monotonic()
    proc = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the job did not end within {timeout} s:\n{err[-3000:]}")
    return proc.returncode, out, err, time.monotonic() - started


def one_process():
    return [sys.executable]


def saved_steps(log_dir):
    return sorted(checkpoints.parse_step(p, "model")
                  for p in checkpoints.checkpoint_candidates(log_dir, "model"))


def assert_complete_checkpoint(log_dir, step):
    """The newest checkpoint is that of `step`, with every file of its set, all loadable."""
    assert checkpoints.find_latest_checkpoint(log_dir, "model") == str(log_dir / f"model{step:06d}.pt")
    for name in (f"model{step:06d}.pt", f"opt{step:06d}.pt", f"state{step:06d}.pt",
                 f"ema_0.9999_{step:06d}.pt"):
        torch.load(log_dir / name, weights_only=True, map_location="cpu")
    assert torch.load(log_dir / f"state{step:06d}.pt", weights_only=True)["step"] == step
    assert not [n for n in os.listdir(log_dir) if n.endswith(".tmp")]


# ----------------------------------------------------------------------------- point 1


# (fault, flags, the step whose checkpoint must exist: 0 = none written)
PROCESS_GROUP_SIGNALS = {
    # Caught from the script's first lines: the run stops before its first step.
    "during_imports": ({"signal": "import"}, [], 0),
    "while_opening_the_data": ({"signal": "start", "times": 2}, [], 0),
    # The second epoch's loader worker starts while step 4's batch is read: step 4 completes.
    "as_a_loader_worker_starts": ({"signal": "worker", "n": 2}, [], 4),
    # During the save of step 2 (after its first file), then once more after its second file.
    "during_a_save_twice": ({"signal": "save", "n": 1, "times": 2}, ["--save_interval", 2], 2),
}


@pytest.mark.parametrize("case", list(PROCESS_GROUP_SIGNALS))
def test_sigterm_to_the_process_group_ends_with_status_75(case, data, tmp_path):
    fault, flags, step = PROCESS_GROUP_SIGNALS[case]
    status, out, err, _ = launch(one_process(), tmp_path, data,
                                 ["--batch_size", 4, "--lr_anneal_steps", 8, *flags], fault)
    assert status == 75, err[-3000:]
    assert "Traceback" not in err and "exited unexpectedly" not in err, err[-3000:]
    log = (tmp_path / "log.txt").read_text()
    if step == 0:
        assert saved_steps(tmp_path) == []
        assert "preempted by SIGTERM before the first step: no checkpoint was written" in log
    else:
        assert saved_steps(tmp_path) == [step]
        assert_complete_checkpoint(tmp_path, step)
        assert (
            f"preempted by SIGTERM: stopped after step {step} with a complete checkpoint "
            f"{tmp_path / f'model{step:06d}.pt'}; continue with --resume_checkpoint auto "
            f"--log_dir {tmp_path} (exit status 75)"
        ) in log


def test_sigterm_twice_to_the_whole_mpiexec_job_as_a_worker_starts(data, tmp_path):
    # Rank 1 signals its own process group and mpiexec's (which forwards it to every rank's
    # group) twice, right after its second-epoch loader worker started.
    fault = {"signal": "worker", "n": 2, "rank": 1, "to": "job", "times": 2}
    status, out, err, _ = launch([*mpiexec_prefix(2), sys.executable], tmp_path, data,
                                 ["--batch_size", 2, "--lr_anneal_steps", 8], fault,
                                 GD_DIST_TIMEOUT=60)
    assert status == 75, err[-3000:]
    assert "Traceback" not in err and "exited unexpectedly" not in err, err[-3000:]
    (step,) = saved_steps(tmp_path)
    assert step >= 4  # rank 1 was reading step 4's batch when the signals came
    assert_complete_checkpoint(tmp_path, step)
    for name in ("log.txt", "log-rank001.txt"):
        assert f"preempted by SIGTERM: stopped after step {step}" in (tmp_path / name).read_text()


# ----------------------------------------------------------------------------- point 2


def error_lines(text):
    return [line for line in text.splitlines() if line.startswith("error")]


@pytest.mark.parametrize("launcher", ["mpiexec", "torchrun"])
def test_a_full_disk_on_one_rank_ends_every_rank_with_one_line(launcher, data, tmp_path):
    prefix = [*mpiexec_prefix(2), sys.executable] if launcher == "mpiexec" else torchrun_prefix(2)
    # Rank 1's third log dump fails with ENOSPC while rank 0 goes on to its next collective.
    fault = {"enospc": "dump", "n": 3, "rank": 1}
    timeout = 60
    status, out, err, seconds = launch(prefix, tmp_path, data,
                                       ["--batch_size", 2, "--save_interval", 2], fault,
                                       GD_DIST_TIMEOUT=timeout)
    assert status != 0
    assert seconds < timeout, f"the job took {seconds:.0f} s to end"
    lines = error_lines(err)
    failure = f"error (rank 1): {tmp_path / 'log-rank001.txt'}: No space left on device"
    assert failure in lines, err[-3000:]
    # At most one more line: rank 0's, saying it lost its peer (torchrun), and no tracebacks of
    # ours ("[rankN]:" lines are torch's rank-prefixed ones).
    others = [line for line in lines if line != failure]
    assert len(others) <= 1 and all("lost contact with the other ranks" in x for x in others)
    assert not [line for line in err.splitlines() if line.startswith("[rank")], err[-3000:]
    if launcher == "torchrun":
        # torchrun prints its own traceback and failure table; the table shows our line as the
        # root cause's "traceback".
        assert err.count("Traceback (most recent call last)") == 1
        root = err[err.index("Root Cause"):]
        assert f"traceback : {failure}" in root, err[-3000:]
    else:
        assert "Traceback" not in err
    # The checkpoint written before the failure is complete.
    assert_complete_checkpoint(tmp_path, 2)


def test_an_out_of_memory_error_on_one_rank_ends_the_job_promptly(data, tmp_path):
    # Without the abort, rank 0 would wait in its next collective for the whole GD_DIST_TIMEOUT.
    timeout = 120
    fault = {"raise": "oom", "n": 3, "rank": 1}
    status, out, err, seconds = launch([*mpiexec_prefix(2), sys.executable], tmp_path, data,
                                       ["--batch_size", 2], fault, GD_DIST_TIMEOUT=timeout,
                                       timeout=2 * timeout + 60)
    assert status == 2, err[-3000:]
    assert seconds < timeout / 2, f"the job took {seconds:.0f} s to end"
    lines = error_lines(err)
    assert len(lines) == 1 and lines[0].startswith(
        "error (rank 1): out of memory (CUDA out of memory"), err[-3000:]
    assert "--batch_size" in lines[0] and "--microbatch" in lines[0]
    assert "Traceback" not in err


# ----------------------------------------------------------------------------- point 6


def test_a_second_job_on_a_live_jobs_folder_is_refused_and_a_dead_job_leaves_no_lock(
        data, tmp_path):
    first = subprocess.Popen(
        [sys.executable, TRAIN, "--data_dir", data, *MODEL, "--batch_size", "4",
         "--save_interval", "1000", "--log_dir", str(tmp_path)],
        env=child_env(cpu=True), start_new_session=True, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True)
    try:
        progress = tmp_path / "progress.csv"
        deadline = time.monotonic() + TIMEOUT
        while not (progress.exists() and len(progress.read_text().splitlines()) > 2):
            assert first.poll() is None, first.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the first job did not start training"
            time.sleep(0.1)
        log_before = (tmp_path / "log.txt").read_text()
        status, out, err, _ = launch(one_process(), tmp_path, data,
                                     ["--batch_size", 4, "--max_steps", 1])
        assert status == 2
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        assert lines[0].startswith(
            f"error: the log folder {tmp_path} is in use by another training job "
            f"(pid {first.pid} on ")
        assert "pass another --log_dir" in lines[0]
        assert first.poll() is None  # the first job runs on, its log untouched
        assert (tmp_path / "log.txt").read_text().startswith(log_before)
        assert saved_steps(tmp_path) == []
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # dies without any clean-up
        first.wait()
    status, out, err, _ = launch(one_process(), tmp_path, data,
                                 ["--batch_size", 4, "--max_steps", 1])
    assert status == 0, err[-3000:]
    assert saved_steps(tmp_path) == [1]
