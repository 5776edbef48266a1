"""dist_util under mpiexec, torchrun and a plain process without mpi4py."""

import json
import os
import subprocess
import sys
import textwrap
import types

import pytest
import torch

from _launch import child_env, mpiexec_prefix, torchrun_prefix
from guided_diffusion import dist_util

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
    if os.environ.get("INIT_GROUP_BACKEND") and not dist.is_initialized():
        # setup_dist leaves a job of one rank alone; the GPU tests ask for a one-rank NCCL group.
        dist.init_process_group(backend=os.environ["INIT_GROUP_BACKEND"], init_method="env://")
        atexit.register(dist.destroy_process_group)
    device = dist_util.dev()
    rank, world = dist_util.get_rank(), dist_util.get_world_size()
    out = {
        "rank": rank,
        "world": world,
        "main": dist_util.is_main_process(),
        "backend": dist.get_backend() if dist.is_initialized() else None,
        "device": str(dist_util.dev()),
        "mpi4py_loaded": sys.modules.get("mpi4py") is not None and "mpi4py.MPI" in sys.modules,
    }
    out["gathered"] = [
        t.tolist() for t in dist_util.all_gather_tensors(torch.full((2,), rank + 10.0, device=device))
    ]
    out["gathered_uneven"] = [
        t.tolist()
        for t in dist_util.all_gather_tensors(torch.arange(rank + 1.0, device=device).reshape(1, -1))
    ]

    torch.manual_seed(100 + rank)
    model = torch.nn.Linear(4, 1).to(device)  # initialised on CPU: the same weights on any device
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
        loss = ddp(x.to(device)).pow(2).mean()
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


def run(cmd, tmp_path, cpu=True, **env):
    """Run WORKER under cmd; the multi-rank tests here are about CPU ranks (gloo), hence cpu."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    proc = subprocess.run(
        cmd + [str(script), str(tmp_path)],
        env=child_env(cpu=cpu, **env),
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


def check_two_ranks(out, backend="gloo", devices=("cpu", "cpu"), atol=1e-6):
    assert [o["rank"] for o in out] == [0, 1]
    assert all(o["world"] == 2 for o in out)
    assert [o["main"] for o in out] == [True, False]
    assert all(o["backend"] == backend for o in out)
    assert [o["device"] for o in out] == list(devices)
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
    assert torch.allclose(torch.tensor(out[0]["final"]), torch.tensor(want), atol=atol)


def test_mpiexec_two_ranks(tmp_path):
    proc = run([*mpiexec_prefix(2), sys.executable], tmp_path)
    out = results(tmp_path, 2)
    check_two_ranks(out)
    check_group_destroyed_at_exit(tmp_path, 2)
    assert all(o["mpi4py_loaded"] for o in out)
    assert proc.stdout.count("printed once") == 1


def test_torchrun_two_ranks(tmp_path):
    proc = run(torchrun_prefix(2), tmp_path)
    out = results(tmp_path, 2)
    check_two_ranks(out)
    check_group_destroyed_at_exit(tmp_path, 2)
    # torchrun provides everything; MPI must not be initialised behind its back.
    assert not any(o["mpi4py_loaded"] for o in out)
    assert proc.stdout.count("printed once") == 1


def test_single_process_without_mpi4py(tmp_path):
    # Device-neutral: one process trains on dev(), whatever that is here.
    proc = run([sys.executable], tmp_path, cpu=False, BLOCK_MPI4PY="1")
    (out,) = results(tmp_path, 1)
    assert (out["rank"], out["world"], out["main"]) == (0, 1, True)
    assert out["backend"] is None
    assert out["wrapped"] == "Linear"
    assert out["gathered"] == [[10.0, 10.0]]
    assert out["init"] == out["init_before_sync"]
    want = expected_final_params(out["init"], [out["batches"]])
    assert torch.allclose(torch.tensor(out["final"]), torch.tensor(want), atol=1e-5)
    assert "printed once" in proc.stdout


@pytest.fixture
def no_launcher(monkeypatch):
    for name in list(os.environ):
        if name.startswith(("PMI_", "PMIX_", "OMPI_", "MV2_", "TORCHELASTIC_")) or name in (
            "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
        ):
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
    # Device-neutral: a lone process computes on the first visible GPU, else on the CPU.
    if torch.cuda.is_available():
        assert dist_util.dev() == torch.device("cuda", 0) and torch.cuda.current_device() == 0
    else:
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


# ----------------------------------------------------------------------------- ranks and GPUs
# NCCL cannot run two ranks of a job on one GPU. These tests pretend GPUs are visible (no CUDA call
# is made) and check that setup_dist stops with one line before any process group starts.


@pytest.fixture
def fake_gpus(monkeypatch, no_launcher):
    """Pretend `count` GPUs are visible; returns a setter for the count and the UUIDs."""
    state = {"count": 1, "uuid": "GPU-0"}
    monkeypatch.setattr(dist_util, "_local_rank", dist_util._local_rank)  # restored afterwards
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: state["count"])
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: state.setdefault("set", device))
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(uuid=state["uuid"])
    )
    started = []
    monkeypatch.setattr(dist_util, "_init_process_group", lambda **kw: started.append(kw))
    state["started"] = started
    # setup_dist writes the rendezvous variables on the MPI path; put them back afterwards.
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                 "LOCAL_WORLD_SIZE"):
        monkeypatch.setenv(name, "unset")
        monkeypatch.delenv(name)
    return state


def torchrun_env(monkeypatch, local_rank, local_size, torchrun=True):
    monkeypatch.setenv("RANK", str(local_rank))
    monkeypatch.setenv("WORLD_SIZE", str(local_size))
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_size))
    if torchrun:
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")


def test_torchrun_workers_sharing_a_gpu_is_a_one_line_error(monkeypatch, fake_gpus):
    torchrun_env(monkeypatch, local_rank=1, local_size=2)
    with pytest.raises(ValueError) as info:
        dist_util.setup_dist()
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("2 ranks on this node would share 1 GPU")
    assert "--nproc_per_node 1" in message and "CUDA_VISIBLE_DEVICES=" in message
    assert fake_gpus["started"] == []


def test_torchrun_workers_with_a_gpu_each_start(monkeypatch, fake_gpus):
    fake_gpus["count"] = 2
    torchrun_env(monkeypatch, local_rank=1, local_size=2)
    dist_util.setup_dist()
    assert fake_gpus["set"] == torch.device("cuda", 1)
    assert len(fake_gpus["started"]) == 1


def test_cluster_ranks_with_their_own_visible_gpu_start(monkeypatch, fake_gpus):
    # A cluster script (not torchrun) may give every rank its own CUDA_VISIBLE_DEVICES: each sees
    # one GPU, and local rank 1 % 1 = 0 is its own GPU, not rank 0's.
    torchrun_env(monkeypatch, local_rank=1, local_size=2, torchrun=False)
    dist_util.setup_dist()
    assert fake_gpus["set"] == torch.device("cuda", 0)
    assert len(fake_gpus["started"]) == 1


class FakeNodeComm:
    """COMM_WORLD of a one-node, two-rank MPI job seen from rank 0; the peer's GPU is given."""

    rank, size = 0, 2

    def __init__(self, peer_gpu):
        self.peer_gpu = peer_gpu

    def Split_type(self, kind):
        return self

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return self.size

    def allgather(self, value):
        return [value, self.peer_gpu]

    def bcast(self, value, root=0):
        return value

    def Free(self):
        pass


@pytest.mark.parametrize("peer_gpu, shared", [("GPU-0", True), ("GPU-1", False), (None, False)])
def test_mpi_ranks_compare_their_physical_gpus(monkeypatch, fake_gpus, peer_gpu, shared):
    # Both ranks see one GPU; whether it is the same one (plain mpiexec) or not (a per-rank
    # CUDA_VISIBLE_DEVICES or cgroup) is told by the GPUs' UUIDs.
    comm = FakeNodeComm(peer_gpu)
    fake_mpi = types.SimpleNamespace(COMM_WORLD=comm, COMM_TYPE_SHARED=object())
    monkeypatch.setattr(dist_util, "_import_mpi", lambda: fake_mpi)
    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.setenv("PMI_RANK", "0")
    if shared:
        with pytest.raises(ValueError, match="2 ranks on this node would share 1 GPU"):
            dist_util.setup_dist()
        assert fake_gpus["started"] == []
    else:
        dist_util.setup_dist()
        assert fake_gpus["started"] == [{"mpi_comm": comm}]
        assert os.environ["WORLD_SIZE"] == "2" and os.environ["LOCAL_RANK"] == "0"


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


# ----------------------------------------------------------------------------- launcher vs MPI


class FakeWorld(FakeNodeComm):
    """COMM_WORLD of an MPI library that sees this process alone."""

    rank, size = 0, 1

    def __init__(self):
        super().__init__(peer_gpu=None)

    def allgather(self, value):
        return [value]


def fake_mpi(version):
    return types.SimpleNamespace(
        COMM_WORLD=FakeWorld(), COMM_TYPE_SHARED=object(), Get_library_version=lambda: version
    )


def test_mpich_launcher_with_open_mpi_library_is_refused(monkeypatch, fake_gpus):
    # Hydra (MPICH's mpiexec) started 4 processes; mpi4py was built against Open MPI, which
    # sees a singleton in each of them.
    monkeypatch.setattr(dist_util, "_import_mpi",
                        lambda: fake_mpi("Open MPI v4.1.4, package: Debian OpenMPI\x00"))
    monkeypatch.setenv("PMI_SIZE", "4")
    monkeypatch.setenv("PMI_RANK", "3")
    with pytest.raises(dist_util.LauncherMismatchError) as info:
        dist_util.setup_dist()
    message = str(info.value)
    assert "\n" not in message and isinstance(info.value, ValueError)
    assert "started as rank 3 of 4 by the launcher of MPICH" in message and "PMI_SIZE=4" in message
    assert "mpi4py loads Open MPI v4.1.4, package: Debian OpenMPI, which sees 1 process" in message
    assert "start the job with the mpiexec of Open MPI" in message
    assert "torchrun --nproc_per_node 4" in message
    assert fake_gpus["started"] == []


def test_matching_or_single_process_launches_are_not_refused(monkeypatch, fake_gpus):
    monkeypatch.setattr(dist_util, "_import_mpi", lambda: fake_mpi("MPICH Version: 5.0.2"))
    monkeypatch.setenv("PMI_SIZE", "1")  # mpiexec -n 1: one process, nothing to refuse
    monkeypatch.setenv("PMI_RANK", "0")
    dist_util.setup_dist()
    assert fake_gpus["started"] == []


@pytest.mark.parametrize("value, seconds", [(None, 600.0), ("45", 45.0), ("2.5", 2.5)])
def test_dist_timeout_from_the_environment(monkeypatch, value, seconds):
    if value is None:
        monkeypatch.delenv("GD_DIST_TIMEOUT", raising=False)
    else:
        monkeypatch.setenv("GD_DIST_TIMEOUT", value)
    assert dist_util.dist_timeout().total_seconds() == seconds


@pytest.mark.parametrize("value", ["0", "-3", "soon"])
def test_bad_dist_timeout_is_one_line(monkeypatch, value):
    monkeypatch.setenv("GD_DIST_TIMEOUT", value)
    with pytest.raises(ValueError, match="GD_DIST_TIMEOUT=.*positive number of seconds"):
        dist_util.dist_timeout()


def test_single_process_collectives_helpers():
    assert dist_util.gather_objects({"a": 1}) == [{"a": 1}]
    assert dist_util.max_over_ranks(7) == 7


HOST_COLLECTIVES = textwrap.dedent(
    """
    import json, sys
    import torch.distributed as dist
    from guided_diffusion import dist_util
    dist_util.setup_dist()
    # With NCCL these collectives run over a separate gloo group; pretend the default group is
    # NCCL so that this CPU job takes that path.
    real = dist.get_backend
    dist.get_backend = lambda *a: "nccl"
    rank = dist_util.get_rank()
    out = {"max": dist_util.max_over_ranks(10 - rank), "gathered": dist_util.gather_objects([rank]),
           "own_group": dist_util._host_group is not None}
    dist.get_backend = real
    with open(sys.argv[1] + "/host%d.json" % rank, "w") as f:
        json.dump(out, f)
    """
)


def test_host_collectives_over_their_own_gloo_group(tmp_path):
    script = tmp_path / "host_collectives.py"
    script.write_text(HOST_COLLECTIVES)
    proc = subprocess.run([*torchrun_prefix(2), str(script), str(tmp_path)],
                          env=child_env(cpu=True), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = [json.loads((tmp_path / f"host{r}.json").read_text()) for r in (0, 1)]
    assert out[0] == {"max": 10, "gathered": [[0], [1]], "own_group": True}
    assert out[1] == {"max": 10, "gathered": None, "own_group": True}
