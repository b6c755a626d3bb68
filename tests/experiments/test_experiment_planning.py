"""Planning the noise of a privacy experiment from a config (what privacy-sweep and plan-privacy do)."""

import math
import subprocess
import sys
from pathlib import Path

import pytest

from common.config import load
from common.privacy.accounting import compute_epsilon, episode_release
from simulations.experiments import expected_participations, plan, planned_participations, private_config

ROOT = Path(__file__).resolve().parents[2]
COMPARE = ROOT / "simulations" / "configs" / "compare.yaml"
# compare.yaml starts its heads from prototypes, which record-level DP refuses.
SHARED_HEAD = "algorithm.head_init=shared"


def test_planned_participations_is_the_binomial_quantile():
    config = load(COMPARE, overrides=["federation.rounds=30", "federation.sites_per_round=10"])
    # Binomial(30, 0.1): P(<= 4) = 0.825, P(<= 5) = 0.927
    assert expected_participations(config, 100) == pytest.approx(3.0)
    assert planned_participations(config, 100, coverage=0.8) == 4
    assert planned_participations(config, 100, coverage=0.9) == 5
    assert planned_participations(config, 100, coverage=1.0) == 30
    assert planned_participations(config, 10, coverage=0.5) == 30  # every site, every round
    with pytest.raises(ValueError, match="coverage"):
        planned_participations(config, 100, coverage=0.0)


def test_record_plan_reaches_the_target_for_the_planned_participation():
    config = load(COMPARE)
    sigma, text = plan(config, level="record", target_epsilon=4.0, num_sites=30)
    participations = planned_participations(config, 30)
    assert participations > math.ceil(expected_participations(config, 30))
    k = config.algorithm.inner_steps
    steps = [(episode_release(noise_multiplier=sigma, inner_steps=k), config.privacy.record.sample_rate,
              participations * config.episodes.episodes_per_round)]
    eps = compute_epsilon(steps=steps, delta=config.privacy.record.delta, accountant="rdp")
    assert 3.9 <= eps <= 4.0
    assert "record-level" in text and f"{sigma:.3f}"[:4] in text


def test_client_plan_needs_poisson_rate_and_reaches_the_target():
    config = load(COMPARE, overrides=["federation.fraction=0.2", "federation.poisson=true"])
    sigma, _ = plan(config, level="client", target_epsilon=2.0, num_sites=30)
    eps = compute_epsilon(steps=[(sigma, 0.2, config.federation.rounds)], delta=1e-5, accountant="rdp")
    assert 1.95 <= eps <= 2.0
    with pytest.raises(ValueError, match="federation.fraction"):
        plan(load(COMPARE), level="client", target_epsilon=2.0, num_sites=30)


def test_private_config_caps_each_site_at_the_target(tmp_path):
    config = private_config(load(COMPARE, overrides=[SHARED_HEAD]), level="record", target_epsilon=8.0,
                            num_sites=30, ledger_dir=tmp_path)
    rec = config.privacy.record
    assert rec.enabled and rec.max_epsilon == 8.0 and rec.noise_multiplier > 0
    assert config.site_privacy.ledger_dir == str(tmp_path)


def test_plan_privacy_command_prints_the_plan():
    done = subprocess.run(
        [str(Path(sys.executable).parent / "metafed"), "plan-privacy", "--config", str(COMPARE),
         "--target-epsilon", "4", "--level", "record"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "noise multiplier sigma" in done.stdout and "delta = 1e-05" in done.stdout


@pytest.mark.filterwarnings("ignore:Optimal order is the")
def test_record_plan_for_fomaml_covers_the_query_release_and_reaches_the_target():
    from common.privacy.accounting import record_level_round_steps
    from common.privacy.planner import participations

    # a small sample rate keeps Opacus's RDP evaluations (and so the search) fast
    reptile = load(COMPARE, overrides=["privacy.record.sample_rate=0.05"])
    fomaml = load(COMPARE, overrides=["algorithm.name=fomaml", "privacy.record.sample_rate=0.05"])
    sigma_reptile, _ = plan(reptile, level="record", target_epsilon=4.0, num_sites=30)
    sigma, text = plan(fomaml, level="record", target_epsilon=4.0, num_sites=30)
    assert sigma > sigma_reptile
    rec = fomaml.privacy.record
    n = planned_participations(fomaml, 30)
    steps = record_level_round_steps(
        episodes=n * fomaml.episodes.episodes_per_round, inner_steps=fomaml.algorithm.inner_steps,
        noise_multiplier=sigma, sample_rate=rec.sample_rate, query_release=True, query_sample_rate=rec.sample_rate)
    eps = compute_epsilon(steps=steps, delta=rec.delta, accountant="rdp")
    assert 3.99 <= eps <= 4.0
    assert "query-gradient release" in text and f"epsilon = {eps:.4g}" in text
    # the reptile plan, spent by FOMAML's two releases per episode, would overshoot the target
    under = record_level_round_steps(
        episodes=n * fomaml.episodes.episodes_per_round, inner_steps=fomaml.algorithm.inner_steps,
        noise_multiplier=sigma_reptile, sample_rate=rec.sample_rate, query_release=True,
        query_sample_rate=rec.sample_rate)
    assert compute_epsilon(steps=under, delta=rec.delta, accountant="rdp") > 4.0


@pytest.mark.filterwarnings("ignore:Optimal order is the")
def test_private_config_refuses_second_order_maml_under_record_dp(tmp_path):
    from common.config import ConfigError

    with pytest.raises(ConfigError, match="first_order"):
        private_config(load(COMPARE, overrides=["algorithm.name=maml", SHARED_HEAD]), level="record",
                       target_epsilon=8.0, num_sites=30, ledger_dir=tmp_path)
    config = private_config(load(COMPARE, overrides=["algorithm.name=metasgd", "privacy.record.sample_rate=0.05",
                                                     SHARED_HEAD]),
                            level="record", target_epsilon=8.0, num_sites=30, ledger_dir=tmp_path)
    assert config.privacy.record.enabled and config.algorithm.name == "metasgd"


SMOKE = ROOT / "simulations" / "configs" / "smoke.yaml"


@pytest.mark.parametrize("overrides, epsilons, named", [
    # The non-private run would be fine; the record-level ones are not (prototype heads are refused under DP).
    (["algorithm.head_init=prototypes"], "inf,8", "head_init=prototypes"),
    # The first target fits the simulated sites' policy, the second does not.
    (["site_privacy.require_record_dp=true", "site_privacy.max_epsilon=4"], "2,8", "allows at most 4"),
])
def test_privacy_sweep_refuses_a_level_that_cannot_run_before_any_run(tmp_path, capsys, overrides, epsilons, named):
    from simulations import cli

    out = tmp_path / "out"
    args = ["privacy-sweep", "--config", str(SMOKE), "--epsilons", epsilons, "--levels", "record",
            "--set", f"data.root={tmp_path / 'data'}", "--set", f"output_dir={out}"]
    for item in overrides:
        args += ["--set", item]
    assert cli.main(args) == cli.EXIT_USAGE
    assert named in capsys.readouterr().err
    assert not list(out.rglob("metrics.jsonl"))  # nothing ran


def test_a_private_run_that_fails_is_a_row_of_the_table_and_the_sweep_exits_1(tmp_path, capsys):
    """A diverged private run is a result: its row (last meta-test, status, reason) is written, the rest still run."""
    import json

    out = tmp_path / "out"
    # Every reply is past the absolute update bound, so no round has a valid update: the run ends as failed.
    # A subprocess: the runs start Flower, whose logging setup must not leak into later tests.
    args = ["privacy-sweep", "--config", str(SMOKE), "--epsilons", "8,4", "--levels", "client",
            "--set", f"data.root={tmp_path / 'data'}", "--set", f"output_dir={out}",
            "--set", "replies.max_update_norm=1e-12", "--set", "federation.rounds=2"]
    proc = subprocess.run([sys.executable, "-m", "simulations.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "2 of 2 runs ended as failed" in proc.stderr
    (table,) = out.rglob("privacy_sweep.json")
    rows = json.loads(table.read_text())
    assert [(r["level"], r["target_epsilon"], r["status"]) for r in rows] == [("client", 8.0, "failed"),
                                                                             ("client", 4.0, "failed")]
    assert all("no valid site update" in r["reason"] and 0.0 <= r["accuracy"] <= 1.0 for r in rows)
    text = (table.parent / "privacy_sweep.md").read_text()
    assert "| failed |" in text and "Failed runs" in text
