import os

import pytest
import torch

# The chooser's measured table differs from machine to machine (docs/design.md); the suite runs on the static order
# so that it tests the same choices everywhere. tests/test_choice.py sets a table of its own where it needs one.
os.environ.setdefault("SELFATTN_TABLE", "none")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """Many tiny operations (decoding, a tiny GPT): one thread is faster, and fair to other jobs on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
