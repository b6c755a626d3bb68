"""A site's privacy policy is the site's: the run config (the server's) may tighten it, never loosen it.

Each attack goes through the real ClientApp handlers with real Flower
messages, as ``flwr run`` delivers them: the "server" controls the run config
and the instructions, the site controls its node config and policy file.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import yaml
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from client import wire
from client.client_app import make_client_app
from common.config import load
from common.privacy.accounting import compute_epsilon
from common.task import Task
from simulations import cli

SMOKE = Path(__file__).resolve().parents[2] / "simulations" / "configs" / "smoke.yaml"
SIGMA, Q, K, E, DELTA = 1.0, 0.5, 2, 4, 1e-5  # smoke: 2 inner steps, 4 episodes; default q and delta


def one_round(sigma=SIGMA):
    return [(sigma / math.sqrt(K), Q, E)]


def eps_of(rounds, sigma=SIGMA):
    return compute_epsilon(steps=one_round(sigma) * rounds, delta=DELTA, accountant="rdp")


@pytest.fixture(scope="module")
def theta(smoke_data):
    config = load(SMOKE, overrides={"data.root": str(smoke_data)})
    return Task(config).initial_parameters(seed=0)


@pytest.fixture
def site(smoke_data, tmp_path):
    """A deployed site: its data, its policy file, its ledger folder (all the site's own)."""
    data = tmp_path / "site-data"
    shutil.copytree(smoke_data / "train" / "site-0000", data)
    ledgers = tmp_path / "site-ledgers"
    policy = {
        "require_record_dp": True,
        "max_epsilon": (eps_of(1) + eps_of(2)) / 2,  # one round fits, two do not
        "min_noise_multiplier": 1.0,
        "ledger_dir": str(ledgers),
    }
    policy_file = tmp_path / "privacy.yaml"
    policy_file.write_text(yaml.safe_dump(policy))
    node_config = {"data-path": str(data), "privacy-policy": str(policy_file)}
    site_id = yaml.safe_load((data / "manifest.yaml").read_text())["site_id"]
    return node_config, ledgers / f"{site_id}.json", policy


def run_config(smoke_data, **overrides):
    """What the server submits with ``flwr run``: a config file and overrides."""
    rc = {"config-file": str(SMOKE), "data.root": str(smoke_data), "resume": ""}
    rc.update(overrides)
    return rc


def compliant(smoke_data, policy, **overrides):
    return run_config(smoke_data, **{"privacy.record.enabled": True,
                                     "privacy.record.max_epsilon": policy["max_epsilon"], **overrides})


def train(theta, node_config, rc, *, round=1):
    msg = Message(
        RecordDict({wire.ARRAYS: wire.tree_to_record(theta), wire.CONFIG: ConfigRecord(
            {"round": round, "inner_steps": K, "inner_lr": 0.1, "ways": 3, "shots": 1, "query_shots": 3,
             "episodes": E, "seed": 11 + round, "run_id": "r"})}),
        dst_node_id=1, message_type=MessageType.TRAIN,
    )
    ctx = Context(run_id=7, node_id=1, node_config=node_config, state=RecordDict(), run_config=rc)
    return make_client_app(None)(msg, ctx)


def evaluate(theta, node_config, rc, app=None):
    msg = Message(
        RecordDict({wire.ARRAYS: wire.tree_to_record(theta), wire.CONFIG: ConfigRecord(
            {"round": 1, "inner_steps": 3, "ways": 3, "shots": 1, "query_shots": 3, "episodes": 3, "seed": 5})}),
        dst_node_id=1, message_type=MessageType.EVALUATE,
    )
    ctx = Context(run_id=7, node_id=1, node_config=node_config, state=RecordDict(), run_config=rc)
    return (app or make_client_app(None))(msg, ctx)


def entries(ledger):
    return json.loads(ledger.read_text())["entries"] if ledger.exists() else []


def assert_refused(out, *words):
    assert out.has_error(), "the site trained"
    assert not out.has_content()  # no weights, no metrics
    for word in words:
        assert word in out.error.reason, out.error.reason


def test_a_compliant_run_trains_privately_within_the_site_budget(smoke_data, theta, site):
    node_config, ledger, policy = site
    out = train(theta, node_config, compliant(smoke_data, policy))
    assert not out.has_error(), out.error.reason if out.has_error() else ""
    metrics = out.content[wire.METRICS]
    assert metrics["epsilon"] == pytest.approx(eps_of(1), rel=1e-9) and metrics["noise_multiplier"] == SIGMA
    assert len(entries(ledger)) == 1  # the ledger is where the site's policy keeps it
    # The budget is the site's: the second round would pass it.
    assert_refused(train(theta, node_config, compliant(smoke_data, policy), round=2), "refuses to train")
    assert len(entries(ledger)) == 1


def test_the_run_config_cannot_lift_the_budget(smoke_data, theta, site):
    node_config, ledger, policy = site
    out = train(theta, node_config, run_config(smoke_data, **{"privacy.record.enabled": True,
                                                               "privacy.record.max_epsilon": math.inf}))
    assert_refused(out, "privacy.record.max_epsilon=inf", f"allows at most {policy['max_epsilon']:g}")
    # Nor through the site section of the run config: a deployed site reads its policy from its node config.
    lifted = compliant(smoke_data, policy, **{"site_privacy.max_epsilon": math.inf,
                                              "site_privacy.require_record_dp": False})
    assert not train(theta, node_config, lifted).has_error()
    assert_refused(train(theta, node_config, lifted, round=2), "refuses to train", "site_privacy.max_epsilon")
    assert len(entries(ledger)) == 1


def test_the_run_config_cannot_switch_record_dp_off(smoke_data, theta, site):
    node_config, ledger, _ = site
    out = train(theta, node_config, run_config(smoke_data))  # privacy.record.enabled stays false
    assert_refused(out, "privacy.record.enabled=false", "only under record-level DP")
    assert not ledger.exists()


def test_the_run_config_cannot_move_the_ledger(smoke_data, theta, site, tmp_path):
    node_config, ledger, policy = site
    empty = tmp_path / "empty-ledgers"
    empty.mkdir()
    assert not train(theta, node_config, compliant(smoke_data, policy)).has_error()
    # The old key is refused with where it went; the site section is not the run's to set.
    out = train(theta, node_config, compliant(smoke_data, policy, **{"privacy.record.ledger_dir": str(empty)}))
    assert_refused(out, "privacy.record.ledger_dir", "site_privacy.ledger_dir")
    moved = compliant(smoke_data, policy, **{"site_privacy.ledger_dir": str(empty)})
    assert_refused(train(theta, node_config, moved, round=2), "refuses to train")  # the site's ledger still counts
    assert list(empty.iterdir()) == [] and len(entries(ledger)) == 1


def test_a_request_for_stronger_privacy_is_honoured(smoke_data, theta, site):
    node_config, ledger, policy = site
    out = train(theta, node_config, compliant(smoke_data, policy, **{"privacy.record.noise_multiplier": 2.0}))
    assert not out.has_error(), out.error.reason if out.has_error() else ""
    assert out.content[wire.METRICS]["noise_multiplier"] == 2.0
    assert out.content[wire.METRICS]["epsilon"] == pytest.approx(eps_of(1, sigma=2.0), rel=1e-9)
    # A smaller maximum than the site's: the run's own limit stops the next round.
    small = compliant(smoke_data, policy, **{"privacy.record.noise_multiplier": 2.0,
                                             "privacy.record.max_epsilon": eps_of(1, sigma=2.0) * 1.01})
    assert_refused(train(theta, node_config, small, round=2), "refuses to train", "privacy.record.max_epsilon")
    # Less noise than the site's floor is a loosening.
    weak = compliant(smoke_data, policy, **{"privacy.record.noise_multiplier": 0.5})
    assert_refused(train(theta, node_config, weak, round=2), "privacy.record.noise_multiplier=0.5", "at least 1")
    assert len(entries(ledger)) == 1


def test_node_config_keys_set_the_policy_and_a_round_cap(smoke_data, theta, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(smoke_data / "train" / "site-0001", data)
    node_config = {"data-path": str(data), "privacy-require-record-dp": True,
                   "privacy-max-round-epsilon": eps_of(1) * 0.9}
    out = train(theta, node_config, run_config(smoke_data, **{"privacy.record.enabled": True}))
    assert_refused(out, "site_privacy.max_round_epsilon")
    out = train(theta, node_config, run_config(smoke_data, **{"privacy.record.enabled": True,
                                                               "privacy.record.noise_multiplier": 3.0}))
    assert not out.has_error(), out.error.reason if out.has_error() else ""
    assert (data / "privacy_ledger.json").is_file()  # no ledger_dir: next to the data
    # A policy that limits DP without requiring it, and an unknown key, are the site's errors, said clearly.
    bad = train(theta, {"data-path": str(data), "privacy-max-epsilon": 4.0}, run_config(smoke_data))
    assert_refused(bad, "set require_record_dp: true")
    bad = train(theta, {"data-path": str(data), "privacy-max-epsiln": 4.0}, run_config(smoke_data))
    assert_refused(bad, "privacy-max-epsiln", "privacy-max-epsilon")


def test_a_private_site_refuses_federated_evaluation(smoke_data, theta, site):
    node_config, _, policy = site
    for rc in (run_config(smoke_data), compliant(smoke_data, policy)):  # required by the site / asked by the run
        out = evaluate(theta, node_config, rc)
        assert out.has_error() and out.error.code == wire.PRIVATE_SITE_REFUSED
        assert "federated evaluation" in out.error.reason and not out.has_content()  # no accuracy, no loss
    # A simulated site under record-level DP (the config bound by `metafed simulate`) refuses too.
    bound = load(SMOKE, overrides={"data.root": str(smoke_data), "privacy.record.enabled": True})
    out = evaluate(theta, {"partition-id": 0, "num-partitions": 3}, {}, app=make_client_app(bound))
    assert out.has_error() and out.error.code == wire.PRIVATE_SITE_REFUSED
    # A site that is not private still evaluates.
    out = evaluate(theta, {"data-path": node_config["data-path"]}, run_config(smoke_data))
    assert not out.has_error() and 0.0 <= out.content[wire.METRICS]["accuracy"] <= 1.0


def test_a_simulated_site_takes_its_policy_from_the_config(smoke_data, theta):
    bound = load(SMOKE, overrides={"data.root": str(smoke_data), "site_privacy.require_record_dp": True})
    msg = Message(
        RecordDict({wire.ARRAYS: wire.tree_to_record(theta), wire.CONFIG: ConfigRecord(
            {"round": 1, "inner_steps": K, "inner_lr": 0.1, "ways": 3, "shots": 1, "query_shots": 3,
             "episodes": E, "seed": 1, "run_id": "r"})}),
        dst_node_id=1, message_type=MessageType.TRAIN,
    )
    ctx = Context(run_id=7, node_id=1, node_config={"partition-id": 0, "num-partitions": 3}, state=RecordDict(),
                  run_config={})
    out = make_client_app(bound)(msg, ctx)
    assert_refused(out, "privacy.record.enabled=false")
    # `metafed simulate` says so before starting anything: bad input, exit code 2.
    code = cli.main(["simulate", "--config", str(SMOKE), "--set", f"data.root={smoke_data}",
                     "--set", "site_privacy.require_record_dp=true"])
    assert code == cli.EXIT_USAGE


def test_a_site_that_refuses_the_request_is_left_out_and_the_run_goes_on(smoke_data, tmp_path):
    """The server's side of a refusal: that site's error reply is a failure of that site, every round, and no more."""
    from server.server_app import MetaRun
    from tests.flower.test_server_app import InProcessGrid

    config = load(SMOKE, overrides={"data.root": str(smoke_data), "data.generate": False, "federation.rounds": 2,
                                    "federation.eval_episodes": 2})  # privacy.record.enabled: false
    grid = InProcessGrid(make_client_app(config), 3)  # nodes 11, 12: partitions 0 and 1 (site-0000, site-0001)
    strict = {"data-path": str(smoke_data / "train" / "site-0002"), "privacy-require-record-dp": True,
              "privacy-ledger-dir": str(tmp_path / "ledgers")}
    grid.contexts[13] = Context(run_id=7, node_id=13, node_config=strict, state=RecordDict(), run_config={})
    summary = MetaRun(config, tmp_path / "run").execute(grid)
    assert summary["status"] == "completed" and summary["rounds"] == 2
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [1, 2]
    for line in lines:
        assert (line["sites_replied"], line["sites_failed"]) == (2, 1)
        (failure,) = line["failures"]
        assert "privacy.record.enabled=false" in failure["reason"] and "only under record-level DP" in failure["reason"]
    assert not (tmp_path / "ledgers").exists() or not any((tmp_path / "ledgers").iterdir())


def test_a_ledger_that_went_backwards_stops_the_site_until_it_is_reset(smoke_data, theta, site, capsys):
    node_config, ledger, policy = site
    policy_file = Path(node_config["privacy-policy"])
    policy_file.write_text(yaml.safe_dump({**policy, "max_epsilon": eps_of(3) * 1.01}))  # room for three rounds
    rc = run_config(smoke_data, **{"privacy.record.enabled": True, "privacy.record.max_epsilon": eps_of(3) * 1.01})
    assert not train(theta, node_config, rc, round=1).has_error()
    after_one = ledger.read_bytes()
    assert not train(theta, node_config, rc, round=2).has_error()
    complete = ledger.read_bytes()

    ledger.unlink()  # deleted
    assert_refused(train(theta, node_config, rc, round=3), "went backwards", "is missing", "metafed reset-ledger")
    emptied = json.loads(complete)
    emptied.update(history=[], entries=[])  # emptied, still a well-formed ledger
    ledger.write_text(json.dumps(emptied))
    assert_refused(train(theta, node_config, rc, round=3), "went backwards", "holds 0")
    ledger.write_bytes(after_one)  # an older copy put back
    assert_refused(train(theta, node_config, rc, round=3), "went backwards", "holds 1")
    ledger.write_bytes(complete)  # the real one put back: the site goes on
    out = train(theta, node_config, rc, round=3)
    assert not out.has_error() and out.content[wire.METRICS]["epsilon"] == pytest.approx(eps_of(3), rel=1e-9)

    ledger.unlink()
    assert cli.main(["reset-ledger", str(ledger)]) == cli.EXIT_USAGE  # asks for --yes
    assert "--yes" in capsys.readouterr().err
    assert_refused(train(theta, node_config, rc, round=4), "went backwards")
    assert cli.main(["reset-ledger", str(ledger), "--yes"]) == cli.EXIT_OK
    assert len(list(ledger.parent.glob("*.reset-*"))) == 1  # the receipt, kept aside
    out = train(theta, node_config, rc, round=4)
    assert not out.has_error(), out.error.reason if out.has_error() else ""
    assert out.content[wire.METRICS]["epsilon"] == pytest.approx(eps_of(1), rel=1e-9)  # a new budget, knowingly


def test_a_receipt_kept_elsewhere_notices_a_lost_ledger_folder(smoke_data, theta, site, tmp_path):
    node_config, ledger, policy = site
    state = tmp_path / "site-state"
    Path(node_config["privacy-policy"]).write_text(yaml.safe_dump({**policy, "state_dir": str(state)}))
    assert not train(theta, node_config, compliant(smoke_data, policy)).has_error()
    receipt = state / (ledger.name + ".receipt")
    assert receipt.is_file() and not ledger.with_name(ledger.name + ".receipt").exists()
    shutil.rmtree(ledger.parent)  # the whole ledger folder lost
    assert_refused(train(theta, node_config, compliant(smoke_data, policy), round=2), "went backwards")
    assert cli.main(["reset-ledger", str(ledger), "--receipt", str(receipt), "--yes"]) == cli.EXIT_OK
    assert not train(theta, node_config, compliant(smoke_data, policy), round=2).has_error()


def test_policy_logic_needs_no_flower():
    """The policy module is plain Python over the config: load, validate, compare."""
    import ast

    from client import privacy_policy
    from common.config import RecordDPConfig, SitePrivacyConfig

    tree = ast.parse(Path(privacy_policy.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not any(name.startswith("flwr") for name in imported)
    policy = SitePrivacyConfig(require_record_dp=True, max_epsilon=4.0, min_noise_multiplier=1.0)
    ok = RecordDPConfig(enabled=True, noise_multiplier=1.5, max_epsilon=2.0)
    assert privacy_policy.violations(ok, policy) == []
    loose = RecordDPConfig(enabled=True, noise_multiplier=0.8, max_epsilon=math.inf, delta=1e-3, accountant="prv")
    found = privacy_policy.violations(loose, policy)
    assert [v.split("=")[0] for v in found] == ["privacy.record.delta", "privacy.record.accountant",
                                                  "privacy.record.max_epsilon", "privacy.record.noise_multiplier"]
