"""Fixtures shared by the unit tests."""
import pytest
import torch


@pytest.fixture
def one_torch_thread():
    """Run the test with one torch thread (small kernels are faster and results reproducible)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
