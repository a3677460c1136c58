"""Shared set-up for the NNI-style conformance tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """The models here are tiny: one intra-op thread runs them several times faster on a 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
