"""Attacks on the DP mechanisms by a server that uses only what it legitimately holds.

The "server" here has the messages it sent (weights, round seed), the replies,
the config, and the code every party runs. Each attack works against a
mechanism whose noise, coins or normalizer it can rebuild; these tests say it
no longer does.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict
from flwr.common import serde

from client import wire
from client.client_app import make_client_app
from common import tree
from common.data import load_site, write_site
from common.task import Task
from server.server_app import MetaRun, format_progress
from tests.flower.test_client_app import train_message
from tests.flower.test_server_app import InProcessGrid


def private_config(smoke_config, smoke_data, ledgers, *, reproducible_noise=False, **record):
    values = {"enabled": True, "noise_multiplier": 2.0, "clip_norm": 1.0, "sample_rate": 0.5, **record}
    return dataclasses.replace(
        smoke_config,
        data=dataclasses.replace(smoke_config.data, root=str(smoke_data), generate=False),
        federation=dataclasses.replace(smoke_config.federation, rounds=1, eval_episodes=2),
        privacy=dataclasses.replace(smoke_config.privacy,
                                    record=dataclasses.replace(smoke_config.privacy.record, **values)),
        site_privacy=dataclasses.replace(smoke_config.site_privacy, ledger_dir=str(ledgers),
                                         reproducible_noise=reproducible_noise),
    )


def node_config(config, site_dir):
    """A deployed site's node config: its data, and its own policy (ledger, reproducibility)."""
    policy = config.site_privacy
    return {"data-path": str(site_dir), "privacy-ledger-dir": policy.ledger_dir,
            "privacy-reproducible-noise": policy.reproducible_noise}


def site_reply(config, theta, site_dir, seed):
    """The real ClientApp handler at the node serving ``site_dir``: the weights it sends back, its metrics."""
    app = make_client_app(config)
    context = Context(run_id=7, node_id=1, node_config=node_config(config, site_dir), state=RecordDict(),
                      run_config={})
    out = app(train_message(config, theta, seed=seed), context)
    assert not out.has_error(), out.error.reason if out.has_error() else ""
    return wire.record_to_tree(out.content[wire.ARRAYS]), dict(out.content[wire.METRICS])


def rebuilt_by_the_server(config, theta, site_dir, seed, ledgers):
    """The server's reconstruction: the site's own code, run on the site's records with the seed it sent.

    Its best guess derives the noise and the coins from that seed, as the
    site's reproducible mode does.
    """
    attacker = dataclasses.replace(config, site_privacy=dataclasses.replace(
        config.site_privacy, ledger_dir=str(ledgers), reproducible_noise=True))
    task = Task(attacker)
    message = train_message(config, theta, seed=seed)
    round_config = dict(message.content[wire.CONFIG])
    return task.train_on_site(theta, task.load_site(site_dir), round_config=round_config,
                              generator=torch.Generator().manual_seed(seed)).params


def distance(a, b):
    return float(tree.global_norm(tree.sub(a, b)))


def test_the_server_cannot_rebuild_a_sites_record_level_noise(smoke_config, smoke_data, tmp_path):
    """Finding 1: knowing the round seed and every record, the server rebuilds the reply only in reproducible mode.

    The noise-free part of the reply is what the server wants; with the noise
    and coins rebuilt it gets it exactly (residual 0 where the noise moves the
    weights by ``noise_norm``). With secret randomness the residual is of the
    order of the noise itself.
    """
    site_dir = smoke_data / "train" / "site-0000"
    config = private_config(smoke_config, smoke_data, tmp_path / "site-ledgers")
    theta = Task(config).initial_parameters(seed=0)
    phi, metrics = site_reply(config, theta, site_dir, seed=11)
    guess = rebuilt_by_the_server(config, theta, site_dir, 11, tmp_path / "server-ledgers")
    quiet = dataclasses.replace(config, privacy=dataclasses.replace(
        config.privacy, record=dataclasses.replace(config.privacy.record, noise_multiplier=0.0)))
    noise_norm = distance(guess, rebuilt_by_the_server(quiet, theta, site_dir, 11, tmp_path / "quiet-ledgers"))
    residual = distance(phi, guess)
    assert noise_norm > 1e-3
    assert residual > 0.5 * noise_norm, (residual, noise_norm)
    assert "dp_reproducible_noise" not in metrics

    # The explicit site-side reproducible mode: the attack works, and the reply says so.
    open_config = private_config(smoke_config, smoke_data, tmp_path / "site-ledgers", reproducible_noise=True)
    phi, metrics = site_reply(open_config, theta, site_dir, seed=11)
    guess = rebuilt_by_the_server(open_config, theta, site_dir, 11, tmp_path / "server-ledgers")
    assert distance(phi, guess) < 1e-6 * noise_norm
    assert metrics["dp_reproducible_noise"] == 1.0


def site_plus_one_record(site_dir, out):
    """A copy of the site with one more record: a duplicate of its first record of class 0."""
    site = load_site(site_dir)
    extra = int(site.class_index[0][0])
    take = np.concatenate([np.arange(len(site.labels)), [extra]])
    return write_site(out, arrays={m: a[take] for m, a in site.arrays.items()}, labels=site.labels[take],
                      class_names=site.class_names, masks={m: k[take] for m, k in site.masks.items()},
                      specs=site.specs, site_id=site.site_id, provenance={"from": str(site_dir)})


@pytest.mark.parametrize("algorithm", ["reptile", "fomaml"])
def test_the_noise_scale_does_not_reveal_the_number_of_records(smoke_config, smoke_data, tmp_path, algorithm):
    """Finding 4: same seed, same noise, a large sigma: D and D plus one record give updates of the same size.

    The update is then almost all noise, ``sigma * C * z / divisor``; with a
    divisor that counts the records of the episode's classes, one more record
    shrinks it by about one part in the pool size (here ~10%).
    """
    d = shutil.copytree(smoke_data / "train" / "site-0001", tmp_path / "d")
    d_plus = site_plus_one_record(d, tmp_path / "d-plus")
    config = private_config(smoke_config, smoke_data, tmp_path / "ledgers", noise_multiplier=100.0,
                            reproducible_noise=True)
    config = dataclasses.replace(config, algorithm=dataclasses.replace(config.algorithm, name=algorithm),
                                 episodes=dataclasses.replace(config.episodes, episodes_per_round=8))
    theta = Task(config).initial_parameters(seed=0)
    sizes = []
    for site_dir in (d, d_plus):
        phi, _ = site_reply(config, theta, site_dir, seed=5)
        sizes.append(distance(phi, theta))
    assert sizes[0] > 1.0  # the noise dominates
    assert sizes[1] / sizes[0] == pytest.approx(1.0, abs=2e-4), sizes


class WireGrid(InProcessGrid):
    """As InProcessGrid, but every message, both ways, goes through Flower's protobuf serialization.

    That is what the gRPC links carry under ``flwr run`` (ServerApp to
    SuperLink, SuperLink to SuperNode): a value the wire format cannot hold,
    or that Flower's records refuse, would not reach the server.
    """

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            msg = serde.message_from_proto(serde.message_to_proto(msg))
            self.sent.append(msg.metadata.message_type)
            reply = self.app(msg, self.contexts[msg.metadata.dst_node_id])
            replies.append(serde.message_from_proto(serde.message_to_proto(reply)))
        return replies


@pytest.mark.parametrize("grid", [InProcessGrid, WireGrid])
def test_an_infinite_epsilon_is_reported_as_infinity_everywhere(smoke_config, smoke_data, tmp_path, grid):
    """Finding 6: sigma = 0 gives no guarantee; the reply, metrics.jsonl, progress line and summary say inf."""
    config = private_config(smoke_config, smoke_data, tmp_path / "ledgers", noise_multiplier=0.0)
    theta = Task(config).initial_parameters(seed=0)
    _, metrics = site_reply(config, theta, smoke_data / "train" / "site-0002", seed=3)
    assert metrics["epsilon"] == math.inf

    lines: list[str] = []
    summary = MetaRun(config, tmp_path / "run", on_round=lines.append).execute(grid(make_client_app(config), 3))
    (line,) = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert line["sites_replied"] == 3
    assert line["train"]["epsilon_max"] == math.inf and line["train"]["epsilon_median"] == math.inf
    assert "record epsilon max inf" in lines[0]
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    for report in (summary["privacy"], on_disk["privacy"]):
        assert report["record_epsilon_max"] == math.inf and report["private"] is False


@pytest.mark.slow
@pytest.mark.integration
def test_an_infinite_epsilon_survives_a_real_flower_simulation(smoke_data, tmp_path):
    """Finding 6 through ``metafed simulate``: Flower's simulation engine and Ray workers, one round, sigma = 0."""
    from tests.flower.test_simulation import metrics as read_metrics
    from tests.flower.test_simulation import simulate

    proc, run_dir = simulate(
        tmp_path / "runs", smoke_data, "--set", "federation.rounds=1", "--set", "federation.eval_episodes=2",
        "--set", "privacy.record.enabled=true", "--set", "privacy.record.noise_multiplier=0",
        "--set", "privacy.record.clip_norm=1", "--set", "privacy.record.sample_rate=0.5",
        "--set", f"site_privacy.ledger_dir={tmp_path / 'ledgers'}",
    )
    (line,) = read_metrics(run_dir)
    assert line["sites_replied"] == 3
    assert line["train"]["epsilon_max"] == math.inf and line["train"]["epsilon_median"] == math.inf
    assert "record epsilon max inf" in proc.stdout
    summary = json.loads((run_dir / "summary.json").read_text())["privacy"]
    assert summary["record_epsilon_max"] == math.inf and summary["private"] is False


def test_a_reproducible_run_says_it_is_not_private_in_every_output(smoke_config, smoke_data, tmp_path):
    config = private_config(smoke_config, smoke_data, tmp_path / "ledgers", reproducible_noise=True)
    lines: list[str] = []
    MetaRun(config, tmp_path / "run", on_round=lines.append).execute(InProcessGrid(make_client_app(config), 3))
    (line,) = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "NOT PRIVATE" in line["not_private"] and 0 < line["train"]["epsilon_max"] < math.inf
    assert "NOT PRIVATE" in lines[0]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())["privacy"]
    assert summary["private"] is False and "NOT PRIVATE" in summary["not_private"]
    ledgers = sorted((tmp_path / "ledgers").glob("*.json"))
    assert len(ledgers) == 3
    for path in ledgers:
        assert all("NOT PRIVATE" in e["not_private"] for e in json.loads(path.read_text())["entries"])


def test_the_progress_line_shows_both_epsilons():
    line = {"round": 2, "sites_replied": 3, "sites_sampled": 3, "sites_failed": 0, "sites_invalid": 0,
            "train": {"epsilon_max": 1.2345}, "privacy": {"client_epsilon": math.inf}, "elapsed": 3.0}
    text = format_progress(line, 5, eta=None)
    assert "record epsilon max 1.23" in text and "client epsilon inf" in text and "NOT PRIVATE" not in text


# ------------------------------------------------------------------ client level


def client_dp_strategy(num_sites, dim):
    from common.algorithms import server_opt
    from common.config import from_dict
    from server.aggregation import make_aggregator
    from server.state import ServerState
    from server.strategy import MetaStrategy
    from tests.flower.test_strategy import FakeGrid

    config = from_dict({}, {
        "server_opt.name": "sgd", "server_opt.lr": 1.0, "federation.fraction": 0.5, "federation.poisson": True,
        "federation.seed": 4, "privacy.client.enabled": True, "privacy.client.noise_multiplier": 1.0,
        "privacy.client.clip_norm": 1.0,
    })
    params = {"w": torch.zeros(dim)}
    state = ServerState(params=params, opt_state=server_opt.init_state(params, config=config.server_opt))
    strategy = MetaStrategy(config, state, expected_nodes=num_sites, discovery_timeout=1.0,
                            aggregator=make_aggregator(config, secret_key=state.secret_key))
    return config, strategy, FakeGrid(num_sites)


def noise_derived_from_config(config, server_round, like):
    """How the server's noise and sampling were drawn from ``federation.seed``: what config.yaml gives away."""
    from common.privacy.clipping import draw_standard_noise
    from server.state import STREAM_TRAIN_SAMPLING, round_rng

    seed = config.federation.seed
    state = np.random.SeedSequence([seed, server_round, 0xD9]).generate_state(1, dtype=np.uint64)[0]
    noise = draw_standard_noise(like, generator=torch.Generator().manual_seed(int(state)))
    return noise, round_rng(seed, server_round, STREAM_TRAIN_SAMPLING)


def test_the_public_config_does_not_give_away_the_client_level_noise_or_sampling():
    """Finding 2: with config.yaml and two consecutive global models, the sum of the clipped updates stays hidden."""
    from common.privacy.clipping import clip_update
    from tests.flower.test_strategy import reply, send

    config, strategy, grid = client_dp_strategy(num_sites=200, dim=4000)
    theta0 = {k: v.clone() for k, v in strategy.state.params.items()}
    sent = send(strategy, grid, 1)
    updates = {node: {"w": torch.randn(4000, generator=torch.Generator().manual_seed(node)) * 0.05}
               for node in sent}
    strategy.aggregate_train(1, [reply(m, {"w": updates[n]["w"].numpy()}, 4) for n, m in sent.items()])
    theta1 = strategy.state.params
    true_sum = sum(clip_update(u, clip_norm=1.0)[0]["w"] for u in updates.values())

    # The adversary: theta1 - theta0 = (sum + z * S * noise) / (q * N), noise rebuilt from federation.seed.
    noise, sampling = noise_derived_from_config(config, 1, theta0)
    expected = config.federation.fraction * 200
    recovered = (theta1["w"] - theta0["w"]) * expected - 1.0 * 1.0 * noise["w"]
    noise_norm = float(torch.linalg.vector_norm(noise["w"]))  # ~ sqrt(4000), as the real noise's
    residual = float(torch.linalg.vector_norm(recovered - true_sum))
    assert residual > 0.5 * noise_norm, (residual, noise_norm)
    # ... nor which sites took part (what amplification by sampling hides).
    predicted = {site for site, keep in zip(sorted(grid.nodes.values()), sampling.random(200) < 0.5) if keep}
    assert {grid.nodes[n] for n in sent} != predicted
