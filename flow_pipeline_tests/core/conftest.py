"""Fixtures shared by the core tests."""

import pytest
import torch


@pytest.fixture
def one_torch_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is many times faster than two contending ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
