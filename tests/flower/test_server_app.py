"""The ServerApp's run logic in one process: a stand-in Grid hands messages to the real ClientApp.

No Ray: fast checks of what the simulations also cover, plus the deployment
path where the server holds no held-out sites and evaluates at the sites.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
import json
import shutil

import pytest
import torch
from flwr.app import Context, RecordDict

from client.client_app import make_client_app
from server import checkpoint
from server.server_app import MetaRun


class InProcessGrid:
    """Nodes 11, 12, ... are partitions 0, 1, ...; messages run the ClientApp right here."""

    def __init__(self, client_app, num_nodes: int) -> None:
        self.app = client_app
        self.contexts = {
            11 + i: Context(run_id=7, node_id=11 + i, node_config={"partition-id": i, "num-partitions": num_nodes},
                            state=RecordDict(), run_config={})
            for i in range(num_nodes)
        }
        self.sent: list[str] = []

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            self.sent.append(msg.metadata.message_type)
            reply = self.app(msg, self.contexts[msg.metadata.dst_node_id])
            replies.append(reply)
        return replies


@pytest.fixture
def config(smoke_config, smoke_data):
    return dataclasses.replace(
        smoke_config, data=dataclasses.replace(smoke_config.data, root=str(smoke_data), generate=False)
    )


def run(config, run_dir, *, resume=False, nodes=3):
    lines = []
    grid = InProcessGrid(make_client_app(config), nodes)
    summary = MetaRun(config, run_dir, resume=resume, on_round=lines.append).execute(grid)
    return summary, lines, grid


def test_server_run_writes_metrics_checkpoints_and_summary(config, tmp_path):
    summary, progress, grid = run(config, tmp_path / "run")
    assert summary["status"] == "completed" and summary["rounds"] == 2
    assert len(progress) == 2 and progress[0].startswith("round 1/2 | sites 3/3")
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [1, 2]
    assert "meta_test" in lines[0] and "without_image" not in lines[0]["meta_test"]  # ablations: last round only
    assert "without_image" in lines[1]["meta_test"] and "raw_1nn" not in lines[0]["meta_test"]
    assert 0.0 <= lines[1]["meta_test"]["raw_1nn"] <= 1.0  # the no-learning reference, same episodes
    assert "federated_eval" not in lines[0]
    assert grid.sent.count("query") == 3 and grid.sent.count("train") == 6 and "evaluate" not in grid.sent


def test_without_held_out_sites_the_sites_evaluate(config, smoke_data, tmp_path):
    """Deployment: no data.root/test on the server, so evaluation is federated."""
    root = tmp_path / "data"
    shutil.copytree(smoke_data / "train", root / "train")
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, root=str(root)))
    summary, _, grid = run(config, tmp_path / "run")
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for line in lines:
        fe = line["federated_eval"]
        assert fe["sites_replied"] == 3 and 0.0 <= fe["accuracy"] <= 1.0 and fe["episodes"] >= 3
        assert "meta_test" not in line
    assert grid.sent.count("evaluate") == 6
    assert summary["final_meta_test"]["federated"] is True


def test_without_held_out_sites_a_private_run_asks_no_site_to_evaluate(config, smoke_data, tmp_path):
    """Record-level DP sites release only noised weights: no federated evaluation of their records."""
    root = tmp_path / "data"
    shutil.copytree(smoke_data / "train", root / "train")
    private = dataclasses.replace(
        config, data=dataclasses.replace(config.data, root=str(root)),
        federation=dataclasses.replace(config.federation, rounds=1),
        privacy=dataclasses.replace(config.privacy, record=dataclasses.replace(config.privacy.record, enabled=True)),
        site_privacy=dataclasses.replace(config.site_privacy, ledger_dir=str(tmp_path / "ledgers")),
    )
    summary, _, grid = run(private, tmp_path / "run")
    (line,) = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert line["sites_replied"] == 3 and "federated_eval" not in line
    assert "evaluate" not in grid.sent and summary["status"] == "completed"


def test_resume_in_process_matches(config, tmp_path):
    four = dataclasses.replace(config, federation=dataclasses.replace(config.federation, rounds=4, eval_every=4))
    run(four, tmp_path / "full")
    two = dataclasses.replace(four, federation=dataclasses.replace(four.federation, rounds=2))
    run(two, tmp_path / "part")
    summary, progress, _ = run(four, tmp_path / "part", resume=True)
    assert progress[0].startswith("round 3/4") and summary["rounds"] == 4
    a = torch.load(tmp_path / "full" / "final_params.pt", weights_only=True)
    b = torch.load(tmp_path / "part" / "final_params.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert checkpoint.load_latest(tmp_path / "part")[0].round == 4


def test_resume_with_another_model_is_refused(config, tmp_path):
    run(config, tmp_path / "run")
    other = dataclasses.replace(config, model=dataclasses.replace(config.model, hidden=12))
    with pytest.raises(ValueError, match="does not fit this model config"):
        run(other, tmp_path / "run", resume=True)


def test_record_level_dp_reports_epsilon_and_a_site_past_its_budget_refuses(config, tmp_path):
    """Record-level DP through the apps: epsilon comes back; a site whose ledger is full answers with an error."""
    ledger = tmp_path / "ledgers"
    private = dataclasses.replace(
        config,
        federation=dataclasses.replace(config.federation, rounds=1, eval_episodes=2),
        privacy=dataclasses.replace(
            config.privacy,
            record=dataclasses.replace(config.privacy.record, enabled=True, noise_multiplier=1.0),
        ),
        site_privacy=dataclasses.replace(config.site_privacy, ledger_dir=str(ledger)),
    )
    run(private, tmp_path / "first")
    (line,) = [json.loads(x) for x in (tmp_path / "first" / "metrics.jsonl").read_text().splitlines()]
    assert line["sites_replied"] == 3
    eps = line["train"]["epsilon_max"]
    assert eps > 0 and line["train"]["epsilon"] <= eps
    assert 0 < line["train"]["epsilon_median"] <= eps
    assert len(list(ledger.glob("*.json"))) == 3  # one ledger per site

    # Another run against the same ledgers, with a budget the next round would exceed.
    capped = dataclasses.replace(private, privacy=dataclasses.replace(
        private.privacy, record=dataclasses.replace(private.privacy.record, max_epsilon=eps * 1.2)))
    summary, _, _ = run(capped, tmp_path / "second")
    (line,) = [json.loads(x) for x in (tmp_path / "second" / "metrics.jsonl").read_text().splitlines()]
    assert (line["sites_failed"], line["sites_replied"]) == (3, 0)
    assert all("refuses to train" in f["reason"] for f in line["failures"])
    # No round had a valid update: the run says it failed, and why.
    assert summary["status"] == "failed" and "no valid site update" in summary["reason"]


def test_client_level_dp_run_reports_cumulative_epsilon(config, tmp_path):
    private = dataclasses.replace(
        config,
        federation=dataclasses.replace(config.federation, fraction=0.6, poisson=True, eval_every=2),
        privacy=dataclasses.replace(
            config.privacy, client=dataclasses.replace(config.privacy.client, enabled=True, noise_multiplier=1.1)),
    )
    run(private, tmp_path / "run")
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    eps = [line["privacy"]["client_epsilon"] for line in lines]
    assert 0 < eps[0] < eps[1] < float("inf")
    assert all(line["privacy"]["client_sample_rate"] == 0.6 for line in lines)
    state, _ = checkpoint.load_latest(tmp_path / "run")
    assert sum(count for _, _, count in state.aggregator_state["accountant"]["history"]) == 2


def test_client_level_dp_resumes_bit_identically_and_keeps_its_key_out_of_shared_files(config, tmp_path):
    """The noise key lives in the checkpoints only; the resumed run draws the same noise and sampling."""
    private = dataclasses.replace(
        config,
        federation=dataclasses.replace(config.federation, rounds=3, fraction=0.6, poisson=True, eval_every=3,
                                       checkpoint_every=2),
        privacy=dataclasses.replace(
            config.privacy, client=dataclasses.replace(config.privacy.client, enabled=True, noise_multiplier=1.1)),
    )
    run(private, tmp_path / "full")
    interrupted = tmp_path / "interrupted"
    shutil.copytree(tmp_path / "full", interrupted)
    shutil.rmtree(interrupted / "checkpoints" / "round-000003")
    (interrupted / "final_params.pt").unlink()
    run(private, interrupted, resume=True)
    a = torch.load(tmp_path / "full" / "final_params.pt", weights_only=True)
    b = torch.load(interrupted / "final_params.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    key = checkpoint.load_latest(tmp_path / "full")[0].secret_key
    assert checkpoint.load_latest(interrupted)[0].secret_key == key
    for name in ("config.yaml", "metrics.jsonl", "summary.json"):
        data = (tmp_path / "full" / name).read_bytes()
        assert key.hex().encode() not in data and key not in data, name


class DeployedGrid(InProcessGrid):
    """Nodes 21, 22, ... serve the site folders their node config names (``data-path``), as deployed."""

    def __init__(self, client_app, folders) -> None:
        self.app = client_app
        self.contexts = {
            21 + i: Context(run_id=7, node_id=21 + i, node_config={"data-path": str(folder)},
                            state=RecordDict(), run_config={})
            for i, folder in enumerate(folders)
        }
        self.sent = []


def deployed(config, tmp_path, **federation):
    return dataclasses.replace(
        config, output_dir=str(tmp_path / "runs"),
        data=dataclasses.replace(config.data, root=str(tmp_path / "nowhere"), generate=True),
        federation=dataclasses.replace(config.federation, mode="deployment", **federation),
    )


def test_deployment_mode_generates_nothing_and_meta_tests_on_the_held_out_sites_named(config, smoke_data, tmp_path):
    """federation.mode=deployment: no benchmark written, the registered sites train, data.test_paths meta-test."""
    cfg = deployed(config, tmp_path, min_sites=2, sites_per_round=2)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, test_paths=(str(smoke_data / "test" / "site-0001"),)))
    grid = DeployedGrid(make_client_app(cfg), [smoke_data / "train" / "site-0000", smoke_data / "train" / "site-0002"])
    summary = MetaRun(cfg, tmp_path / "runs" / "r").execute(grid)
    assert summary["status"] == "completed"
    assert not (tmp_path / "nowhere").exists()  # data.generate is ignored: the sites hold the data
    lines = [json.loads(x) for x in (tmp_path / "runs" / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [(line["sites_sampled"], line["sites_replied"]) for line in lines] == [(2, 2), (2, 2)]
    assert set(lines[-1]["meta_test"]["per_site"]) == {"test-0001"}
    assert "evaluate" not in grid.sent


def test_deployment_mode_without_test_paths_evaluates_at_the_sites(config, smoke_data, tmp_path):
    """The server's own data root is not looked at in deployment, even when it has held-out sites."""
    cfg = deployed(config, tmp_path, min_sites=2, sites_per_round=2)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=str(smoke_data), generate=False))
    grid = DeployedGrid(make_client_app(cfg), [smoke_data / "train" / "site-0000", smoke_data / "train" / "site-0001"])
    MetaRun(cfg, tmp_path / "runs" / "r").execute(grid)
    lines = [json.loads(x) for x in (tmp_path / "runs" / "r" / "metrics.jsonl").read_text().splitlines()]
    assert all("meta_test" not in line and line["federated_eval"]["sites_replied"] == 2 for line in lines)


def test_deployment_mode_waits_for_min_sites_then_says_so(config, smoke_data, tmp_path):
    cfg = deployed(config, tmp_path, min_sites=3, discovery_timeout=1.0)
    grid = DeployedGrid(make_client_app(cfg), [smoke_data / "train" / "site-0000"])
    with pytest.raises(TimeoutError, match="only 1 of 3 sites connected"):
        MetaRun(cfg, tmp_path / "runs" / "r").execute(grid)


def test_deployment_mode_needs_an_absolute_output_dir():
    from common.config import ConfigError, from_dict

    with pytest.raises(ConfigError, match="absolute output_dir"):
        from_dict({}, {"federation.mode": "deployment", "output_dir": "runs"})


def test_a_submitted_runs_directory_is_named_under_output_dir(tmp_path):
    from common.config import ConfigError, from_dict
    from server.server_app import run_dir_from_run_config

    cfg = from_dict({}, {"federation.mode": "deployment", "output_dir": str(tmp_path)})
    assert run_dir_from_run_config(cfg, {"run-name": "a"}) == (tmp_path / "a", False)
    assert run_dir_from_run_config(cfg, {"resume": "a", "run-name": ""}) == (tmp_path / "a", True)
    assert run_dir_from_run_config(cfg, {"resume": str(tmp_path / "b")}) == (tmp_path / "b", True)
    assert run_dir_from_run_config(cfg, {}) == (None, False)
    with pytest.raises(ConfigError, match="folder name"):
        run_dir_from_run_config(cfg, {"run-name": "../elsewhere"})
    simulated = from_dict({}, {"output_dir": str(tmp_path)})
    assert run_dir_from_run_config(simulated, {"resume": "runs/x"}) == (Path("runs/x"), True)


def test_a_resubmitted_deployment_run_without_a_checkpoint_starts_at_round_0(config, smoke_data, tmp_path):
    cfg = deployed(config, tmp_path, min_sites=2, sites_per_round=2, rounds=1)
    grid = DeployedGrid(make_client_app(cfg), [smoke_data / "train" / "site-0000", smoke_data / "train" / "site-0001"])
    summary = MetaRun(cfg, tmp_path / "runs" / "r", resume=True).execute(grid)
    assert summary["status"] == "completed" and summary["rounds"] == 1


def test_a_relative_config_file_is_read_inside_the_app(monkeypatch, tmp_path):
    """Flower runs the app from a folder of its choosing: a relative config-file is the app's own file."""
    from client.sites import config_from_run_config

    monkeypatch.chdir(tmp_path)
    assert config_from_run_config({"config-file": "simulations/configs/smoke.yaml"}).name == "smoke"
