"""dist_util under mpiexec, torchrun and a plain process without mpi4py."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from guided_diffusion import dist_util

REPO_ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 60

# Each rank seeds differently on purpose: sync_params must overwrite rank 1's initial weights, and
# the data of the two ranks differ, so only real gradient averaging keeps the weights identical.
WORKER = textwrap.dedent(
    """
    import json, os, sys
    if os.environ.get("BLOCK_MPI4PY"):
        sys.modules["mpi4py"] = None  # any "import mpi4py" now raises ImportError
    import atexit
    import torch
    import torch.distributed as dist
    from guided_diffusion import dist_util

    def record_group_at_exit():
        # Registered before setup_dist, so it runs after dist_util's own exit hook.
        name = "exit%s.json" % os.environ.get("RANK", "0")
        with open(os.path.join(sys.argv[1], name), "w") as f:
            json.dump({"initialized_at_exit": dist.is_initialized()}, f)

    atexit.register(record_group_at_exit)
    dist_util.setup_dist()
    dist_util.setup_dist()  # a second call must be harmless
    rank, world = dist_util.get_rank(), dist_util.get_world_size()
    out = {
        "rank": rank,
        "world": world,
        "main": dist_util.is_main_process(),
        "backend": dist.get_backend() if dist.is_initialized() else None,
        "device": str(dist_util.dev()),
        "mpi4py_loaded": sys.modules.get("mpi4py") is not None and "mpi4py.MPI" in sys.modules,
    }
    out["gathered"] = [t.tolist() for t in dist_util.all_gather_tensors(torch.full((2,), rank + 10.0))]
    out["gathered_uneven"] = [
        t.tolist() for t in dist_util.all_gather_tensors(torch.arange(rank + 1.0).reshape(1, -1))
    ]

    torch.manual_seed(100 + rank)
    model = torch.nn.Linear(4, 1)
    out["init_before_sync"] = torch.cat([p.detach().flatten() for p in model.parameters()]).tolist()
    dist_util.sync_params(model.parameters())
    out["init"] = torch.cat([p.detach().flatten() for p in model.parameters()]).tolist()
    ddp = dist_util.wrap_ddp(model)
    out["wrapped"] = type(ddp).__name__
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out["batches"] = []
    for step in range(3):
        x = torch.randn(8, 4)
        out["batches"].append(x.tolist())
        loss = ddp(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    out["final"] = torch.cat([p.detach().flatten() for p in model.parameters()]).tolist()
    dist_util.barrier()
    dist_util.print0("printed once")
    with open(os.path.join(sys.argv[1], "rank%d.json" % rank), "w") as f:
        json.dump(out, f)
    """
)


def child_env(**extra):
    env = dict(os.environ)
    # A clean slate: no launcher variables from whatever started pytest.
    for name in list(env):
        if name.startswith(("PMI_", "PMIX_", "OMPI_", "MPI_LOCAL", "MV2_")) or name in (
            "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
        ):
            del env[name]
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def run(cmd, tmp_path, **env):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    proc = subprocess.run(
        cmd + [str(script), str(tmp_path)],
        env=child_env(**env),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def results(tmp_path, world):
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]


def expected_final_params(init, batches_per_rank, lr=0.1):
    """Plain SGD on the loss averaged over all ranks' batches: what DDP must reproduce."""
    weight = torch.tensor(init[:4]).reshape(1, 4).requires_grad_()
    bias = torch.tensor(init[4:]).requires_grad_()
    for step in range(len(batches_per_rank[0])):
        losses = [
            (torch.tensor(b[step]) @ weight.t() + bias).pow(2).mean() for b in batches_per_rank
        ]
        loss = sum(losses) / len(losses)
        gw, gb = torch.autograd.grad(loss, [weight, bias])
        with torch.no_grad():
            weight -= lr * gw
            bias -= lr * gb
    return torch.cat([weight.detach().flatten(), bias.detach()]).tolist()


def check_group_destroyed_at_exit(tmp_path, world):
    # A process group left alive into interpreter shutdown can abort a successful run
    # ("terminate called without an active exception"); dist_util tears it down at exit.
    for r in range(world):
        assert json.loads((tmp_path / f"exit{r}.json").read_text()) == {"initialized_at_exit": False}


def check_two_ranks(out):
    assert [o["rank"] for o in out] == [0, 1]
    assert all(o["world"] == 2 for o in out)
    assert [o["main"] for o in out] == [True, False]
    assert all(o["backend"] == "gloo" for o in out)
    assert all(o["device"] == "cpu" for o in out)
    for o in out:
        assert o["gathered"] == [[10.0, 10.0], [11.0, 11.0]]
        assert o["gathered_uneven"] == [[[0.0]], [[0.0, 1.0]]]
        assert o["wrapped"] == "DistributedDataParallel"
    # The ranks started from different weights; sync_params copied rank 0's to rank 1.
    assert out[0]["init_before_sync"] != out[1]["init_before_sync"]
    assert out[1]["init"] == out[0]["init_before_sync"]
    # Different data per rank, identical weights after training, equal to averaged-gradient SGD.
    assert out[0]["batches"] != out[1]["batches"]
    assert out[0]["final"] == out[1]["final"]
    want = expected_final_params(out[0]["init"], [o["batches"] for o in out])
    assert torch.allclose(torch.tensor(out[0]["final"]), torch.tensor(want), atol=1e-6)


@pytest.mark.skipif(shutil.which("mpiexec") is None, reason="mpiexec not on PATH")
def test_mpiexec_two_ranks(tmp_path):
    proc = run(["mpiexec", "-n", "2", sys.executable], tmp_path)
    out = results(tmp_path, 2)
    check_two_ranks(out)
    check_group_destroyed_at_exit(tmp_path, 2)
    assert all(o["mpi4py_loaded"] for o in out)
    assert proc.stdout.count("printed once") == 1


def test_torchrun_two_ranks(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = run(cmd, tmp_path)
    out = results(tmp_path, 2)
    check_two_ranks(out)
    check_group_destroyed_at_exit(tmp_path, 2)
    # torchrun provides everything; MPI must not be initialised behind its back.
    assert not any(o["mpi4py_loaded"] for o in out)
    assert proc.stdout.count("printed once") == 1


def test_single_process_without_mpi4py(tmp_path):
    proc = run([sys.executable], tmp_path, BLOCK_MPI4PY="1")
    (out,) = results(tmp_path, 1)
    assert (out["rank"], out["world"], out["main"]) == (0, 1, True)
    assert out["backend"] is None
    assert out["wrapped"] == "Linear"
    assert out["gathered"] == [[10.0, 10.0]]
    assert out["init"] == out["init_before_sync"]
    want = expected_final_params(out["init"], [out["batches"]])
    assert torch.allclose(torch.tensor(out["final"]), torch.tensor(want), atol=1e-6)
    assert "printed once" in proc.stdout


@pytest.fixture
def no_launcher(monkeypatch):
    for name in list(os.environ):
        if name.startswith(("PMI_", "PMIX_", "OMPI_", "MV2_")) or name in ("RANK", "WORLD_SIZE"):
            monkeypatch.delenv(name)


def test_mpi_launch_without_mpi4py_is_a_clear_error(monkeypatch, no_launcher):
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.setenv("PMI_RANK", "0")
    with pytest.raises(RuntimeError, match="mpi4py is not installed"):
        dist_util.setup_dist()
    assert not torch.distributed.is_initialized()


def test_plain_process_helpers(no_launcher, tmp_path):
    dist_util.setup_dist()
    assert not torch.distributed.is_initialized()
    assert dist_util.get_rank() == 0 and dist_util.get_world_size() == 1
    assert dist_util.dev() == torch.device("cpu")
    t = torch.arange(3)
    (only,) = dist_util.all_gather_tensors(t)
    assert only is t
    model = torch.nn.Linear(2, 2)
    assert dist_util.wrap_ddp(model) is model
    before = [p.clone() for p in model.parameters()]
    dist_util.sync_params(model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    dist_util.barrier()


def test_load_state_dict_round_trip_and_errors(tmp_path):
    path = tmp_path / "model000001.pt"
    torch.save({"w": torch.ones(2)}, path)
    assert torch.equal(dist_util.load_state_dict(str(path), map_location="cpu")["w"], torch.ones(2))
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        dist_util.load_state_dict(str(tmp_path / "missing.pt"), map_location="cpu")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="bad.pt"):
        dist_util.load_state_dict(str(bad), map_location="cpu")
