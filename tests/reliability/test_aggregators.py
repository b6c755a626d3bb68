"""The aggregation rules on made-up updates: exact numbers, and Flower's own result on the same updates."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedMedian, FedTrimmedAvg, MultiKrum as FlowerMultiKrum

from common.config import ConfigError, from_dict
from server.aggregation import ClippedMean, CoordinateMedian, MultiKrum, TrimmedMean, WeightedMean, make_aggregator
from server.dp_aggregation import ClientLevelDP


def updates(*rows):
    return [{"w": torch.tensor(r, dtype=torch.float32)} for r in rows]


# Four honest sites along one direction, one outlier (e).
FIVE = updates([1, 10, -1], [2, 20, -2], [3, 33, -3], [4, 40, -4], [100, -50, 7])
TEMPLATE = {"w": torch.zeros(3)}


def run(aggregator, deltas, weights):
    return aggregator.aggregate(deltas, weights, template={k: torch.zeros_like(v) for k, v in deltas[0].items()},
                                server_round=1, num_sampled=len(deltas), expected_sampled=len(deltas))


def test_coordinate_median_exact():
    got = run(CoordinateMedian(), FIVE, [1, 1, 1, 1, 9])  # unweighted: the outlier's weight does not count
    assert torch.equal(got["w"], torch.tensor([3.0, 20.0, -2.0]))


def test_trimmed_mean_exact():
    # beta 0.2 of 5 cuts one value at each end of every coordinate.
    got = run(TrimmedMean(beta=0.2), FIVE, [1] * 5)
    assert torch.equal(got["w"], torch.tensor([3.0, 21.0, -2.0]))
    # beta 0 is the plain unweighted mean.
    assert torch.equal(run(TrimmedMean(beta=0.0), FIVE, [1] * 5)["w"], torch.tensor([22.0, 10.6, -0.6]))


def test_multikrum_leaves_the_outlier_out_and_weights_the_rest_by_episodes():
    agg = MultiKrum(byzantine=1)  # m = n - f = 4
    got = run(agg, FIVE, [1, 1, 2, 4, 8])
    # (1*a + 1*b + 2*c + 4*d) / 8
    assert torch.equal(got["w"], torch.tensor([3.125, 32.0, -3.125]))
    assert agg.last == {"krum_selected": 4.0, "krum_left_out": 1.0}


def test_krum_picks_the_update_with_the_closest_neighbours():
    # Scores (sum of squared distances to the n - f - 2 = 2 nearest): a 639, b 273, c 222, d 459, e huge.
    got = run(MultiKrum(byzantine=1, select=1), FIVE, [1] * 5)
    assert torch.equal(got["w"], torch.tensor([3.0, 33.0, -3.0]))


def test_clipped_mean_exact_with_a_fixed_and_the_median_bound():
    three = updates([3, 4], [0, 10], [30, 40])  # norms 5, 10, 50
    agg = ClippedMean(clip_norm=25.0)  # the third is halved to [15, 20]
    assert torch.equal(run(agg, three, [1, 1, 2])["w"], torch.tensor([8.25, 13.5]))
    assert agg.last == {"clip_norm": 25.0, "clipped": 1.0}
    three = updates([3, 4], [6, 8], [24, 32])  # norms 5, 10, 40: median 10, the third becomes [6, 8]
    assert torch.equal(run(ClippedMean(), three, [1, 1, 2])["w"], torch.tensor([5.25, 7.0]))


def test_no_update_is_no_aggregate():
    for agg in (WeightedMean(), CoordinateMedian(), TrimmedMean(beta=0.1), MultiKrum(byzantine=1), ClippedMean()):
        assert agg.aggregate([], [], template=TEMPLATE, server_round=1, num_sampled=0, expected_sampled=0) is None


# ------------------------------------------------------------ equal to Flower's
def random_updates(n, seed):
    g = np.random.default_rng(seed)
    return [{"conv.weight": torch.from_numpy(g.normal(size=(4, 3)).astype(np.float32)),
             "head.bias": torch.from_numpy(g.normal(size=(5,)).astype(np.float32) * (10 if i == 0 else 1))}
            for i in range(n)]


def as_replies(deltas, weights):
    out = []
    for node, (d, w) in enumerate(zip(deltas, weights), start=1):
        sent = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node, message_type=MessageType.TRAIN)
        content = RecordDict({"arrays": ArrayRecord({k: Array(v.numpy()) for k, v in d.items()}),
                              "metrics": MetricRecord({"num-examples": int(w)})})
        out.append(Message(content, reply_to=sent))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("case", ["median", "trimmed", "multikrum", "krum"])
def test_equal_to_flowers_strategy_on_the_same_updates(case, seed):
    deltas = random_updates(7, seed)
    weights = [int(w) for w in np.random.default_rng(seed + 10).integers(1, 9, size=7)]
    ours, flower = {
        "median": (CoordinateMedian(), FedMedian()),
        "trimmed": (TrimmedMean(beta=0.3), FedTrimmedAvg(beta=0.3)),
        "multikrum": (MultiKrum(byzantine=2), FlowerMultiKrum(num_malicious_nodes=2, num_nodes_to_select=5)),
        "krum": (MultiKrum(byzantine=2, select=1), FlowerMultiKrum(num_malicious_nodes=2, num_nodes_to_select=1)),
    }[case]
    got = run(ours, deltas, weights)
    want, _ = flower.aggregate_train(1, as_replies(deltas, weights))
    assert set(want.keys()) == set(got)
    for k in got:
        expected = torch.from_numpy(want[k].numpy())
        assert got[k].dtype == expected.dtype and torch.equal(got[k], expected), (case, k)


def test_rule_comes_from_config_and_dp_refuses_robust_rules():
    assert isinstance(make_aggregator(from_dict({}, {"aggregation.rule": "median"})), CoordinateMedian)
    krum = make_aggregator(from_dict({}, {"aggregation.rule": "multikrum", "aggregation.krum_byzantine": 2}))
    assert isinstance(krum, MultiKrum) and krum.byzantine == 2
    assert isinstance(make_aggregator(from_dict({}, {})), WeightedMean)
    dp = {"privacy.client.enabled": True, "federation.fraction": 0.5, "federation.poisson": True}
    assert isinstance(make_aggregator(from_dict({}, dp), secret_key=bytes(32)), ClientLevelDP)
    with pytest.raises(ConfigError, match="aggregation.rule=median cannot be combined with client-level DP"):
        from_dict({}, {**dp, "aggregation.rule": "median"})
    for key, value, words in [
        ("aggregation.trim_fraction", 0.5, r"\[0, 0.5\)"), ("aggregation.rule", "krum", "must be one of"),
        ("replies.max_update_norm", float("nan"), "> 0"), ("replies.max_update_ratio", 0.5, ">= 1"),
        ("replies.on_excess", "drop", "reject, clip"), ("aggregation.clip_norm", -1.0, ">= 0"),
        ("replies.max_bytes", -1, ">= 0"),
    ]:
        with pytest.raises(ConfigError, match=words):
            from_dict({}, {key: value})
