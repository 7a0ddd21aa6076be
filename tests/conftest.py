"""Shared fixtures."""
from __future__ import annotations

import os

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, each of the W workers gets cores / W torch threads (at most what it was given), and so do
    the ``defend`` processes its tests start: 2 workers with 2 threads each on 2 cores would stall each other."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) // workers))
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module: its models are tiny, and on a shared 2-core machine extra threads only
    add overhead (and stall badly when the other core is busy). Restores the previous setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
