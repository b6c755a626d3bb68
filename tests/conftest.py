import os

import pytest
import torch

# One thread per test process: the suite is sized for 2 cores.
torch.set_num_threads(int(os.environ.get("METAFED_TEST_THREADS", "1")))


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(1234)
