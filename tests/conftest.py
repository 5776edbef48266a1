"""Shared fixtures: locating the conformance vectors and keeping tests small and deterministic."""

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent


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
