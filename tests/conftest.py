"""
Shared fixtures: locating the conformance vectors, the `cuda` marker, running code under test as
on a machine without a GPU, and one intra-op thread for modules of tiny models.
"""

import os
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
# The experiments (not part of the installed package) import each other as top-level modules.
sys.path.insert(0, str(REPO_ROOT / "experiments"))


def conformance_dir():
    """The folder of reference vectors: $GD_CONFORMANCE_DIR, else ../shared/conformance."""
    env = os.environ.get("GD_CONFORMANCE_DIR")
    path = Path(env) if env else REPO_ROOT.parent / "shared" / "conformance"
    return path if (path / "README.md").exists() else None


@pytest.fixture(scope="session")
def conformance():
    path = conformance_dir()
    if path is None:
        if os.environ.get("GD_REQUIRE_CONFORMANCE"):
            pytest.fail("GD_REQUIRE_CONFORMANCE is set but the conformance folder is missing")
        pytest.skip("conformance vectors not found (set GD_CONFORMANCE_DIR or put shared/ beside the repo)")
    return path


def load_vector(path):
    return torch.load(path, weights_only=True, map_location="cpu")


# ----------------------------------------------------------------------------- threads


@pytest.fixture(scope="module")
def single_thread():
    """
    One intra-op thread for a module's tests and its module-scoped fixtures (request it with
    `pytestmark = pytest.mark.usefixtures("single_thread")`; it is set up before the module's
    other module-scoped fixtures). Tiny models gain nothing from threads, and on a busy machine
    OpenMP spin-waiting made tests several times slower. No assertion may rely on it: comparisons
    with the conformance vectors use tolerances that hold for any thread count and vector unit.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ----------------------------------------------------------------------------- devices

CUDA_MARKER = (
    "cuda: exercises a GPU path; skipped with the reason when no CUDA GPU is visible "
    "(run them with: python -m pytest -q -m cuda tests)"
)


def pytest_configure(config):
    config.addinivalue_line("markers", CUDA_MARKER)


def _no_cuda_reason():
    if torch.version.cuda is None:
        return f"needs a CUDA GPU: this torch build ({torch.__version__}) has no CUDA support"
    if not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        hint = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
        return f"needs a CUDA GPU: torch {torch.__version__} sees none{hint}"
    return None


def pytest_collection_modifyitems(config, items):
    marked = [item for item in items if item.get_closest_marker("cuda") is not None]
    if not marked:
        return
    reason = _no_cuda_reason()
    if reason is not None:
        for item in marked:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def cpu_only(monkeypatch):
    """
    Run the code under test as on a machine without a GPU, even where one is visible.

    The library picks its device from torch.cuda.is_available() (dist_util.dev(), the backend,
    DDP's device_ids), so this is what CUDA_VISIBLE_DEVICES="" does for a child process. Use it
    for tests whose expectations are CPU results, e.g. against a reference computed on CPU.
    """
    from guided_diffusion import dist_util

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert dist_util.dev() == torch.device("cpu")
