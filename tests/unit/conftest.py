"""Unit-test defaults shared by every module here."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: unit tensors are tiny, and on a busy 2-core box OpenMP barriers cost more than the
    math (10x wall time). Restored afterwards, so a test that sets its own count does not leak into the next module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
