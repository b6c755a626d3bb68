import dataclasses
import shutil
from pathlib import Path

import pytest

from common.config import load

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "simulations" / "configs" / "smoke.yaml"


@pytest.fixture(autouse=True)
def _flower_messages(task_identity):
    """Every test here may build Flower messages: each gets tests/conftest.py's task identity."""


@pytest.fixture(scope="session")
def smoke_config():
    return load(SMOKE)


@pytest.fixture(scope="session")
def smoke_data(tmp_path_factory, smoke_config) -> Path:
    """The smoke benchmark (3 train sites, 2 held-out), generated once per test session."""
    from common.data import ensure_benchmark

    root = tmp_path_factory.mktemp("smoke") / "data"
    ensure_benchmark(dataclasses.replace(smoke_config.data, root=str(root)))
    return root


@pytest.fixture(scope="session")
def broken_data(smoke_data, tmp_path_factory) -> Path:
    """A copy of the smoke sites (no benchmark file) plus a fourth train site whose labels are cut short."""
    root = tmp_path_factory.mktemp("broken") / "data"
    shutil.copytree(smoke_data / "train", root / "train")
    shutil.copytree(smoke_data / "test", root / "test")
    bad = root / "train" / "site-0003"
    shutil.copytree(root / "train" / "site-0000", bad)
    manifest = bad / "manifest.yaml"  # another site: its own site id
    manifest.write_text(manifest.read_text().replace("site_id: train-0000", "site_id: site-0003", 1))
    import numpy as np

    labels = np.load(bad / "labels.npy")
    np.save(bad / "labels.npy", labels[:-3])
    return root
