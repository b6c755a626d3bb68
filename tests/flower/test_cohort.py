"""Cohort execution: one message per node naming its sites gives the model one site per node gives.

In one process (a stand-in Grid hands each message to the real ClientApp),
so the three ways of running a round are compared on the same seed:
per-site nodes found by the site query (deployment), per-site nodes told their
site (simulation), and cohorts of sites per node. The final parameters must
be equal: each site draws the same episodes from the same seed and runs the
same code, and the server sorts the replies by site id before it sums them,
so the tolerance is zero (the comparison is exact).
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from client import sites, wire
from client.client_app import make_client_app
from server.server_app import MetaRun
from tests.flower.conftest import SMOKE
from tests.flower.test_server_app import InProcessGrid


def _with(config, **sections):
    for name, values in sections.items():
        config = dataclasses.replace(config, **{name: dataclasses.replace(getattr(config, name), **values)})
    return config


@pytest.fixture(scope="module")
def train_only(smoke_data, tmp_path_factory):
    """The smoke sites without held-out ones: the server evaluates at the sites (in cohorts too)."""
    root = tmp_path_factory.mktemp("cohort") / "data"
    shutil.copytree(smoke_data / "train", root / "train")
    return root


@pytest.fixture
def config(smoke_config, train_only):
    return _with(smoke_config, data={"root": str(train_only), "generate": False})


def run(config, run_dir, *, mode: str, nodes: int):
    """mode: "query" (deployment's site query), "assigned" (simulation, one site per node), "cohort"."""
    site_ids = None if mode == "query" else list(sites.site_index(config.data.root).ids)
    config = _with(config, runtime={"cohort": mode == "cohort"})
    grid = InProcessGrid(make_client_app(config), nodes)
    summary = MetaRun(config, run_dir, expected_nodes=nodes, site_ids=site_ids).execute(grid)
    params = torch.load(run_dir / "final_params.pt")
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return summary, params, lines, grid


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_cohort_gives_the_per_site_model_with_one_message_per_node(config, tmp_path):
    _, queried, _, qgrid = run(config, tmp_path / "query", mode="query", nodes=3)
    _, assigned, alines, agrid = run(config, tmp_path / "assigned", mode="assigned", nodes=3)
    summary, cohort, lines, cgrid = run(config, tmp_path / "cohort", mode="cohort", nodes=2)
    assert summary["status"] == "completed"
    assert_same(queried, assigned)
    assert_same(queried, cohort)
    assert qgrid.sent.count("query") == 3
    assert "query" not in agrid.sent and "query" not in cgrid.sent  # simulation: no discovery round
    assert cgrid.sent.count("train") == 2 * 2  # 2 rounds, one message per node (3 sites over 2 nodes)
    assert cgrid.sent.count("evaluate") == 2 * 2  # federated evaluation in cohorts too
    assert all(line["sites_replied"] == 3 and line["sites_sampled"] == 3 for line in lines)
    assert [line["federated_eval"] for line in lines] == [line["federated_eval"] for line in alines]
    assert lines[-1]["federated_eval"]["sites_replied"] == 3


def test_a_bad_site_in_a_cohort_fails_alone(config, broken_data, tmp_path):
    """site-0003's labels are cut short: its part of the cohort reply is an error, the others count."""
    broken = _with(config, data={"root": str(broken_data)}, federation={"sites_per_round": 4})
    broken = _with(broken, federation={"rounds": 1})
    _, per_site, plines, _ = run(broken, tmp_path / "assigned", mode="assigned", nodes=4)
    _, cohort, clines, _ = run(broken, tmp_path / "cohort", mode="cohort", nodes=2)
    assert_same(per_site, cohort)
    for line in clines:
        assert (line["sites_sampled"], line["sites_replied"], line["sites_failed"]) == (4, 3, 1)
        (failure,) = line["failures"]
        assert failure["site"] == "site-0003" and failure["kind"] == "error" and "labels" in failure["reason"]
    assert [line["failures"] for line in plines] == [line["failures"] for line in clines]


def test_record_dp_in_a_cohort_keeps_each_sites_ledger_and_noise(config, tmp_path):
    """Each site of a cohort spends its own budget in its own ledger, with its own noise."""
    private = _with(config, federation={"rounds": 1},
                    privacy={"record": dataclasses.replace(config.privacy.record, enabled=True)})
    private = _with(private, site_privacy={"ledger_dir": str(tmp_path / "ledgers-a"), "reproducible_noise": True})
    _, per_site, plines, _ = run(private, tmp_path / "assigned", mode="assigned", nodes=3)
    private = _with(private, site_privacy={"ledger_dir": str(tmp_path / "ledgers-b")})
    _, cohort, clines, _ = run(private, tmp_path / "cohort", mode="cohort", nodes=2)
    assert_same(per_site, cohort)  # reproducible noise: drawn from each site's own seed
    assert len(list((tmp_path / "ledgers-b").glob("*.json"))) == 3  # one ledger per site
    assert clines[0]["train"]["epsilon_max"] == plines[0]["train"]["epsilon_max"] > 0


def test_robust_aggregation_runs_over_the_sites_of_cohorts(config, tmp_path):
    # federation.min_sites counts sites, not the cohort's 2 nodes
    median = _with(config, aggregation={"rule": "median"}, federation={"rounds": 1, "min_sites": 3})
    _, per_site, _, _ = run(median, tmp_path / "assigned", mode="assigned", nodes=3)
    _, cohort, _, _ = run(median, tmp_path / "cohort", mode="cohort", nodes=2)
    assert_same(per_site, cohort)


def test_a_deployed_node_refuses_a_cohort_instruction(config, tmp_path, smoke_data):
    app = make_client_app(config)
    theta = wire.tree_to_record({"w": torch.zeros(2)})
    msg = Message(RecordDict({wire.ARRAYS: theta, wire.CONFIG: ConfigRecord(
        {"round": 1, wire.COHORT_SITES: ["site-0000"], wire.COHORT_SEEDS: [1]})}),
        dst_node_id=1, message_type=MessageType.TRAIN)
    ctx = Context(run_id=7, node_id=1, node_config={"data-path": str(smoke_data / "train" / "site-0000")},
                  state=RecordDict(), run_config={})
    out = app(msg, ctx)
    assert out.has_error() and "simulated nodes only" in out.error.reason


def test_no_cluster_at_the_ray_address_is_bad_input(config, tmp_path):
    """Found before Ray starts or a run directory is made: exit code 2 and what to do."""
    import socket

    from simulations import cli

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    code = cli.main(["simulate", "--config", str(SMOKE), "--set", f"data.root={config.data.root}",
                     "--set", f"output_dir={tmp_path}", "--ray-address", f"127.0.0.1:{port}"])
    assert code == cli.EXIT_USAGE and not list(tmp_path.iterdir())


def test_a_malformed_ray_address_is_bad_input():
    from common.config import ConfigError
    from simulations.runner import check_ray_address

    with pytest.raises(ConfigError, match="expected host:port"):
        check_ray_address("localhost")


def test_the_site_index_keys_sites_by_their_manifest_site_id(smoke_data):
    """One identifier per site: the index (built once, in a worker thread as Ray runs it) uses manifest ids."""
    import threading

    from common.config import load
    from common.data.site import read_manifest

    root = smoke_data.parent / "index-copy"
    shutil.copytree(smoke_data, root)  # a root no other test has indexed in this process
    built: list = []
    worker = threading.Thread(target=lambda: built.append(sites.site_index(root)), daemon=True)
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), "building the site index blocked"
    (index,) = built
    declared = [str(read_manifest(p)["site_id"]) for p in index.paths]
    assert list(index.ids) == declared and set(index.by_name) == set(declared)
    assert [p.name for p in index.paths] == sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    config = load(SMOKE, overrides={"data.root": str(root), "data.generate": False})
    ref = sites.site_ref(config, {"partition-id": 0}, site_id=declared[1])
    assert (ref.site_id, ref.path) == (declared[1], index.paths[1])
    assert sites.site_ref(config, {"partition-id": 1}).site_id == declared[1]
