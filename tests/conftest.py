import os

import pytest
import torch

# One thread per test process: the suite is sized for 2 cores.
torch.set_num_threads(int(os.environ.get("METAFED_TEST_THREADS", "1")))


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def task_identity():
    """Messages built outside a Flower runtime need a run/node/task identity.

    Requested by every test under tests/flower and tests/reliability (their
    conftest.py), by name elsewhere; flwr is imported only when it is.
    """
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
