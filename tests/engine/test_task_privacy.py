"""Record-level DP through the Task: ledger continuity, budget refusal, reply contents."""

import math

import pytest
import torch

from common import tree
from common.config import load
from common.data import ensure_benchmark
from common.privacy.accounting import compute_epsilon, record_level_round_steps
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


def test_private_update_moves_the_weights_and_is_reproducible_only_when_asked(bench, tmp_path):
    site_dir = _site_copy(bench, tmp_path)
    config = _config(bench, **{"site_privacy.ledger_dir": str(tmp_path / "ledgers"),
                               "site_privacy.reproducible_noise": True})
    task = Task(config)
    params = task.initial_parameters(seed=0)
    site = task.load_site(site_dir)
    a = task.train_on_site(params, site, generator=torch.Generator().manual_seed(7))
    b = task.train_on_site(params, site, generator=torch.Generator().manual_seed(7))
    assert tree.max_abs_diff(a.params, b.params) == 0.0
    assert tree.max_abs_diff(a.params, params) > 0
    assert a.metrics["dp_reproducible_noise"] == 1.0  # the reply says the noise is not secret
    assert all("NOT PRIVATE" in e["not_private"] for e in task.ledger(site).entries)
    # The default: the same seed, fresh noise from the OS every round.
    private = Task(_config(bench, **{"site_privacy.ledger_dir": str(tmp_path / "ledgers")}))
    c = private.train_on_site(params, site, generator=torch.Generator().manual_seed(7))
    d = private.train_on_site(params, site, generator=torch.Generator().manual_seed(7))
    assert tree.max_abs_diff(c.params, d.params) > 0 and "dp_reproducible_noise" not in c.metrics
    assert "not_private" not in private.ledger(site).entries[-1]
    assert (tmp_path / "ledgers" / f"{site.site_id}.json").is_file()
    assert not (site_dir / "privacy_ledger.json").exists()


def test_record_dp_refuses_second_order_maml_and_accepts_the_first_order_family(bench):
    from common.config import ConfigError

    with pytest.raises(ConfigError, match="algorithm.first_order: true"):
        _config(bench, **{"algorithm.name": "maml"})
    for accepted in ({"algorithm.name": "fomaml"}, {"algorithm.name": "metasgd"},
                     {"algorithm.name": "maml", "algorithm.first_order": True}):
        config = _config(bench, **accepted)
        assert config.privacy.record.enabled and config.algorithm.name == accepted["algorithm.name"]
    # without record-level DP second-order MAML is fine
    assert _config(bench, **{"algorithm.name": "maml", "privacy.record.enabled": False}).algorithm.name == "maml"


# --------------------------------------------------------------- FOMAML and Meta-SGD: the query release


def test_fomaml_round_records_the_support_and_the_query_release(bench, tmp_path):
    site_dir = _site_copy(bench, tmp_path)
    task = Task(_config(bench, **{"algorithm.name": "fomaml"}))
    params = task.initial_parameters(seed=0)
    site = task.load_site(site_dir)
    result = task.train_on_site(params, site, round_config={"round": 1}, generator=torch.Generator().manual_seed(0))
    with_query = record_level_round_steps(episodes=2, inner_steps=2, noise_multiplier=1.5, sample_rate=0.5,
                                          query_release=True, query_sample_rate=0.5, query_noise_multiplier=1.5)
    support_only = record_level_round_steps(episodes=2, inner_steps=2, noise_multiplier=1.5, sample_rate=0.5)
    ledger = task.ledger(site)
    assert ledger.history == with_query == [(1.5 / math.sqrt(2), 0.5, 2), (1.5, 0.5, 2)]
    assert [tuple(s) for s in ledger.entries[0]["steps"]] == with_query
    eps = compute_epsilon(steps=with_query, delta=1e-5)
    assert result.metrics["epsilon"] == pytest.approx(eps, rel=1e-9) and ledger.epsilon == result.metrics["epsilon"]
    assert result.metrics["dp_steps"] == 4.0
    assert eps > compute_epsilon(steps=support_only, delta=1e-5)
    assert tree.max_abs_diff(result.params, params) > 0
    # A budget that one round of support releases alone would fit is refused: the query counts too.
    fresh = _site_copy(bench, tmp_path / "fresh")
    budget = compute_epsilon(steps=support_only, delta=1e-5) * 1.01
    strict = Task(_config(bench, **{"algorithm.name": "fomaml", "privacy.record.max_epsilon": budget}))
    with pytest.raises(PrivacyBudgetExceeded, match="refuses to train"):
        strict.train_on_site(params, strict.load_site(fresh), generator=torch.Generator().manual_seed(0))


def test_metasgd_learning_rates_are_trained_under_record_dp(bench, tmp_path):
    from common.algorithms.inner import LR_PREFIX

    site_dir = _site_copy(bench, tmp_path)
    task = Task(_config(bench, **{"algorithm.name": "metasgd", "privacy.record.noise_multiplier": 0.5}))
    params = task.initial_parameters(seed=0)
    result = task.train_on_site(params, task.load_site(site_dir), generator=torch.Generator().manual_seed(3))
    rates = [k for k in params if k.startswith(LR_PREFIX)]
    assert rates and all(float((result.params[k] - params[k]).abs().max()) > 0 for k in rates)
    assert len(task.ledger(task.load_site(site_dir)).history) == 2  # support and query releases


def test_fomaml_with_record_dp_trains_end_to_end(tmp_path):
    """simulations.local.train on the smoke config: FOMAML with record-level DP moves the model, epsilon grows."""
    import json
    from pathlib import Path

    from simulations.local import train

    smoke = Path(__file__).resolve().parents[2] / "simulations" / "configs" / "smoke.yaml"
    ledgers = tmp_path / "ledgers"
    config = load(smoke, overrides={
        "data.root": str(tmp_path / "data"), "algorithm.name": "fomaml", "federation.sites_per_round": 2,
        "federation.eval_episodes": 3, "episodes.episodes_per_round": 2,
        "privacy.record.enabled": True, "privacy.record.noise_multiplier": 1.0, "privacy.record.clip_norm": 1.0,
        "privacy.record.sample_rate": 0.5, "site_privacy.ledger_dir": str(ledgers), "runtime.device": "cpu",
    })
    task = Task(config)
    initial = task.initial_parameters(seed=config.federation.seed)
    run = train(config, task=task, log=lambda _: None, ablate=False)
    assert tree.max_abs_diff(run.params, initial) > 0
    assert 0 < run.history[0]["train"]["epsilon_max"] < run.history[1]["train"]["epsilon_max"]
    files = sorted(ledgers.glob("*.json"))
    assert files
    one_round = compute_epsilon(steps=record_level_round_steps(
        episodes=2, inner_steps=config.algorithm.inner_steps, noise_multiplier=1.0, sample_rate=0.5,
        query_release=True, query_sample_rate=0.5), delta=1e-5)
    for path in files:
        epsilons = [e["epsilon"] for e in json.loads(path.read_text())["entries"]]
        assert epsilons[0] == pytest.approx(one_round, rel=1e-9)
        assert all(b > a for a, b in zip(epsilons, epsilons[1:]))
    assert max(len(json.loads(p.read_text())["entries"]) for p in files) == 2  # some site took part twice
    assert 0.0 <= run.meta_test["accuracy"] <= 1.0
