"""
Helpers for running the same code on one process or many.

Three ways to start a job all end up in the same place, a torch.distributed process group:

- ``torchrun --nproc_per_node N script.py`` sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
  MASTER_PORT; we initialise from those variables.
- ``mpiexec -n N python script.py`` gives each process its rank through MPI; we read rank, world
  size and node-local rank from mpi4py, let rank 0 pick a free port, and then initialise
  torch.distributed from the same variables torchrun would have set.
- ``python script.py`` is a single process: nothing is initialised and every helper below falls
  back to its single-process meaning (rank 0, world size 1, no-op collectives). mpi4py does not
  have to be installed for this.

The backend is gloo on CPU and NCCL on GPU. The GPU of a process is its node-local rank modulo the
number of visible devices, so a CUDA_VISIBLE_DEVICES set by the user or the cluster is respected.
NCCL cannot run two ranks of a job on one GPU: when two ranks of a node would use the same GPU (more
ranks than visible GPUs, so the modulo wraps around), setup_dist stops with a one-line ValueError
saying what to change, instead of NCCL failing in its first collective. Hiding the GPUs
(CUDA_VISIBLE_DEVICES=) runs any number of ranks on CPU with gloo.

An mpiexec of one MPI library running a program whose mpi4py loads another starts N singletons
(each rank 0 of 1) instead of one job of N ranks; setup_dist sees the launcher's variables disagree
with MPI's size and stops with a one-line LauncherMismatchError naming both libraries. So does
`srun` without `--mpi` (SLURM says N tasks, nothing gives the process a rank).

Collectives and the rendezvous give up after GD_DIST_TIMEOUT seconds (default 600), so a rank that
hangs or never arrives ends the job instead of blocking it forever; a rank that fails ends the
whole job at once (abort_job, called by cli.main.run_main).
"""

import atexit
import datetime
import os
import re
import socket
import sys
import time
import warnings

import torch
import torch.distributed as dist

from .errors import LauncherMismatchError
from .runtime.checkpoints import load_checkpoint

# Environment variables that MPI launchers set in every process they start (MPICH/Hydra and Intel
# MPI: PMI_*, Open MPI: OMPI_*, PMIx launchers such as srun --mpi=pmix: PMIX_*, MVAPICH: MV2_*).
# We only import mpi4py when one of these says we were started by an MPI launcher, so that a plain
# single process never calls MPI_Init.
_MPI_LAUNCHER_VARS = (
    "PMI_SIZE",
    "PMI_RANK",
    "OMPI_COMM_WORLD_SIZE",
    "PMIX_RANK",
    "MV2_COMM_WORLD_SIZE",
)
_MPI_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
_MPI_RANK_VARS = {
    "PMI_SIZE": "PMI_RANK",
    "OMPI_COMM_WORLD_SIZE": "OMPI_COMM_WORLD_RANK",
    "MV2_COMM_WORLD_SIZE": "MV2_COMM_WORLD_RANK",
}
# Which MPI's launcher sets which variables (PMI is MPICH's process-manager interface, which
# Intel MPI, MVAPICH's Hydra and srun --mpi=pmi2 also speak).
_LAUNCHER_LIBRARIES = {
    "PMI_SIZE": "MPICH (or another PMI launcher: Intel MPI, srun --mpi=pmi2)",
    "OMPI_COMM_WORLD_SIZE": "Open MPI",
    "MV2_COMM_WORLD_SIZE": "MVAPICH2",
}

# Seconds before a collective (or the rendezvous) waiting for a missing rank gives up.
DIST_TIMEOUT_ENV = "GD_DIST_TIMEOUT"
DEFAULT_DIST_TIMEOUT = 600

# Node-local rank of this process, decided by setup_dist(); it selects the GPU.
_local_rank = 0


def _import_mpi():
    """Return mpi4py's MPI module, or None when mpi4py is not installed."""
    try:
        with warnings.catch_warnings():
            # mpi4py warns (several lines) when the launcher's variables belong to another MPI;
            # setup_dist turns that situation into its own one-line error.
            warnings.filterwarnings("ignore", message="suspicious MPI execution environment")
            from mpi4py import MPI
    except ImportError:
        return None
    return MPI



def _mpi_size_var():
    """(variable, size) of the first MPI launcher size variable set, else (None, None)."""
    for name in _MPI_SIZE_VARS:
        value = os.environ.get(name)
        if value and value.isdigit():
            return name, int(value)
    return None, None


def _mpi_library_name(MPI):
    """The first line of MPI.Get_library_version(), squeezed (e.g. 'MPICH Version: 5.0.2')."""
    try:
        text = MPI.Get_library_version()
    except Exception:  # very old MPIs lack MPI_Get_library_version
        return "an unknown MPI library"
    lines = [line for line in text.replace("\x00", "").strip().splitlines() if line.strip()]
    return re.sub(r"\s+", " ", lines[0]).strip() if lines else "an unknown MPI library"


def _mpi_family(library):
    lowered = library.lower()
    for needle, family in (("open mpi", "Open MPI"), ("mvapich", "MVAPICH2"),
                           ("intel", "Intel MPI"), ("mpich", "MPICH")):
        if needle in lowered:
            return family
    return library


def _check_launcher_matches_mpi(MPI, comm):
    """
    :raises LauncherMismatchError: when the launcher's variables say N > 1 processes but MPI
        reports another size (the mpiexec belongs to another MPI than the one mpi4py loads).
    """
    name, size = _mpi_size_var()
    if size is None or size <= 1 or size == comm.size:
        return
    rank = os.environ.get(_MPI_RANK_VARS[name], "?")
    library = _mpi_library_name(MPI)
    family = _mpi_family(library)
    own = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    example = f" (e.g. {own})" if os.path.isfile(own) else ""
    raise LauncherMismatchError(
        f"launcher/MPI mismatch: this process was started as rank {rank} of {size} by the "
        f"launcher of {_LAUNCHER_LIBRARIES[name]} ({name}={size}), but mpi4py loads {library}, "
        f"which sees {comm.size} process{'es' if comm.size != 1 else ''}, so every process would "
        "train alone as rank 0 and "
        f"overwrite the others' checkpoints: start the job with the mpiexec of {family}{example}, "
        f"or with torchrun --nproc_per_node {size} (no MPI needed)"
    )


def _refuse_lone_slurm_task(world_size):
    """
    :raises LauncherMismatchError: when SLURM started this job step with several tasks but the
        process would run as a job of one (srun without --mpi, or an MPI that does not speak the
        PMI srun offers): every task would train alone as rank 0.
    """
    text = os.environ.get("SLURM_STEP_NUM_TASKS", "").strip()
    if world_size > 1 or not text.isdigit() or int(text) <= 1:
        return
    task = os.environ.get("SLURM_PROCID", "?")
    raise LauncherMismatchError(
        f"launcher/MPI mismatch: SLURM started this job step with {text} tasks "
        f"(SLURM_STEP_NUM_TASKS={text}; this is task {task}), but neither MPI nor torchrun gave "
        "this process a rank, so every task would train alone as rank 0 and overwrite the "
        "others' checkpoints: start the step with srun --mpi=pmi2 (or --mpi=pmix, whichever "
        "the MPI that mpi4py loads speaks), or run one torchrun per node "
        "(srun --ntasks-per-node=1 torchrun --nnodes ... --nproc_per_node ...)"
    )


def _launched_by_mpi():
    return any(name in os.environ for name in _MPI_LAUNCHER_VARS)


def _mpi_size_from_env():
    for name in _MPI_SIZE_VARS:
        value = os.environ.get(name)
        if value and value.isdigit():
            return int(value)
    return None


def _started_by_torchrun():
    # torchrun (torch.distributed.run) sets these in every worker; a cluster script that only sets
    # RANK/WORLD_SIZE/LOCAL_RANK may give each rank its own GPUs, so nothing is assumed there.
    return "TORCHELASTIC_RUN_ID" in os.environ and "LOCAL_WORLD_SIZE" in os.environ


def _find_free_port():
    # Binding to port 0 lets the OS hand out a port nobody is listening on right now.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _backend():
    return "nccl" if torch.cuda.is_available() else "gloo"


def _select_device(local_rank):
    global _local_rank
    _local_rank = local_rank
    if torch.cuda.is_available():
        torch.cuda.set_device(dev())


def _refuse_shared_gpus(gpus):
    """
    Stop before NCCL starts when ranks of this node would share a GPU.

    :param gpus: one identifier per rank on this node of the GPU it would use (None where
        unknown, e.g. on CPU); ranks see the same list, so they all stop together.
    :raises ValueError: when two ranks name the same GPU.
    """
    known = [g for g in gpus if g is not None]
    distinct = len(set(known))
    if distinct < len(known):
        gpus_text = "1 GPU" if distinct == 1 else f"{distinct} GPUs"
        raise ValueError(
            f"{len(known)} ranks on this node would share {gpus_text}, and NCCL needs one GPU "
            f"per rank: start at most {distinct} per node (e.g. torchrun --nproc_per_node "
            f"{distinct}), make more GPUs visible, or hide them (CUDA_VISIBLE_DEVICES=) to run on "
            "CPU with gloo"
        )


def _gpu_uuid():
    """The UUID of this process's GPU (None on CPU, or where torch does not report it)."""
    if not torch.cuda.is_available():
        return None
    uuid = getattr(torch.cuda.get_device_properties(dev()), "uuid", None)
    return None if uuid is None else str(uuid)


def setup_dist():
    """
    Set up a torch.distributed process group if this process is one of several.

    Safe to call more than once: later calls do nothing. Reads torchrun's environment variables
    when they are present, else asks MPI (when started by an MPI launcher), else leaves the
    process on its own (rank 0 of 1).

    :raises RuntimeError: when an MPI launcher started several processes but mpi4py is missing.
    :raises LauncherMismatchError: (a ValueError) when the launcher started N processes but
        mpi4py's MPI library sees another number (an mpiexec of another MPI).
    :raises ValueError: when ranks on one node would share a GPU (NCCL cannot do that), or
        GD_DIST_TIMEOUT is not a positive number.
    """
    if is_distributed():
        return

    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        # torchrun (or a cluster launcher that mimics it) already set everything up.
        world_size = int(os.environ["WORLD_SIZE"])
        _refuse_lone_slurm_task(world_size)
        _select_device(int(os.environ.get("LOCAL_RANK", "0")))
        if world_size > 1 and torch.cuda.is_available() and _started_by_torchrun():
            # torchrun gives all its workers one environment, hence the same visible GPUs.
            count = torch.cuda.device_count()
            local_size = int(os.environ["LOCAL_WORLD_SIZE"])
            _refuse_shared_gpus([r % count for r in range(local_size)])
        if world_size > 1:
            _init_process_group()
        return

    if not _launched_by_mpi():
        _refuse_lone_slurm_task(1)
        _select_device(0)
        return

    MPI = _import_mpi()
    if MPI is None:
        size = _mpi_size_from_env()
        if size is not None and size > 1:
            raise RuntimeError(
                f"started by an MPI launcher with {size} processes but mpi4py is not installed: "
                "run 'pip install mpi4py' or launch with torchrun instead"
            )
        _refuse_lone_slurm_task(1)
        _select_device(0)
        return

    comm = MPI.COMM_WORLD
    _check_launcher_matches_mpi(MPI, comm)
    _refuse_lone_slurm_task(comm.size)
    # Processes sharing memory are on the same node; their rank among themselves picks the GPU.
    node_comm = comm.Split_type(MPI.COMM_TYPE_SHARED)
    local_rank, local_size = node_comm.Get_rank(), node_comm.Get_size()
    _select_device(local_rank)
    # Ranks may see different GPUs (a cluster can give each one its own CUDA_VISIBLE_DEVICES or
    # cgroup), so compare the physical GPUs themselves.
    gpus = node_comm.allgather(_gpu_uuid())
    node_comm.Free()
    _refuse_shared_gpus(gpus)
    if comm.size == 1:
        return

    if comm.rank == 0:
        if "MASTER_ADDR" in os.environ:
            address = os.environ["MASTER_ADDR"]
        elif local_size == comm.size:
            address = "127.0.0.1"
        else:
            # Several nodes: the others must reach rank 0 through the network.
            address = socket.gethostbyname(socket.getfqdn())
        port = _find_free_port()
    else:
        address, port = None, None
    address, port = comm.bcast((address, port), root=0)

    # deviation from reference: the reference sets CUDA_VISIBLE_DEVICES to rank % GPUS_PER_NODE
    # (8 GPUs per node hard-coded); we leave the visible devices alone and pick by local rank.
    os.environ["MASTER_ADDR"] = address
    os.environ["MASTER_PORT"] = str(port)
    os.environ["RANK"] = str(comm.rank)
    os.environ["WORLD_SIZE"] = str(comm.size)
    os.environ["LOCAL_RANK"] = str(local_rank)
    os.environ["LOCAL_WORLD_SIZE"] = str(local_size)
    _init_process_group(mpi_comm=comm)


def dist_timeout():
    """
    How long a collective or the rendezvous waits for the other ranks: $GD_DIST_TIMEOUT seconds,
    default 600 (long enough for rank 0 to write a multi-GB checkpoint while the others wait).

    :return: a datetime.timedelta.
    :raises ValueError: when the variable is not a positive number.
    """
    text = os.environ.get(DIST_TIMEOUT_ENV, "").strip()
    if not text:
        return datetime.timedelta(seconds=DEFAULT_DIST_TIMEOUT)
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"{DIST_TIMEOUT_ENV}={text!r}: give a positive number of seconds")
    return datetime.timedelta(seconds=seconds)


def _init_process_group(mpi_comm=None):
    # deviation from reference: bounded collectives; a dead or stuck rank ends the job (torch's
    # own defaults wait 10 minutes for NCCL and 30 for gloo).
    dist.init_process_group(backend=_backend(), init_method="env://", timeout=dist_timeout())
    # atexit runs this before mpi4py's own finaliser, which was registered earlier.
    atexit.register(_destroy_process_group, mpi_comm)


_EXIT_BARRIER_SECONDS = 60


def _destroy_process_group(mpi_comm=None):
    """
    Tear the process group down before interpreter shutdown.

    Left to shutdown, gloo's threads can be destroyed mid-flight, and under mpiexec rank 0 hosts
    the rendezvous store: when it exits first, the other ranks lose the store while tearing down
    and abort ("terminate called without an active exception", exit 6) after a run that
    succeeded. So every rank meets the others, destroys its group, and rank 0 waits at an MPI
    barrier until all have let go. Both waits are bounded: a rank leaving on an error must not
    hang waiting for peers that never arrive (the launcher then ends the job).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=_EXIT_BARRIER_SECONDS))
        dist.destroy_process_group()
        if mpi_comm is not None:
            request = mpi_comm.Ibarrier()
            deadline = time.monotonic() + _EXIT_BARRIER_SECONDS
            while not request.Test() and time.monotonic() < deadline:
                time.sleep(0.005)
    except Exception:  # exiting anyway; never mask the real exit status
        pass


def is_distributed():
    """True when a torch.distributed process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def get_rank():
    """Rank of this process in the job (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size():
    """Number of processes in the job (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def launcher():
    """
    What started this process, in words for a run's record: "torchrun", "mpiexec (<the MPI its
    variables belong to>)", "RANK/WORLD_SIZE variables" (a cluster script that sets them) or
    "python" (one plain process). Reads environment variables only.
    """
    if _started_by_torchrun():
        return "torchrun"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not _launched_by_mpi():
        return "RANK/WORLD_SIZE variables"
    if _launched_by_mpi():
        name, _ = _mpi_size_var()
        library = _LAUNCHER_LIBRARIES.get(name, "an MPI launcher") if name else "an MPI launcher"
        return f"mpiexec ({library})"
    return "python"


def get_local_rank():
    """Rank of this process among the processes on its node (0 when not distributed)."""
    return _local_rank


def is_main_process():
    """True on rank 0, the process that writes logs, checkpoints and samples."""
    return get_rank() == 0


def dev():
    """
    The device this process computes on: cuda:<local rank modulo visible GPUs>, else cpu.
    """
    if torch.cuda.is_available():
        # deviation from reference: the reference returns plain "cuda" after narrowing
        # CUDA_VISIBLE_DEVICES to one GPU; we name the device explicitly instead.
        return torch.device("cuda", _local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def load_state_dict(path, **kwargs):
    """
    Load a checkpoint file with torch.load(weights_only=True).

    :param path: the file to read.
    :param kwargs: passed to torch.load, e.g. map_location="cpu".
    :raises FileNotFoundError: when the file does not exist.
    :raises ValueError: when the file is truncated, corrupt or not a tensor-only checkpoint.
    """
    # deviation from reference: the reference reads the bytes on rank 0 and broadcasts them with
    # MPI; every rank reads the file itself here, which needs no MPI and suits local disks.
    return load_checkpoint(path, **kwargs)


def sync_params(params):
    """
    Copy the values of a sequence of tensors from rank 0 to every other rank (in place).

    :param params: an iterable of tensors, e.g. model.parameters(); a no-op on a single process.
    """
    if not is_distributed():
        return
    with torch.no_grad():
        for p in params:
            dist.broadcast(p, 0)


def barrier():
    """Wait until every rank arrives here (a no-op on a single process)."""
    if is_distributed():
        dist.barrier()


def all_gather_tensors(tensor):
    """
    Collect a tensor from every rank.

    Ranks may pass tensors of different shapes (for example a smaller last batch) as long as they
    have the same number of dimensions and the same dtype.

    :param tensor: this rank's tensor (on dev() when the backend is NCCL).
    :return: a list with one tensor per rank, in rank order; [tensor] on a single process.
    """
    if not is_distributed():
        return [tensor]
    world = dist.get_world_size()
    shapes = [None] * world
    dist.all_gather_object(shapes, tuple(tensor.shape))
    if len(set(len(s) for s in shapes)) != 1:
        raise ValueError(f"all_gather_tensors: ranks passed tensors of different ranks {shapes}")
    if all(s == shapes[0] for s in shapes):
        gathered = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(gathered, tensor.contiguous())
        return gathered
    # Collectives need equal sizes: pad the flattened tensors to the largest one, then cut.
    numels = [int(torch.Size(s).numel()) for s in shapes]
    longest = max(numels)
    flat = torch.zeros(longest, dtype=tensor.dtype, device=tensor.device)
    flat[: tensor.numel()] = tensor.reshape(-1)
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    return [g[:n].reshape(s) for g, n, s in zip(gathered, numels, shapes)]


def wrap_ddp(model, **kwargs):
    """
    Wrap a model in DistributedDataParallel when distributed, so gradients are averaged.

    :param model: a module already moved to dev().
    :param kwargs: overrides for the DDP arguments (defaults follow the reference TrainLoop:
                   broadcast_buffers=False, bucket_cap_mb=128, find_unused_parameters=False).
    :return: the DDP-wrapped model, or the model itself on a single process.
    """
    if not is_distributed():
        return model
    # deviation from reference: the reference skips DDP on CPU with a warning, so CPU ranks never
    # synchronised gradients; gloo makes DDP work on CPU as well.
    options = dict(bucket_cap_mb=128, find_unused_parameters=False)
    if any(True for _ in model.buffers()):
        # Only meaningful for models with buffers (the diffusion networks have none); passing it
        # regardless makes recent torch print a FutureWarning on every run.
        options["broadcast_buffers"] = False
    if torch.cuda.is_available():
        options.update(device_ids=[dev()], output_device=dev())
    options.update(kwargs)
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, **options)


def print0(*args, **kwargs):
    """print() on rank 0 only (flushed at once, so output from several ranks stays ordered)."""
    if is_main_process():
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)


def gather_objects(obj):
    """
    Collect a picklable object from every rank on rank 0.

    :param obj: this rank's object (small: it is pickled and sent whole).
    :return: on rank 0 the list of every rank's object, in rank order; None on other ranks;
        [obj] on a single process.
    """
    if not is_distributed():
        return [obj]
    gathered = [None] * dist.get_world_size() if is_main_process() else None
    # Over the CPU group: nothing here concerns the GPU, and NCCL would stage the bytes there.
    dist.gather_object(obj, gathered, dst=0, group=_cpu_group())
    return gathered


_host_group = None


def _cpu_group():
    """A gloo group for small host-side collectives (the default group when it is gloo)."""
    global _host_group
    if dist.get_backend() == "gloo":
        return None
    if _host_group is None:
        # Every rank reaches this at the same call, as new_group requires. A gloo collective on
        # a CPU tensor never waits for the GPU's queued work, unlike an NCCL one read back with
        # .item().
        _host_group = dist.new_group(backend="gloo", timeout=dist_timeout())
    return _host_group


def broadcast_from_main(obj):
    """
    Rank 0's picklable object, on every rank (every rank must call it at the same point).

    :param obj: the object (only rank 0's is used; small: it is pickled and sent whole).
    :return: rank 0's object; obj itself on a single process.
    """
    if not is_distributed():
        return obj
    box = [obj if is_main_process() else None]
    dist.broadcast_object_list(box, src=0, group=_cpu_group())
    return box[0]


def max_over_ranks(value):
    """
    The largest of an integer over all ranks (every rank must call it at the same point).

    Runs on the CPU (over gloo even when training uses NCCL), so it does not synchronise with
    the GPU.

    :param value: this rank's int.
    :return: the maximum, the same int on every rank; value itself on a single process.
    """
    if not is_distributed():
        return int(value)
    tensor = torch.tensor([int(value)], dtype=torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=_cpu_group())
    return int(tensor[0])


# ---------------------------------------------------------------------------------- failures

# What torch.distributed's backends say when a collective cannot complete because another rank
# is gone or stuck (gloo: "Connection closed by peer", "Connection reset by peer", "Timed out
# waiting ..."; NCCL: its watchdog's timeouts and aborts).
_LOST_PEER_PATTERNS = (
    "connection closed by peer", "connection reset by peer", "broken pipe", "timed out",
    "timeout", "nccl", "gloo", "socket", "remote worker",
)


def is_collective_failure(exc):
    """
    True when exc is a collective (or the rendezvous store) failing because another rank of
    the job died, left or hangs, rather than a bug of this rank.
    """
    if not is_distributed():
        return False
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(exc, dist_error):
        return True
    if type(exc) is not RuntimeError:  # e.g. torch.OutOfMemoryError is a RuntimeError too
        return False
    text = str(exc).lower()
    return any(pattern in text for pattern in _LOST_PEER_PATTERNS)


def _write_torchrun_error_file(message):
    # torchrun's agent reads this file when the worker fails and shows its message in the
    # failure table it prints ("traceback : ..."), and picks the failure with the earliest
    # timestamp as the "Root Cause": so the one line is there too, not only above the table.
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        import json

        # The layout torch.distributed.elastic's own error handler writes; the table shows
        # "py_callstack", which holds the line here.
        record = {"message": message, "extraInfo": {
            "py_callstack": message, "timestamp": str(int(time.time()))}}
        with open(path, "w") as f:
            json.dump({"message": record}, f)
    except OSError:
        pass


def abort_job(status, message=None):
    """
    End this process at once, and with it the whole job, after a failure on this rank.

    Leaving normally would run the shutdown hooks, which wait for the other ranks (the
    process group's teardown, MPI_Finalize) while they may wait for this one in a collective:
    the job would hang. So: under an MPI launcher MPI_Abort, which makes the launcher end every
    rank at once; otherwise (torchrun, a single process) os._exit, which closes this rank's
    connections, so the others' next collective fails at once (NCCL's waits are bounded by
    GD_DIST_TIMEOUT) and torchrun stops the rest.

    :param status: the exit status.
    :param message: the line printed for the failure, handed to torchrun's error file.
    """
    if message:
        _write_torchrun_error_file(message)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None:
        try:
            if mpi.Is_initialized() and not mpi.Is_finalized() and mpi.COMM_WORLD.Get_size() > 1:
                # The launcher's proxy forwards this rank's output through a pipe; aborting at
                # once can end the proxy before it passed the line on.
                time.sleep(_ABORT_GRACE_SECONDS)
                mpi.COMM_WORLD.Abort(status)
        except Exception:
            pass
    os._exit(status)


_ABORT_GRACE_SECONDS = 0.5
