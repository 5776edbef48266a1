"""The tests' launch helper (tests/_launch.py): child environments and the choice of mpiexec."""

import os
import subprocess
import sys

import pytest

import _launch


@pytest.mark.parametrize(
    "text, family",
    [
        ("MPICH Version:      5.0.2\nMPICH Release date: ...", "mpich"),  # mpi4py on the wheel
        ("HYDRA build details:\n    Version: 5.0.2", "mpich"),  # the wheel's mpiexec --version
        ("Intel(R) MPI Library 2021.10 for Linux* OS", "mpich"),
        ("Open MPI v4.1.4, package: Debian OpenMPI, ident: 4.1.4", "openmpi"),  # mpi4py
        ("mpiexec (OpenRTE) 4.1.4\n\nReport bugs to http://www.open-mpi.org", "openmpi"),
        ("mpirun (Open MPI) 5.0.7", "openmpi"),
        ("Microsoft MPI Startup Program [Version 10.1]", None),
    ],
)
def test_mpi_family_from_version_text(text, family):
    assert _launch._mpi_family(text) == family


def test_child_env_drops_launcher_state_and_keeps_settings(monkeypatch):
    for name, value in [("PMI_RANK", "1"), ("OMPI_COMM_WORLD_SIZE", "2"), ("RANK", "1"),
                        ("MASTER_PORT", "1234"), ("TORCHELASTIC_RUN_ID", "x"),
                        ("OMPI_MCA_btl", "self,vader"), ("PYTHONPATH", "/elsewhere")]:
        monkeypatch.setenv(name, value)
    env = _launch.child_env(OPENAI_LOGDIR="/tmp/x", OMP_NUM_THREADS=None)
    for name in ("PMI_RANK", "OMPI_COMM_WORLD_SIZE", "RANK", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
                 "OMP_NUM_THREADS"):
        assert name not in env
    assert env["OMPI_MCA_btl"] == "self,vader"  # a user's Open MPI setting is not launcher state
    assert env["PYTHONPATH"].split(os.pathsep) == [str(_launch.REPO_ROOT), "/elsewhere"]
    assert env["OPENAI_LOGDIR"] == "/tmp/x"
    assert env.get("CUDA_VISIBLE_DEVICES") == os.environ.get("CUDA_VISIBLE_DEVICES")
    assert _launch.child_env(cpu=True)["CUDA_VISIBLE_DEVICES"] == ""
    root = hasattr(os, "geteuid") and os.geteuid() == 0
    assert ("OMPI_ALLOW_RUN_AS_ROOT" in env and "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM" in env) == root


def test_chosen_mpiexec_starts_one_job_of_two_ranks(tmp_path):
    # The mpiexec found for mpi4py's library must make its ranks one job (an mpiexec of another
    # MPI would start two singletons, or fail).
    script = tmp_path / "size.py"
    # Each rank writes its own file: two ranks printing to one pipe may interleave mid-line.
    script.write_text(
        "import sys\nfrom mpi4py import MPI\ncomm = MPI.COMM_WORLD\n"
        "open(f'{sys.argv[1]}/rank{comm.rank}.txt', 'w').write(str(comm.size))\n"
    )
    proc = subprocess.run([*_launch.mpiexec_prefix(2), sys.executable, str(script), str(tmp_path)],
                          env=_launch.child_env(cpu=True), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    sizes = {p.name: p.read_text() for p in tmp_path.glob("rank*.txt")}
    assert sizes == {"rank0.txt": "2", "rank1.txt": "2"}
