"""Record-level DP through the Task: ledger continuity, budget refusal, reply contents."""

import math

import pytest
import torch

from common import tree
from common.config import load
from common.data import ensure_benchmark
from common.privacy.accounting import compute_epsilon
from common.task import PrivacyBudgetExceeded, Task


def _config(root, **extra):
    overrides = {
        "data.root": str(root), "data.num_train_sites": 2, "data.num_test_sites": 1, "data.num_classes": 30,
        "data.classes_per_site": 6, "data.records_per_class": 6, "data.modalities": "image,series",
        "model.hidden": 8, "model.embed_dim": 8, "episodes.episodes_per_round": 2, "algorithm.inner_steps": 2,
        "privacy.record.enabled": True, "privacy.record.noise_multiplier": 1.5,
        "privacy.record.clip_norm": 1.0, "privacy.record.sample_rate": 0.5,
    }
    overrides.update(extra)
    return load(overrides=overrides)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    ensure_benchmark(_config(root).data)
    return root


def _site_copy(bench, tmp_path):
    import shutil

    src = ensure_benchmark(_config(bench).data).train_sites[0]
    dst = tmp_path / "site"
    shutil.copytree(src, dst)
    return dst


def test_epsilon_accumulates_across_rounds_restarts_and_runs(bench, tmp_path):
    site_dir = _site_copy(bench, tmp_path)
    config = _config(bench)
    params = None
    epsilons = []
    for run_id in ("run-a", "run-b"):
        task = Task(config)  # a fresh process-like object per run: nothing kept in memory
        params = task.initial_parameters(seed=0) if params is None else params
        site = task.load_site(site_dir)
        for r in (1, 2):
            result = task.train_on_site(params, site, round_config={"round": r, "run_id": run_id},
                                        generator=torch.Generator().manual_seed(r))
            epsilons.append(result.metrics["epsilon"])
            assert set(result.metrics) >= {"epsilon", "noise_multiplier", "clip_norm", "sample_rate"}
            assert "query_accuracy" not in result.metrics  # statistics of the records stay at the site
    assert all(b > a for a, b in zip(epsilons, epsilons[1:]))
    # four rounds of 2 episodes, each one release of sigma/sqrt(k) at q
    expected = compute_epsilon(steps=[(1.5 / math.sqrt(2), 0.5, 8)], delta=1e-5, accountant="rdp")
    assert epsilons[-1] == pytest.approx(expected, rel=1e-9)


def test_site_refuses_a_round_past_its_budget_and_keeps_its_ledger(bench, tmp_path):
    site_dir = _site_copy(bench, tmp_path)
    task = Task(_config(bench))
    params = task.initial_parameters(seed=0)
    site = task.load_site(site_dir)
    first = task.train_on_site(params, site, round_config={"round": 1}, generator=torch.Generator().manual_seed(0))
    ledger_bytes = (site_dir / "privacy_ledger.json").read_bytes()
    strict = Task(_config(bench, **{"privacy.record.max_epsilon": first.metrics["epsilon"] * 1.01}))
    with pytest.raises(PrivacyBudgetExceeded, match="refuses to train"):
        strict.train_on_site(params, strict.load_site(site_dir), round_config={"round": 2},
                             generator=torch.Generator().manual_seed(1))
    assert (site_dir / "privacy_ledger.json").read_bytes() == ledger_bytes


def test_private_update_moves_the_weights_and_is_reproducible(bench, tmp_path):
    site_dir = _site_copy(bench, tmp_path)
    config = _config(bench, **{"privacy.record.ledger_dir": str(tmp_path / "ledgers")})
    task = Task(config)
    params = task.initial_parameters(seed=0)
    site = task.load_site(site_dir)
    a = task.train_on_site(params, site, generator=torch.Generator().manual_seed(7)).params
    b = task.train_on_site(params, site, generator=torch.Generator().manual_seed(7)).params
    assert tree.max_abs_diff(a, b) == 0.0
    assert tree.max_abs_diff(a, params) > 0
    assert (tmp_path / "ledgers" / f"{site.site_id}.json").is_file()
    assert not (site_dir / "privacy_ledger.json").exists()


def test_record_dp_is_refused_for_query_gradient_algorithms(bench):
    from common.config import ConfigError

    with pytest.raises(ConfigError, match="reptile"):
        _config(bench, **{"algorithm.name": "maml"})
