"""Shared across the test modules: every module runs its torch work on one thread."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Run each module's tiny models on one intra-op thread, restored afterwards.

    At these sizes thread hand-offs cost more than the arithmetic, and on a busy 2-core
    machine two OpenMP threads per process oversubscribe it (measured: 10-20x slower).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
