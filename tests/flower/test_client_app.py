"""The ClientApp's handlers, called directly with real Flower messages and the real engine."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from client import wire
from client.client_app import make_client_app
from common.task import Task
from server.state import STREAM_SITE, derived_seed

SMOKE = Path(__file__).resolve().parents[2] / "simulations" / "configs" / "smoke.yaml"


@pytest.fixture(scope="module")
def setup(smoke_data, smoke_config):
    config = dataclasses.replace(smoke_config, data=dataclasses.replace(smoke_config.data, root=str(smoke_data)))
    task = Task(config)
    theta = task.initial_parameters(seed=0)
    return config, theta


def context(node_config, run_config=None):
    return Context(run_id=7, node_id=1, node_config=node_config, state=RecordDict(), run_config=run_config or {})


def instruction(kind, theta, **config):
    return Message(
        RecordDict({wire.ARRAYS: wire.tree_to_record(theta), wire.CONFIG: ConfigRecord(config)}),
        dst_node_id=1, message_type=kind,
    )


def train_message(config, theta, seed=11):
    c = config
    return instruction(
        MessageType.TRAIN, theta, round=1, inner_steps=c.algorithm.inner_steps, inner_lr=c.algorithm.inner_lr,
        ways=c.episodes.ways, shots=c.episodes.effective_train_shots, query_shots=c.episodes.query_shots,
        episodes=c.episodes.episodes_per_round, seed=seed,
    )


def test_train_replies_with_adapted_weights_and_episode_count(setup):
    config, theta = setup
    app = make_client_app(config)
    out = app(train_message(config, theta), context({"partition-id": 1, "num-partitions": 3}))
    assert not out.has_error(), out.error.reason if out.has_error() else ""
    phi = wire.record_to_tree(out.content[wire.ARRAYS])
    assert list(phi) == list(theta)  # names kept, same order
    assert all(phi[k].shape == theta[k].shape and phi[k].dtype == theta[k].dtype for k in theta)
    assert any(not torch.equal(phi[k], theta[k]) for k in theta)  # it adapted
    metrics = out.content[wire.METRICS]
    assert metrics[wire.NUM_EXAMPLES] == config.episodes.episodes_per_round
    assert isinstance(metrics[wire.NUM_EXAMPLES], int)
    assert set(out.content.array_records) == {wire.ARRAYS}  # arrays never in metrics
    assert all(isinstance(v, float) for k, v in metrics.items() if k != wire.NUM_EXAMPLES)


def test_train_is_a_function_of_the_seed(setup):
    config, theta = setup
    app = make_client_app(config)
    ctx = context({"partition-id": 0, "num-partitions": 3})
    a = wire.record_to_tree(app(train_message(config, theta, seed=5), ctx).content[wire.ARRAYS])
    b = wire.record_to_tree(app(train_message(config, theta, seed=5), ctx).content[wire.ARRAYS])
    c = wire.record_to_tree(app(train_message(config, theta, seed=6), ctx).content[wire.ARRAYS])
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_evaluate_adapts_and_scores_at_the_site(setup):
    config, theta = setup
    app = make_client_app(config)
    msg = instruction(MessageType.EVALUATE, theta, round=1, episodes=3, seed=derived_seed(0, 1, STREAM_SITE, "x"))
    out = app(msg, context({"partition-id": 2, "num-partitions": 3}))
    assert not out.has_error(), out.error.reason if out.has_error() else ""
    metrics = out.content[wire.METRICS]
    assert metrics[wire.NUM_EXAMPLES] == 3
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["loss"] > 0
    assert not out.content.array_records


def test_query_names_the_site(setup):
    config, theta = setup
    app = make_client_app(config)
    q = Message(RecordDict({wire.CONFIG: ConfigRecord({})}), dst_node_id=1, message_type=MessageType.QUERY)
    out = app(q, context({"partition-id": 2, "num-partitions": 3}))
    assert out.content[wire.SITE][wire.SITE_ID] == "train-0002"  # the manifest's site id, not the folder's name


def test_deployment_site_from_data_path(setup, smoke_data):
    config, theta = setup
    app = make_client_app(config)
    out = app(train_message(config, theta), context({"data-path": str(smoke_data / "test" / "site-0001")}))
    assert not out.has_error()
    assert out.content[wire.METRICS][wire.NUM_EXAMPLES] == config.episodes.episodes_per_round


def test_invalid_site_answers_with_an_error_reply(setup, broken_data):
    config, theta = setup
    app = make_client_app(config)
    out = app(train_message(config, theta), context({"data-path": str(broken_data / "train" / "site-0003")}))
    assert out.has_error()
    assert "site-0003" in out.error.reason and "labels" in out.error.reason
    ev = app(instruction(MessageType.EVALUATE, theta, round=1, episodes=2, seed=1),
             context({"data-path": str(broken_data / "train" / "site-0003")}))
    assert ev.has_error()


def test_a_node_without_a_site_answers_with_an_error_reply(setup):
    config, theta = setup
    app = make_client_app(config)
    out = app(train_message(config, theta), context({"partition-id": 9, "num-partitions": 10}))
    assert out.has_error() and "partition-id 9 has no site" in out.error.reason
    out = app(train_message(config, theta), context({}))
    assert out.has_error() and "data-path" in out.error.reason


def test_config_from_flower_run_config(setup, smoke_data):
    """With no bound config (flwr run), the handler reads Flower's run config."""
    config, theta = setup
    app = make_client_app(None)
    run_config = {"config-file": str(SMOKE), "data.root": str(smoke_data), "resume": ""}
    out = app(train_message(config, theta), context({"partition-id": 0, "num-partitions": 3}, run_config))
    assert not out.has_error(), out.error.reason if out.has_error() else ""


def test_a_node_config_site_id_that_contradicts_the_manifest_is_refused(setup, smoke_data):
    """One site, one identifier: a node config ``site-id`` other than the manifest's is an error reply."""
    from client import sites

    config, _ = setup
    path = smoke_data / "train" / "site-0001"
    assert sites.site_ref(config, {"data-path": str(path)}).site_id == "train-0001"
    assert sites.site_ref(config, {"data-path": str(path), "site-id": "train-0001"}).path == path.resolve()
    wrong = sites.site_ref(config, {"data-path": str(path), "site-id": "hospital-a"})
    assert wrong.path is None and "train-0001" in wrong.problem and "hospital-a" in wrong.problem


def test_a_warm_site_answers_as_the_in_process_one_and_the_shim_imports_no_torch(setup, smoke_data, tmp_path):
    """The shim hands the message to the site's warm worker (started on demand) and returns its reply."""
    import subprocess
    import sys
    import time

    from client import shim_app
    from common.config import flatten

    config, theta = setup
    run_config = {k: ",".join(v) if isinstance(v, list) else v for k, v in flatten(config).items()}
    site = str(smoke_data / "train" / "site-0001")
    cold = make_client_app()(train_message(config, theta), context({"data-path": site}, run_config))
    node = {"data-path": site, "warm-worker": True, "worker-dir": str(tmp_path / "w"), "worker-idle-timeout": 120.0}
    app = shim_app.make_shim_app()
    try:
        q = Message(RecordDict({wire.CONFIG: ConfigRecord({})}), dst_node_id=1, message_type=MessageType.QUERY)
        assert app(q, context(node, run_config)).content[wire.SITE][wire.SITE_ID] == "train-0001"
        warm = app(train_message(config, theta), context(node, run_config))
        t0 = time.monotonic()
        again = app(train_message(config, theta), context(node, run_config))
        warm_seconds = time.monotonic() - t0
        assert not warm.has_error(), warm.error.reason if warm.has_error() else ""
        a, b, c = (wire.record_to_tree(m.content[wire.ARRAYS]) for m in (cold, warm, again))
        assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)
        assert warm.content[wire.REPLY]["round"] == 1 and warm.content[wire.METRICS][wire.NUM_EXAMPLES] == 4
        # A site whose folder is wrong answers through the worker with the site's error.
        bad = app(train_message(config, theta), context({**node, "data-path": str(tmp_path / "none")}, run_config))
        assert bad.has_error() and "none" in bad.error.reason
        print(f"warm train message: {warm_seconds:.2f}s")
    finally:
        assert shim_app.stop_worker(node)
        shim_app.stop_worker({**node, "data-path": str(tmp_path / "none")})
    imported = subprocess.run([sys.executable, "-c", "import sys, client.shim_app; print('torch' in sys.modules)"],
                              capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
    assert imported.stdout.strip() == "False", imported.stderr
