"""Shared fixtures: the real data in ../shared/data and small helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# ``fused=None`` runs eagerly in the tests (and in the CLI processes they start): compiling
# takes seconds to minutes on a small machine; the fast-path tests opt in with ``fused=True``.
os.environ.setdefault("OPTARENA_FUSED", "0")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the clone; skipped on a user's clone, a failure in CI."""
    if not SHARED_DATA.is_dir():
        reason = f"needs the project's shared test data at {SHARED_DATA} (not part of a clone)"
        if os.environ.get("OPTARENA_REQUIRE_SHARED"):
            pytest.fail(reason)
        pytest.skip(reason)
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def single_thread():
    """One intra-op thread for tests of many tiny tensor ops: they gain nothing from threads,
    and on a loaded 2-core machine two threads made a tiny model's step ~70x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
