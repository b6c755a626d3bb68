import pytest


@pytest.fixture(autouse=True)
def _flower_messages(task_identity):
    """Every test here may build Flower messages: each gets tests/conftest.py's task identity."""
