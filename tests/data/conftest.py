"""Fixtures for the data tests: small sites written to temporary folders."""

from __future__ import annotations

import numpy as np
import pytest

from common.config import DataConfig
from common.data import ModalitySpec, generate_benchmark, write_site

IMAGE = ModalitySpec("image", "image", (1, 4, 4))
SERIES = ModalitySpec("series", "series", (2, 5))
TOKENS = ModalitySpec("tokens", "tokens", (3,), "int64", 10)
SCHEMA = {"image": IMAGE, "series": SERIES, "tokens": TOKENS}

# Small enough to generate in about a second, big enough for 5-way episodes on held-out sites.
SMALL_BENCHMARK = DataConfig(
    root="unused",
    num_train_sites=3,
    num_test_sites=24,
    num_classes=60,
    classes_per_site=8,
    records_per_class=8,
    seed=0,
)


def _site_kwargs(n_classes: int = 4, per_class: int = 6, seed: int = 0) -> dict:
    """Arrays for a valid site: ``image``, ``series`` and ``tokens``, labels in class blocks."""
    rng = np.random.default_rng(seed)
    n = n_classes * per_class
    return {
        "arrays": {
            "image": rng.random((n, *IMAGE.shape), dtype=np.float32),
            "series": rng.standard_normal((n, *SERIES.shape)).astype(np.float32),
            "tokens": rng.integers(0, TOKENS.vocab_size, (n, *TOKENS.shape)),
        },
        "labels": np.repeat(np.arange(n_classes), per_class),
        "class_names": [f"c{i}" for i in range(n_classes)],
        "specs": dict(SCHEMA),
        "site_id": "site-a",
        "provenance": {"generator": "tests", "seed": seed},
    }


@pytest.fixture
def site_kwargs():
    """``site_kwargs(n_classes, per_class, seed)``: keyword arguments of write_site for a valid site."""
    return _site_kwargs


@pytest.fixture
def schema():
    return dict(SCHEMA)


@pytest.fixture
def small_config():
    return SMALL_BENCHMARK


@pytest.fixture
def make_site(tmp_path):
    """Write a valid site (keyword overrides replace parts of it) and return its folder."""

    def make(name: str = "site-a", **overrides):
        kwargs = _site_kwargs()
        kwargs.update(overrides)
        return write_site(tmp_path / name, **kwargs)

    return make


@pytest.fixture(scope="session")
def small_benchmark(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench") / "procedural"
    return generate_benchmark(root, config=SMALL_BENCHMARK)
