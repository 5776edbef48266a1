"""
How the tests start other processes: the environment a child gets, and the launchers.

- child_env(cpu=True) hides the GPUs (CUDA_VISIBLE_DEVICES=""). Tests that start several ranks
  test the multi-process logic (gloo, DDP on CPU, rank-ordered files) and compare against CPU
  results, so they run on CPU wherever they run; NCCL could not put two ranks on one GPU anyway.
  The GPU paths have their own tests (test_cuda.py).
- mpiexec_prefix(n) is the mpiexec that belongs to the MPI library mpi4py loads (the mpich wheel's
  Hydra, or a system Open MPI when mpi4py uses that), or the test is skipped with the reason. An
  mpiexec of another MPI would start n independent singletons instead of one job of n ranks.
- Running as root, Open MPI refuses to start unless OMPI_ALLOW_RUN_AS_ROOT and
  OMPI_ALLOW_RUN_AS_ROOT_CONFIRM are set (containers often run as root); MPICH ignores them.
"""

import functools
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

# What launchers set in each process they start. A child must not inherit them from whatever
# started pytest, or it would believe it is a rank of that job.
_LAUNCHER_PREFIXES = ("PMI_", "PMIX_", "MPI_LOCAL", "MV2_COMM_WORLD_", "TORCHELASTIC_", "OMPI_")
# Open MPI settings a user may have chosen on purpose (not per-process state).
_KEPT_PREFIXES = ("OMPI_MCA_", "OMPI_ALLOW_RUN_AS_ROOT")
_LAUNCHER_NAMES = {
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
    "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
}


def _is_launcher_var(name):
    if name in _LAUNCHER_NAMES:
        return True
    return name.startswith(_LAUNCHER_PREFIXES) and not name.startswith(_KEPT_PREFIXES)


def child_env(*, cpu=False, **extra):
    """
    The environment for a child process of a test.

    :param cpu: hide every GPU from the child (and from the ranks an MPI launcher starts).
    :param extra: variables to set on top (a value of None removes the variable).
    :return: a dict for subprocess.run(env=...).
    """
    env = {k: v for k, v in os.environ.items() if not _is_launcher_var(k)}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    # Open MPI 4 gives a job one slot per core; two ranks must start on a one-core runner too.
    env.setdefault("OMPI_MCA_rmaps_base_oversubscribe", "1")
    for name, value in extra.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = str(value)
    return env


def torchrun_prefix(n):
    """The command that starts n ranks of a script under torchrun (no PATH lookup needed)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n)]


def _mpi_family(text):
    """'openmpi', 'mpich' (MPICH, its Hydra launcher and MPICH-based MPIs) or None."""
    text = text.lower()
    if "open mpi" in text or "openrte" in text or "open-mpi" in text:
        return "openmpi"
    if any(word in text for word in ("mpich", "hydra", "intel(r) mpi", "mvapich")):
        return "mpich"
    return None


@functools.lru_cache(maxsize=None)
def _mpi4py_library():
    """(family, first line of the library's version) of the MPI that mpi4py loads, or (None, why)."""
    code = (
        "import mpi4py\n"
        "mpi4py.rc.initialize = mpi4py.rc.finalize = False\n"  # only ask, never start MPI
        "from mpi4py import MPI\n"
        "print(MPI.Get_library_version())\n"
    )
    try:
        proc = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True,
                              text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return None, "asking mpi4py for its MPI library timed out"
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or ["(no message)"]
        return None, f"mpi4py cannot be used: {lines[-1]}"
    text = proc.stdout.replace("\x00", "")  # Open MPI ends its version string with a NUL
    first = (text.strip().splitlines() or ["(empty version)"])[0].strip()
    family = _mpi_family(text)
    if family is None:
        return None, f"mpi4py's MPI library is neither MPICH nor Open MPI: {first}"
    return family, first


def _mpiexec_candidates():
    # The interpreter's own scripts folder first: that is where the mpich wheel puts its Hydra
    # mpiexec. Then every PATH entry, not only the first hit: a system Open MPI can sit behind
    # the wheel's launcher (or a version manager's shim of it) on the PATH, and the reverse.
    folders = [Path(sys.executable).parent, Path(sysconfig.get_path("scripts"))]
    folders += [Path(entry) for entry in os.environ.get("PATH", "").split(os.pathsep) if entry]
    unique = []
    for folder in folders:
        for name in ("mpiexec", "mpirun"):
            path = str(folder / name)
            if os.path.isfile(path) and os.access(path, os.X_OK) and path not in unique:
                unique.append(path)
    return unique


@functools.lru_cache(maxsize=None)
def find_mpiexec():
    """(path, None) of an mpiexec that matches mpi4py's MPI library, else (None, the reason)."""
    family, library = _mpi4py_library()
    if family is None:
        return None, library
    seen = []
    for path in _mpiexec_candidates():
        try:
            proc = subprocess.run([path, "--version"], env=child_env(), capture_output=True,
                                  text=True, timeout=60)
            found = _mpi_family(proc.stdout + proc.stderr)
        except (OSError, subprocess.TimeoutExpired):
            found = None
        if found == family:
            return path, None
        seen.append(f"{path} ({found or 'unknown'})")
    return None, (
        f"no mpiexec matches mpi4py's MPI library ({library}); found: "
        f"{', '.join(seen) or 'none'}"
    )


def mpiexec_prefix(n):
    """
    The command that starts n MPI ranks (the program follows), or skip the test with the reason.
    """
    path, why_not = find_mpiexec()
    if path is None:
        pytest.skip(why_not)
    return [path, "-n", str(n)]
