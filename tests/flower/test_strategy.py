"""The meta strategy on made-up replies: outer-step numbers, weighting, state, validation.

Real Flower ``Message`` / ``RecordDict`` / ``ArrayRecord`` objects, a stand-in
Grid (only ``get_node_ids`` and ``send_and_receive`` are used), and
``aggregate_train`` called directly.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.app.error import Error

from client import wire
from common.algorithms import server_opt
from common.config import from_dict
from server.state import ServerState
from server.strategy import MetaStrategy, expected_count, sample_sites

EPISODES = 8


class FakeGrid:
    """Nodes 101, 102, ... serving sites 'site-a', 'site-b', ... (answers the site query)."""

    def __init__(self, num_nodes: int) -> None:
        self.nodes = {100 + i + 1: f"site-{chr(ord('a') + i)}" for i in range(num_nodes)}

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            assert msg.metadata.message_type == MessageType.QUERY
            site = self.nodes[msg.metadata.dst_node_id]
            replies.append(Message(RecordDict({wire.SITE: ConfigRecord({wire.SITE_ID: site})}), reply_to=msg))
        return replies


def make_config(**overrides):
    values = {
        "server_opt.name": "sgd",
        "server_opt.lr": 0.5,
        "federation.rounds": 10,
        "federation.sites_per_round": 3,
        "episodes.episodes_per_round": EPISODES,
    }
    values.update(overrides)
    return from_dict({}, values)


def theta0():
    return {"w": torch.tensor([1.0, 2.0, -4.0]), "b": torch.tensor([[0.5]])}


def make_strategy(config, params=None, num_nodes=3):
    params = params if params is not None else theta0()
    state = ServerState(params=params, opt_state=server_opt.init_state(params, config=config.server_opt))
    strategy = MetaStrategy(config, state, expected_nodes=num_nodes, discovery_timeout=1.0)
    grid = FakeGrid(num_nodes)
    return strategy, grid


def send(strategy, grid, server_round):
    arrays = wire.tree_to_record(strategy.state.params)
    return {m.metadata.dst_node_id: m for m in strategy.configure_train(server_round, arrays, ConfigRecord(), grid)}


def echo(instruction):
    """The reply's binding to its round, as the ClientApp sends it."""
    cfg = instruction.content[wire.CONFIG]
    return ConfigRecord({"round": cfg.get("round", 0), "nonce": cfg.get("nonce", "")})


def reply(instruction, phi, num_examples, **metrics):
    record = ArrayRecord({k: Array(np.asarray(v)) for k, v in phi.items()})
    m = MetricRecord({wire.NUM_EXAMPLES: num_examples, **metrics})
    return Message(RecordDict({wire.ARRAYS: record, wire.METRICS: m, wire.REPLY: echo(instruction)}),
                   reply_to=instruction)


def shifted(params, by):
    return {k: (v + by).numpy().astype(np.float32) for k, v in params.items()}


def test_configure_train_sends_theta_and_round_settings():
    config = make_config()
    strategy, grid = make_strategy(config)
    sent = send(strategy, grid, 1)
    assert len(sent) == 3
    msg = next(iter(sent.values()))
    assert msg.metadata.message_type == MessageType.TRAIN
    got = wire.record_to_tree(msg.content[wire.ARRAYS])
    assert all(torch.equal(got[k], theta0()[k]) for k in got)
    cfg = msg.content[wire.CONFIG]
    assert set(wire.TRAIN_KEYS) <= set(cfg.keys())
    assert cfg["round"] == 1 and cfg["episodes"] == EPISODES
    seeds = {m.content[wire.CONFIG]["seed"] for m in sent.values()}
    assert len(seeds) == 3  # one seed per site-round


def test_sgd_outer_step_exact_and_weighted_by_episodes():
    config = make_config(**{"federation.sites_per_round": 2})
    strategy, grid = make_strategy(config, num_nodes=2)
    sent = send(strategy, grid, 1)
    (n1, m1), (n2, m2) = sorted(sent.items())
    # Site a moved by +1 using 2 episodes, site b by -1 using 6 episodes.
    replies = [reply(m1, shifted(theta0(), 1.0), 2), reply(m2, shifted(theta0(), -1.0), 6)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    # delta = (2 * 1 + 6 * -1) / 8 = -0.5; theta <- theta + 0.5 * delta = theta - 0.25
    expected = {k: v - 0.25 for k, v in theta0().items()}
    got = wire.record_to_tree(arrays)
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
        assert torch.equal(strategy.state.params[k], expected[k])
    assert metrics["episodes"] == 8.0
    rec = strategy.rounds[1]
    assert (rec["sites_sampled"], rec["sites_replied"], rec["sites_failed"], rec["sites_invalid"]) == (2, 2, 0, 0)
    assert strategy.state.opt_state["step"] == 1


def test_train_metrics_are_episode_weighted():
    config = make_config(**{"federation.sites_per_round": 2})
    strategy, grid = make_strategy(config, num_nodes=2)
    (n1, m1), (n2, m2) = sorted(send(strategy, grid, 1).items())
    replies = [
        reply(m1, shifted(theta0(), 0.0), 2, query_loss=1.0, query_accuracy=0.5),
        reply(m2, shifted(theta0(), 0.0), 6, query_loss=3.0, query_accuracy=0.25),
    ]
    _, metrics = strategy.aggregate_train(1, replies)
    assert metrics["query_loss"] == pytest.approx((2 * 1.0 + 6 * 3.0) / 8)
    assert metrics["query_accuracy"] == pytest.approx((2 * 0.5 + 6 * 0.25) / 8)


def _adam(theta, grads, lr, b1, b2, eps):
    """Adam by hand over python floats, one parameter entry."""
    m = v = 0.0
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        theta = theta - lr * (m / (1 - b1**t)) / (math.sqrt(v / (1 - b2**t)) + eps)
    return theta


def test_adam_keeps_moments_across_rounds():
    lr, b1, b2, eps = 0.1, 0.9, 0.999, 1e-8
    config = make_config(**{
        "server_opt.name": "adam", "server_opt.lr": lr, "server_opt.beta1": b1, "server_opt.beta2": b2,
        "server_opt.eps": eps, "federation.sites_per_round": 1,
    })
    strategy, grid = make_strategy(config, num_nodes=1)
    moves = [0.5, -0.25]  # phi - theta in rounds 1 and 2 (gradient = -move)
    for r, move in enumerate(moves, start=1):
        (node, msg), = send(strategy, grid, r).items()
        strategy.aggregate_train(r, [reply(msg, shifted(strategy.state.params, move), EPISODES)])
    assert strategy.state.opt_state["step"] == 2
    for k, v in theta0().items():
        for i, x in enumerate(v.flatten().tolist()):
            want = _adam(x, [-m for m in moves], lr, b1, b2, eps)
            assert strategy.state.params[k].flatten()[i].item() == pytest.approx(want, abs=1e-6)
    # A server that rebuilt Adam in round 2 would land elsewhere.
    rebuilt = _adam(_adam(1.0, [-moves[0]], lr, b1, b2, eps), [-moves[1]], lr, b1, b2, eps)
    assert abs(strategy.state.params["w"][0].item() - rebuilt) > 1e-3


def test_sgd_momentum_state_carries_over():
    config = make_config(**{"server_opt.lr": 1.0, "server_opt.momentum": 0.5, "federation.sites_per_round": 1})
    strategy, grid = make_strategy(config, num_nodes=1)
    for r in (1, 2):
        (node, msg), = send(strategy, grid, r).items()
        strategy.aggregate_train(r, [reply(msg, shifted(strategy.state.params, 1.0), EPISODES)])
    # round 1: +1; round 2: direction = 1 + 0.5 * 1 = 1.5 -> total +2.5
    for k, v in theta0().items():
        assert torch.equal(strategy.state.params[k], v + 2.5)


@pytest.mark.parametrize(
    "case",
    ["nan", "inf", "wrong_shape", "missing_key", "extra_key", "float64", "zero_examples", "negative_examples",
     "absurd_examples", "float_examples", "fractional_examples", "no_metrics", "two_arrayrecords"],
)
def test_invalid_reply_is_dropped_and_counted(case):
    config = make_config(**{"federation.sites_per_round": 2})
    strategy, grid = make_strategy(config, num_nodes=2)
    (n_good, m_good), (n_bad, m_bad) = sorted(send(strategy, grid, 1).items())
    good = reply(m_good, shifted(theta0(), 1.0), 4)
    phi = shifted(theta0(), -3.0)
    n_examples = 4
    if case == "nan":
        phi["w"][1] = np.nan
    elif case == "inf":
        phi["b"][0, 0] = np.inf
    elif case == "wrong_shape":
        phi["w"] = np.zeros((4,), np.float32)
    elif case == "missing_key":
        del phi["b"]
    elif case == "extra_key":
        phi["extra"] = np.zeros((2,), np.float32)
    elif case == "float64":
        phi["w"] = phi["w"].astype(np.float64)
    elif case == "zero_examples":
        n_examples = 0
    elif case == "negative_examples":
        n_examples = -5
    elif case == "absurd_examples":
        n_examples = 10**9
    elif case == "float_examples":
        n_examples = 4.0
    if case == "fractional_examples":
        bad = Message(RecordDict({
            wire.ARRAYS: ArrayRecord({k: Array(v) for k, v in phi.items()}),
            wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 4, "flag": 1}), wire.REPLY: echo(m_bad),
        }), reply_to=m_bad)
        bad.content[wire.METRICS][wire.NUM_EXAMPLES] = 3.5  # not an int
    elif case == "no_metrics":
        bad = Message(RecordDict({wire.ARRAYS: ArrayRecord({k: Array(v) for k, v in phi.items()}),
                                  wire.REPLY: echo(m_bad)}), reply_to=m_bad)
    elif case == "two_arrayrecords":
        rec = ArrayRecord({k: Array(v) for k, v in phi.items()})
        bad = Message(RecordDict({wire.ARRAYS: rec, "more": rec,
                                  wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 4}), wire.REPLY: echo(m_bad)}),
                      reply_to=m_bad)
    else:
        bad = reply(m_bad, phi, n_examples)
    arrays, _ = strategy.aggregate_train(1, [bad, good])
    rec = strategy.rounds[1]
    assert rec["sites_invalid"] == 1 and rec["sites_replied"] == 1 and rec["sites_failed"] == 0
    assert rec["failures"][0]["site"] == strategy.node_sites[n_bad]
    # Only the good site counted: theta + 0.5 * (+1)
    got = wire.record_to_tree(arrays)
    for k, v in theta0().items():
        assert torch.equal(got[k], v + 0.5), (case, k)


def test_error_reply_is_logged_counted_and_the_round_goes_on(caplog):
    config = make_config(**{"federation.sites_per_round": 3})
    strategy, grid = make_strategy(config, num_nodes=3)
    sent = sorted(send(strategy, grid, 1).items())
    replies = [
        Message(Error(code=2, reason="site-a: labels.npy has 3 rows, image.npy has 4"), reply_to=sent[0][1]),
        reply(sent[1][1], shifted(theta0(), 1.0), 8),
        reply(sent[2][1], shifted(theta0(), 1.0), 8),
    ]
    with caplog.at_level("WARNING"):
        strategy.aggregate_train(1, replies)
    rec = strategy.rounds[1]
    assert (rec["sites_failed"], rec["sites_replied"], rec["sites_invalid"]) == (1, 2, 0)
    assert "labels.npy has 3 rows" in rec["failures"][0]["reason"]
    assert torch.equal(strategy.state.params["w"], theta0()["w"] + 0.5)


def test_reply_from_a_site_not_sampled_is_invalid():
    config = make_config(**{"federation.sites_per_round": 1})
    strategy, grid = make_strategy(config, num_nodes=3)
    (node, msg), = send(strategy, grid, 1).items()
    other = next(n for n in grid.nodes if n != node)
    stranger = Message(RecordDict({wire.CONFIG: ConfigRecord({})}), dst_node_id=other, message_type=MessageType.TRAIN)
    arrays, _ = strategy.aggregate_train(1, [reply(msg, shifted(theta0(), 1.0), 8),
                                             reply(stranger, shifted(theta0(), 9.0), 8),
                                             reply(msg, shifted(theta0(), 9.0), 8)])  # a second reply
    rec = strategy.rounds[1]
    assert rec["sites_invalid"] == 2 and rec["sites_replied"] == 1
    assert torch.equal(wire.record_to_tree(arrays)["w"], theta0()["w"] + 0.5)


def test_no_valid_reply_leaves_theta_and_optimizer_state_alone():
    config = make_config(**{"server_opt.name": "adam", "federation.sites_per_round": 1})
    strategy, grid = make_strategy(config, num_nodes=1)
    (node, msg), = send(strategy, grid, 1).items()
    bad = shifted(theta0(), 1.0)
    bad["w"][0] = np.nan
    arrays, metrics = strategy.aggregate_train(1, [reply(msg, bad, 8)])
    assert arrays is None and metrics is not None
    assert strategy.state.opt_state["step"] == 0
    assert torch.equal(strategy.state.params["w"], theta0()["w"])


def test_sampling_is_a_function_of_seed_and_round():
    sites = [(f"s{i:03d}", 1000 + i) for i in range(50)]
    config = make_config(**{"federation.sites_per_round": 7})
    a = sample_sites(sites, config, 3)
    assert a == sample_sites(sites, config, 3) and len(a) == 7
    assert a != sample_sites(sites, config, 4)
    # The node ids do not matter, only the site ids (node ids change between runs).
    renumbered = [(s, 5000 + i) for i, (s, _) in enumerate(sites)]
    assert [s for s, _ in sample_sites(renumbered, config, 3)] == [s for s, _ in a]
    frac = make_config(**{"federation.fraction": 0.2})
    assert len(sample_sites(sites, frac, 1)) == 10 == expected_count(frac, 50)


def test_poisson_sampling_includes_each_site_independently():
    sites = [(f"s{i:03d}", i) for i in range(200)]
    config = make_config(**{"federation.fraction": 0.1, "federation.poisson": True})
    counts = [len(sample_sites(sites, config, r)) for r in range(1, 201)]
    assert len(set(counts)) > 3  # the count varies from round to round
    assert np.mean(counts) == pytest.approx(20, rel=0.1)
    assert expected_count(config, 200) == pytest.approx(20.0)


# ------------------------------------------------------------ client-level DP


def dp_strategy(num_nodes, *, z, clip, fraction, poisson=True, lr=1.0, secret_key=None):
    from server.aggregation import make_aggregator

    config = make_config(**{
        "server_opt.lr": lr, "federation.fraction": fraction, "federation.poisson": poisson,
        "privacy.client.enabled": True, "privacy.client.noise_multiplier": z, "privacy.client.clip_norm": clip,
    })
    params = theta0()
    state = ServerState(params=params, opt_state=server_opt.init_state(params, config=config.server_opt))
    if secret_key is not None:
        state.secret_key = secret_key
    strategy = MetaStrategy(config, state, expected_nodes=num_nodes, discovery_timeout=1.0,
                            aggregator=make_aggregator(config, secret_key=state.secret_key))
    return strategy, FakeGrid(num_nodes)


def test_client_dp_clips_each_site_and_divides_by_the_expected_count():
    strategy, grid = dp_strategy(4, z=0.0, clip=1.0, fraction=0.5, poisson=False)
    sent = sorted(send(strategy, grid, 1).items())
    assert len(sent) == 2
    # Site 1 moves w by (2, 0, 0) (norm 2 -> clipped to norm 1); site 2 by (0.5, 0, 0) (kept).
    moves = [np.array([2.0, 0.0, 0.0], np.float32), np.array([0.5, 0.0, 0.0], np.float32)]
    replies = []
    for (node, msg), move in zip(sent, moves):
        phi = {k: v.numpy().copy() for k, v in theta0().items()}
        phi["w"] = phi["w"] + move
        replies.append(reply(msg, phi, 1 if move[0] > 1 else 8))  # weights must not matter
    strategy.aggregate_train(1, replies)
    # (1 + 0.5) / expected 2 sites = 0.75 on w[0]; the rest unchanged.
    assert torch.allclose(strategy.state.params["w"], theta0()["w"] + torch.tensor([0.75, 0.0, 0.0]))
    assert torch.equal(strategy.state.params["b"], theta0()["b"])
    privacy = strategy.rounds[1]["privacy"]
    assert privacy["client_sample_rate"] == 1.0  # fixed-size sampling: no amplification claimed
    assert privacy["client_epsilon"] == float("inf")  # z = 0: no guarantee


def test_client_dp_round_without_sites_releases_noise_and_is_accounted():
    strategy, grid = dp_strategy(200, z=1.0, clip=0.5, fraction=0.001)  # q N = 0.2
    rounds_without = 0
    for r in range(1, 4):
        sent = send(strategy, grid, r)
        before = {k: v.clone() for k, v in strategy.state.params.items()}
        replies = [reply(m, shifted(before, 0.0), 4) for m in sent.values()]
        strategy.aggregate_train(r, replies)
        moved = float(tree_norm(before, strategy.state.params))
        assert moved > 0  # noise, even with no site
        rounds_without += not sent
    assert rounds_without >= 1
    privacy = strategy.rounds[3]["privacy"]
    assert privacy["client_steps"] == 3 and privacy["client_sample_rate"] == 0.001
    assert 0 < strategy.rounds[1]["privacy"]["client_epsilon"] < privacy["client_epsilon"] < float("inf")
    # The accountant's state travels with the server state (checkpoints, resume).
    state = strategy.state.aggregator_state
    assert sum(count for _, _, count in state["accountant"]["history"]) == 3


def test_client_dp_noise_is_reproducible_per_round_with_the_servers_key_only():
    from common.privacy.randomness import fresh_key

    key = fresh_key()
    a, grid_a = dp_strategy(10, z=1.0, clip=1.0, fraction=0.5, secret_key=key)
    b, grid_b = dp_strategy(10, z=1.0, clip=1.0, fraction=0.5, secret_key=key)  # a resumed server
    c, grid_c = dp_strategy(10, z=1.0, clip=1.0, fraction=0.5)  # same config, another run
    for s, g in ((a, grid_a), (b, grid_b), (c, grid_c)):
        sent = send(s, g, 1)
        s.aggregate_train(1, [reply(m, shifted(theta0(), 0.1), 4) for m in sent.values()])
    assert all(torch.equal(a.state.params[k], b.state.params[k]) for k in a.state.params)
    assert not all(torch.equal(a.state.params[k], c.state.params[k]) for k in a.state.params)


def tree_norm(a, b):
    return torch.sqrt(sum(((a[k] - b[k]) ** 2).sum() for k in a))


def test_fewer_nodes_than_sites_go_on_after_a_grace_period(caplog):
    config = make_config(**{"federation.sites_per_round": 2})
    strategy, grid = make_strategy(config, num_nodes=2)
    strategy.expected_nodes = 5  # the server sees 5 site directories, 2 nodes run
    strategy.node_grace = 0.3
    with caplog.at_level("WARNING"):
        sent = send(strategy, grid, 1)
    assert len(sent) == 2
    assert "2 of 5 expected sites connected" in caplog.text
    strategy.node_grace = 100.0  # later rounds do not wait for the missing sites again
    assert len(send(strategy, grid, 2)) == 2


def test_too_few_nodes_time_out_with_advice():
    config = make_config(**{"federation.min_sites": 3})
    strategy, grid = make_strategy(config, num_nodes=2)
    strategy.discovery_timeout, strategy.node_grace = 0.3, 0.1
    with pytest.raises(TimeoutError, match="num-supernodes=3"):
        send(strategy, grid, 1)


def test_private_sites_declining_evaluation_are_not_failures(caplog):
    config = make_config(**{"federation.sites_per_round": 3, "federation.eval_every": 1})
    params = theta0()
    state = ServerState(params=params, opt_state=server_opt.init_state(params, config=config.server_opt))
    strategy = MetaStrategy(config, state, expected_nodes=3, discovery_timeout=1.0, federated_eval=True)
    grid = FakeGrid(3)
    arrays = wire.tree_to_record(params)
    sent = sorted((m.metadata.dst_node_id, m) for m in strategy.configure_evaluate(1, arrays, ConfigRecord(), grid))
    per_site = int(sent[0][1].content[wire.CONFIG]["episodes"])
    replies = [
        Message(Error(code=wire.PRIVATE_SITE_REFUSED, reason="site-a: under record-level DP"), reply_to=sent[0][1]),
        Message(Error(code=wire.PRIVATE_SITE_REFUSED, reason="site-b: under record-level DP"), reply_to=sent[1][1]),
        Message(RecordDict({wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: per_site, "accuracy": 0.5, "loss": 1.0})}),
                reply_to=sent[2][1]),
    ]
    with caplog.at_level("INFO"):
        agg = strategy.aggregate_evaluate(1, replies)
    fe = strategy.rounds[1]["federated_eval"]
    assert (fe["sites_private"], fe["sites_failed"], fe["sites_replied"]) == (2, 0, 1)
    assert agg["accuracy"] == 0.5
    declined = [r for r in caplog.records if "declined federated evaluation" in r.getMessage()]
    assert len(declined) == 1 and "site-a, site-b" in declined[0].getMessage()  # once per round
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_a_lost_site_answered_for_by_the_superlink_counts_once_under_its_site_id(caplog):
    """The SuperLink answers for a lost node from its own id (1): the site is one failure, not also missing."""
    config = make_config(**{"federation.sites_per_round": 2})
    strategy, grid = make_strategy(config, num_nodes=2)
    sent = sorted(send(strategy, grid, 1).items())
    for i, (_, instruction) in enumerate(sent):
        instruction.metadata.__dict__["_message_id"] = f"instruction-{i}"
    lost = Message(Error(code=3, reason="node went offline"), reply_to=sent[0][1])
    lost.metadata.__dict__["_src_node_id"] = 1
    assert lost.metadata.src_node_id == 1 and lost.metadata.reply_to_message_id == "instruction-0"
    with caplog.at_level("WARNING"):
        strategy.aggregate_train(1, [lost, reply(sent[1][1], shifted(theta0(), 1.0), 8)])
    rec = strategy.rounds[1]
    assert (rec["sites_failed"], rec["sites_missing"], rec["sites_replied"]) == (1, 0, 1)
    assert [f["site"] for f in rec["failures"]] == [grid.nodes[sent[0][0]]]
    assert "node-1" not in caplog.text
