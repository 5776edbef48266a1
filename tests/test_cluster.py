"""Training under real launchers when the cluster misbehaves (two CPU ranks, tiny model):

- a signal to one rank (SLURM's --signal, a scheduler's SIGTERM) stops every rank at the same step
  with a checkpoint and exit status 75, and --resume_checkpoint auto then continues exactly as the
  uninterrupted run (mpiexec: SIGUSR1 to rank 1 alone; torchrun: SIGTERM to the launcher);
- a rank killed with SIGKILL ends the job in bounded time with a non-zero status, under mpiexec and
  under torchrun, leaving no process behind and no unreadable checkpoint;
- two torchrun launches with --nnodes 2 on localhost train as one job;
- an mpiexec of another MPI than mpi4py's, and srun without --mpi, are refused in one line.
"""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from guided_diffusion.data.digits import write_digits
from guided_diffusion.runtime import checkpoints

from _launch import _mpi4py_library, child_env, find_mpiexec, mpiexec_prefix, torchrun_prefix

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(REPO, "scripts", "image_train.py")
MODEL = (
    "--image_size 16 --num_channels 32 --num_res_blocks 1 --channel_mult 1,2 "
    "--attention_resolutions 8 --num_head_channels 16 --diffusion_steps 50 --dropout 0.1 "
    "--batch_size 2 --log_interval 1"
).split()
TOTAL = 10  # steps of the reference run (--lr_anneal_steps, so the learning rate is the same)
TIMEOUT = 240


def two_ranks(launcher):
    if launcher == "mpiexec":
        return [*mpiexec_prefix(2), sys.executable]
    return torchrun_prefix(2)


def popen(command, output, **env):
    """Start a command in its own session, its output into files (a full pipe would block it)."""
    output.mkdir(parents=True, exist_ok=True)
    count = len(list(output.glob("stdout*")))
    paths = (output / f"stdout{count}", output / f"stderr{count}")
    with open(paths[0], "w") as stdout, open(paths[1], "w") as stderr:
        proc = subprocess.Popen(command, env=child_env(cpu=True, **env), start_new_session=True,
                                stdout=stdout, stderr=stderr)
    proc.output = paths
    return proc


def start(launcher, args, output):
    """Start image_train on two CPU ranks (collectives give up after 60 s)."""
    return popen([*two_ranks(launcher), TRAIN, *map(str, args)], output, GD_DIST_TIMEOUT=60)


def finish(proc, timeout=TIMEOUT):
    """Wait for the job; returns (status, stdout, stderr)."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        err = proc.output[1].read_text()[-3000:]
        pytest.fail(f"the job did not end within {timeout} s:\n{err}")
    return proc.returncode, proc.output[0].read_text(), proc.output[1].read_text()


def wait_for_steps(log_dir, steps, proc, timeout=TIMEOUT):
    """Wait until progress.csv shows `steps` finished steps (one row per step)."""
    deadline = time.monotonic() + timeout
    path = os.path.join(log_dir, "progress.csv")
    while time.monotonic() < deadline:
        if os.path.exists(path) and len(open(path).read().splitlines()) > steps:
            return
        if proc.poll() is not None:
            pytest.fail(f"the job ended early:\n{proc.output[1].read_text()[-3000:]}")
        time.sleep(0.02)
    pytest.fail("training did not start in time")


def _processes():
    """{pid: parent pid} of every process."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    return parents


def _environ(pid):
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return dict(
                item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item
            )
    except OSError:
        return {}


RANK_VARIABLES = (b"PMI_RANK", b"OMPI_COMM_WORLD_RANK", b"RANK")


def rank_pids(root):
    """{rank: pid} of the training processes started under `root` (loader workers excluded)."""
    parents = _processes()
    children = {}
    for pid, parent in parents.items():
        children.setdefault(parent, []).append(pid)
    found, todo = {}, [(root, None)]
    while todo:
        pid, parent_rank = todo.pop()
        env = _environ(pid)
        rank = next((env[v] for v in RANK_VARIABLES if v in env), None)
        if rank is not None and parent_rank is None and b"image_train" in open(
            f"/proc/{pid}/cmdline", "rb"
        ).read():
            found[int(rank)] = pid
            parent_rank = rank
        todo.extend((child, parent_rank) for child in children.get(pid, []))
    return found


def descendants(root):
    """The pids of every process below root."""
    parents = _processes()
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        for child, parent in parents.items():
            if parent == pid and child not in found:
                found.add(child)
                todo.append(child)
    return found


def running(pid):
    """True while pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def load_all(path):
    return torch.load(path, weights_only=True, map_location="cpu")


def assert_same_model(a, b):
    sa, sb = load_all(a), load_all(b)
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa), f"{a} and {b} differ"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_digits(str(tmp_path_factory.mktemp("cluster") / "digits"), image_size=16, limit=12)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The uninterrupted run on two ranks, saving every step."""
    out = tmp_path_factory.mktemp("reference")
    launcher = "mpiexec" if find_mpiexec()[0] else "torchrun"
    proc = start(launcher, ["--data_dir", data, *MODEL, "--lr_anneal_steps", TOTAL,
                            "--save_interval", 1, "--log_dir", out], out / "output")
    status, _, err = finish(proc)
    assert status == 0, err[-3000:]
    return out


def check_preempted_and_resume(launcher, data, reference, log_dir, status, out, sig_name):
    """The job stopped at a step s < TOTAL with a checkpoint; resuming gives the reference."""
    saved = checkpoints.find_latest_checkpoint(log_dir, "model")
    assert saved is not None, "no checkpoint was saved on preemption"
    step = checkpoints.parse_step(saved, "model")
    assert 1 <= step < TOTAL
    for rank_log in ("log.txt", "log-rank001.txt"):  # both ranks stopped at the same step
        text = (log_dir / rank_log).read_text()
        stopped = f"preempted by {sig_name}: stopped after step {step} with a complete checkpoint"
        assert stopped in text
    assert f"{log_dir / f'model{step:06d}.pt'}; continue with --resume_checkpoint auto" in out
    proc = start(launcher, ["--data_dir", data, *MODEL, "--lr_anneal_steps", TOTAL,
                            "--save_interval", 100, "--log_dir", log_dir,
                            "--resume_checkpoint", "auto"], log_dir / "output")
    status, _, err = finish(proc)
    assert status == 0, err[-3000:]
    for name in (f"model{TOTAL:06d}.pt", f"ema_0.9999_{TOTAL:06d}.pt"):
        assert_same_model(reference / name, log_dir / name)


def test_mpiexec_signal_to_one_rank_stops_all_and_resumes_exactly(data, reference, tmp_path):
    mpiexec_prefix(2)  # skips without a matching mpiexec
    proc = start("mpiexec", ["--data_dir", data, *MODEL, "--lr_anneal_steps", TOTAL,
                             "--save_interval", 100, "--log_dir", tmp_path], tmp_path / "output")
    wait_for_steps(tmp_path, 2, proc)
    ranks = rank_pids(proc.pid)
    assert sorted(ranks) == [0, 1], ranks
    os.kill(ranks[1], signal.SIGUSR1)  # rank 1 alone: the ranks must agree among themselves
    status, out, err = finish(proc)
    assert status == 75, err[-3000:]
    check_preempted_and_resume("mpiexec", data, reference, tmp_path, status, out, "SIGUSR1")


def test_torchrun_sigterm_stops_and_resumes_exactly(data, reference, tmp_path):
    proc = start("torchrun", ["--data_dir", data, *MODEL, "--lr_anneal_steps", TOTAL,
                              "--save_interval", 100, "--log_dir", tmp_path], tmp_path / "output")
    wait_for_steps(tmp_path, 2, proc)
    os.kill(proc.pid, signal.SIGTERM)  # torchrun forwards it to its workers
    status, out, err = finish(proc)
    assert status != 0  # torchrun itself reports the signal as a failure
    assert "exitcode: 75" in err or "exit status 75" in out, err[-3000:]
    check_preempted_and_resume("torchrun", data, reference, tmp_path, status, out, "SIGTERM")


@pytest.mark.parametrize("launcher", ["mpiexec", "torchrun"])
def test_sigkill_of_one_rank_ends_the_job(launcher, data, tmp_path):
    # The step cap only bounds the job should this test be interrupted before its kill (a
    # checkpoint every 2 steps would otherwise fill the disk); the kill comes at step 3.
    proc = start(launcher, ["--data_dir", data, *MODEL, "--save_interval", 2, "--max_steps", 200,
                            "--log_dir", tmp_path], tmp_path / "output")
    wait_for_steps(tmp_path, 3, proc)
    ranks = rank_pids(proc.pid)
    assert sorted(ranks) == [0, 1], ranks
    started = descendants(proc.pid)
    killed_at = time.monotonic()
    os.kill(ranks[1], signal.SIGKILL)
    status, _, err = finish(proc, timeout=120)
    elapsed = time.monotonic() - killed_at
    assert status != 0, err[-3000:]
    assert elapsed < 90, f"the job took {elapsed:.0f} s to end"
    # No rank, loader worker or launcher helper outlives the job.
    deadline = time.monotonic() + 15
    while any(running(pid) for pid in started) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in started if running(pid)]
    # Whatever was written is complete: every checkpoint file loads, the newest one too.
    names = [n for n in os.listdir(tmp_path) if n.endswith(".pt")]
    assert names
    for name in names:
        checkpoints.load_checkpoint(tmp_path / name)
    latest = checkpoints.find_latest_checkpoint(tmp_path, "model")
    step = checkpoints.parse_step(latest, "model")
    for name in (f"opt{step:06d}.pt", f"state{step:06d}.pt", f"ema_0.9999_{step:06d}.pt"):
        assert name in names


def test_two_torchrun_launches_on_localhost_train_as_one_job(data, reference, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = ["--data_dir", data, *MODEL, "--lr_anneal_steps", TOTAL, "--max_steps", 3,
            "--log_dir", tmp_path]
    nodes = [
        popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank",
               str(node), "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port",
               str(port), TRAIN, *map(str, args)], tmp_path / f"node{node}", GD_DIST_TIMEOUT=60)
        for node in (0, 1)
    ]
    results = [finish(node) for node in nodes]
    for status, _, err in results:
        assert status == 0, err[-3000:]
    # One job of two ranks: node 1's rank logged as rank 1, and the weights equal those of the
    # two-rank reference run after the same steps (independent single-rank runs would not).
    assert (tmp_path / "log-rank001.txt").exists()
    assert_same_model(reference / "model000003.pt", tmp_path / "model000003.pt")


# ----------------------------------------------------------------------------- MPI mismatch


def setup_dist_in_child(env):
    """dist_util.setup_dist() run as a script runs it, in a CPU child with these launcher variables."""
    code = (
        "from guided_diffusion import dist_util\n"
        "from guided_diffusion.cli.main import run_main\n"
        "run_main(lambda argv: dist_util.setup_dist())\n"
    )
    return subprocess.run([sys.executable, "-c", code], env=child_env(cpu=True, **env),
                          capture_output=True, text=True, timeout=120)


def refusal_line(proc):
    """The one stderr line of a child refused with exit status 2."""
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_an_mpiexec_of_another_mpi_is_refused_in_one_line():
    family, library = _mpi4py_library()
    if family is None:
        pytest.skip(library)
    # What the launcher of the *other* MPI would set in rank 2 of a job of 4.
    if family == "mpich":
        env, launcher = {"OMPI_COMM_WORLD_SIZE": 4, "OMPI_COMM_WORLD_RANK": 2}, "Open MPI"
    else:
        env, launcher = {"PMI_SIZE": 4, "PMI_RANK": 2}, "MPICH"
    line = refusal_line(setup_dist_in_child(env))
    assert line.startswith("error: launcher/MPI mismatch: this process was started as rank 2 of 4")
    assert f"launcher of {launcher}" in line
    assert f"mpi4py loads {library.split()[0]}" in line and "sees 1 process" in line
    assert "mpiexec of" in line and "torchrun --nproc_per_node 4" in line


def test_srun_without_mpi_is_refused_in_one_line():
    # What srun without --mpi gives task 1 of a 2-task step: SLURM's variables, no rank from MPI.
    env = {"SLURM_STEP_NUM_TASKS": 2, "SLURM_PROCID": 1, "SLURM_NTASKS": 2}
    line = refusal_line(setup_dist_in_child(env))
    assert line.startswith(
        "error: launcher/MPI mismatch: SLURM started this job step with 2 tasks "
        "(SLURM_STEP_NUM_TASKS=2; this is task 1)")
    assert "srun --mpi=pmi2" in line and "torchrun" in line
    # A step of one task is fine; two tasks that each run a one-process torchrun are not.
    for env, status in (({"SLURM_STEP_NUM_TASKS": 1, "SLURM_PROCID": 0}, 0),
                        ({"SLURM_STEP_NUM_TASKS": 2, "SLURM_PROCID": 0, "RANK": 0,
                          "WORLD_SIZE": 1}, 2)):
        proc = setup_dist_in_child(env)
        assert proc.returncode == status, proc.stderr
