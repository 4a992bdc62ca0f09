"""Shared fixtures. Tests run single-threaded: CI has 2 cores and the suite must stay under 15 minutes."""

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(int(os.environ.get("GREG_TEST_THREADS", "1")))

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TIMEOUT_S = 600  # per test; a test that needs longer says so with @pytest.mark.timeout(N)


def pytest_collection_modifyitems(config, items):
    # A default limit that a test's own marker overrides (an ini `timeout` would be the one limit of all)
    for item in items:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(DEFAULT_TIMEOUT_S))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``../shared`` beside the repository (CI puts it there), or ``$GREG_SHARED``."""
    path = Path(os.environ.get("GREG_SHARED", REPO.parent / "shared"))
    if not (path / "checkpoints").is_dir():
        pytest.skip(f"shared checkpoints not found under {path} (set GREG_SHARED)")
    return path


@pytest.fixture(scope="session")
def checkpoint_mirror(shared_dir) -> Path:
    """The local mirror of the released checkpoints (``../shared/checkpoints``) for ``--mirror`` /
    ``$GREG_MIRROR``; tests that need the real files skip (with the reason) on a clone without it."""
    return shared_dir / "checkpoints"
