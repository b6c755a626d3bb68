"""Each reply check on made-up replies through the strategy: what is refused, counted, and what counts.

Real Flower ``Message`` objects and ``MetaStrategy.aggregate_train``; the stand-in
grid and reply helpers of the strategy tests.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from client import wire
from server.reply_checks import bound_updates, check_metrics, clean_reason, reply_byte_cap
from tests.flower.test_strategy import echo, make_config, make_strategy, reply, send, shifted, theta0


def round_of(strategy, grid, r, moves, episodes=None, **config):
    """Send round ``r``; site i replies theta + moves[i] (None: no reply) with ``episodes[i]``."""
    sent = sorted(send(strategy, grid, r).items())
    episodes = episodes or [8] * len(sent)
    replies = [reply(m, shifted(strategy.state.params, mv), n) for (_, m), mv, n in zip(sent, moves, episodes)
               if mv is not None]
    return sent, replies


def test_reply_size_cap_follows_the_model_and_is_checked_before_decoding():
    params = theta0()
    assert reply_byte_cap(params) == int(1.5 * 16) + 64 * 1024
    assert reply_byte_cap(params, 1000) == 1000
    strategy, grid = make_strategy(make_config(**{"federation.sites_per_round": 2}), num_nodes=2)
    (_, m_good), (_, m_bad) = sorted(send(strategy, grid, 1).items())
    good = reply(m_good, shifted(theta0(), 1.0), 8)
    # A correctly named array whose buffer is garbage past the cap: decoding it would fail differently.
    arrays = ArrayRecord({k: Array(np.asarray(v)) for k, v in shifted(theta0(), 1.0).items()})
    arrays["w"] = Array(dtype="float32", shape=(3,), stype="numpy.ndarray", data=b"\0" * (strategy.reply_cap + 1))
    bad = Message(RecordDict({wire.ARRAYS: arrays, wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 8}),
                              wire.REPLY: echo(m_bad)}), reply_to=m_bad)
    strategy.aggregate_train(1, [bad, good])
    rec = strategy.rounds[1]
    assert rec["rejected"] == {"oversized": 1} and rec["sites_replied"] == 1
    assert "over the cap" in rec["failures"][0]["reason"]
    assert torch.equal(strategy.state.params["w"], theta0()["w"] + 0.5)


def test_configured_cap_refuses_an_honest_sized_reply():
    strategy, grid = make_strategy(make_config(**{"federation.sites_per_round": 1, "replies.max_bytes": 100}),
                                   num_nodes=1)
    sent, replies = round_of(strategy, grid, 1, [1.0])
    strategy.aggregate_train(1, replies)
    assert strategy.rounds[1]["rejected"] == {"oversized": 1}


@pytest.mark.parametrize("case", ["no_echo", "last_round", "wrong_nonce", "reply_to_other"])
def test_reply_not_made_for_this_rounds_instruction_is_refused(case):
    strategy, grid = make_strategy(make_config(**{"federation.sites_per_round": 2}), num_nodes=2)
    (_, m1), (_, m2) = sorted(send(strategy, grid, 1).items())
    strategy.aggregate_train(1, [reply(m1, shifted(theta0(), 1.0), 8), reply(m2, shifted(theta0(), 1.0), 8)])
    (_, n1), (_, n2) = sorted(send(strategy, grid, 2).items())
    theta = dict(strategy.state.params)
    good = reply(n1, shifted(theta, 1.0), 8)
    bad = reply(n2, shifted(theta, -2.0), 8)
    if case == "no_echo":
        del bad.content.config_records[wire.REPLY]
    elif case == "last_round":  # a reply labelled with round 1's round and nonce
        bad.content.config_records[wire.REPLY] = echo(m2)
    elif case == "wrong_nonce":
        bad.content.config_records[wire.REPLY] = ConfigRecord({"round": 2, "nonce": "0" * 32})
    else:  # the grid stamped an id on the instruction; the reply answers another message
        n2.metadata.__dict__["_message_id"] = "instruction-2"
        bad.metadata.__dict__["_reply_to_message_id"] = "instruction-1"
    strategy.aggregate_train(2, [bad, good])
    rec = strategy.rounds[2]
    assert rec["rejected"] == {"wrong_round": 1} and rec["sites_replied"] == 1, rec["failures"]
    assert all(torch.equal(strategy.state.params[k], theta[k] + 0.5) for k in theta)


def test_round_nonce_is_fresh_every_round():
    strategy, grid = make_strategy(make_config(**{"federation.sites_per_round": 1}), num_nodes=1)
    nonces = {next(iter(send(strategy, grid, r).values())).content[wire.CONFIG]["nonce"] for r in (1, 2, 3)}
    assert len(nonces) == 3 and all(len(n) == 32 for n in nonces)


def test_replay_of_an_accepted_reply_is_refused_within_the_window():
    strategy, grid = make_strategy(make_config(**{"federation.sites_per_round": 1, "replies.replay_window": 2}),
                                   num_nodes=1)
    (_, m1), = send(strategy, grid, 1).items()
    first = shifted(theta0(), 1.0)
    strategy.aggregate_train(1, [reply(m1, first, 8)])
    after_1 = dict(strategy.state.params)
    (_, m2), = send(strategy, grid, 2).items()
    strategy.aggregate_train(2, [reply(m2, first, 8)])  # round 1's phi again, with round 2's nonce
    assert strategy.rounds[2]["rejected"] == {"replayed": 1} and strategy.rounds[2]["sites_replied"] == 0
    assert all(torch.equal(strategy.state.params[k], after_1[k]) for k in after_1)
    # An unchanged model is not a replay, however often it comes.
    for r in (3, 4):
        (_, m), = send(strategy, grid, r).items()
        strategy.aggregate_train(r, [reply(m, shifted(strategy.state.params, 0.0), 8)])
        assert strategy.rounds[r]["sites_replied"] == 1
    # Past the window (rounds 3 and 4 accepted other arrays), round 1's reply is no longer remembered.
    (_, m5), = send(strategy, grid, 5).items()
    strategy.aggregate_train(5, [reply(m5, first, 8)])
    assert strategy.rounds[5]["sites_replied"] == 1


def test_absolute_bound_rejects_and_the_round_goes_on():
    strategy, grid = make_strategy(make_config(**{"federation.sites_per_round": 2}), num_nodes=2)
    _, replies = round_of(strategy, grid, 1, [1.0, 1e30])  # finite but absurd (norm 2e30)
    strategy.aggregate_train(1, replies)
    rec = strategy.rounds[1]
    assert rec["rejected"] == {"update_norm": 1} and "replies.max_update_norm=1000" in rec["failures"][0]["reason"]
    assert torch.equal(strategy.state.params["w"], theta0()["w"] + 0.5)


def test_relative_bound_rejects_past_ratio_times_the_median_norm():
    strategy, grid = make_strategy(make_config(), num_nodes=3)
    _, replies = round_of(strategy, grid, 1, [1.0, 1.0, 100.0])  # norms 2, 2, 200 against 10 x 2
    strategy.aggregate_train(1, replies)
    rec = strategy.rounds[1]
    assert rec["rejected"] == {"update_norm": 1} and rec["median_update_norm"] == 2.0
    assert "median" in rec["failures"][0]["reason"]
    assert torch.equal(strategy.state.params["w"], theta0()["w"] + 0.5)


def test_clip_mode_scales_the_excess_update_to_the_bound_exactly():
    strategy, grid = make_strategy(make_config(**{"replies.on_excess": "clip"}), num_nodes=3)
    _, replies = round_of(strategy, grid, 1, [1.0, 1.0, 100.0], episodes=[2, 2, 4])
    strategy.aggregate_train(1, replies)
    rec = strategy.rounds[1]
    assert rec["clipped"] == 1 and rec["sites_replied"] == 3 and rec["rejected"] == {}
    # The third update is cut to norm 20 (10 per entry): (2*1 + 2*1 + 4*10) / 8 = 5.5; lr 0.5.
    assert all(torch.equal(strategy.state.params[k], v + 2.75) for k, v in theta0().items())


def test_two_replies_and_client_dp_use_the_absolute_bound_only():
    out = bound_updates([{"w": torch.tensor([1.0])}, {"w": torch.tensor([500.0])}], max_norm=1000,
                        max_ratio=10, on_excess="reject")
    assert out.kept == [0, 1] and not out.rejected
    three = [{"w": torch.tensor([1.0])}, {"w": torch.tensor([1.0])}, {"w": torch.tensor([500.0])}]
    assert bound_updates(three, max_norm=1000, max_ratio=10, on_excess="reject").kept == [0, 1]
    assert bound_updates(three, max_norm=1000, max_ratio=10, on_excess="reject", relative=False).kept == [0, 1, 2]
    dp = make_config(**{"privacy.client.enabled": True, "federation.fraction": 1.0, "federation.poisson": True})
    strategy, _ = make_strategy(dp, num_nodes=3)
    assert strategy._relative_bound is False


def test_metrics_out_of_range_are_dropped_and_counted():
    kept, dropped = check_metrics({"num-examples": 8, "query_loss": -1.0, "train_loss": 0.5, "query_accuracy": 1.5,
                                   "accuracy": 0.25, "epsilon": -0.1, "epsilon_max": math.inf, "x": math.nan,
                                   "arr": [1.0, 2.0], "delta": 2.0, "other": -7.0}, skip=("num-examples",))
    assert kept == {"train_loss": 0.5, "accuracy": 0.25, "epsilon_max": math.inf, "other": -7.0}
    assert sorted(dropped) == ["arr", "delta", "epsilon", "query_accuracy", "query_loss", "x"]
    strategy, grid = make_strategy(make_config(**{"federation.sites_per_round": 2}), num_nodes=2)
    (_, m1), (_, m2) = sorted(send(strategy, grid, 1).items())
    _, metrics = strategy.aggregate_train(1, [
        reply(m1, shifted(theta0(), 1.0), 8, query_loss=0.5, query_accuracy=0.75),
        reply(m2, shifted(theta0(), 1.0), 8, query_loss=-3.0, query_accuracy=7.0),  # kept, its metrics not
    ])
    rec = strategy.rounds[1]
    assert rec["sites_replied"] == 2 and rec["metrics_dropped"] == 2
    assert metrics["query_loss"] == 0.5 and metrics["query_accuracy"] == 0.75


RAY_REASON = (
    "<class 'flwr.clientapp.client_app.ClientAppException'>:<'\n"
    "Exception ClientAppException occurred. Message: \x1b[36mray::ClientAppActor.run()\x1b[39m (pid=4242, "
    "ip=10.0.0.7, actor_id=" + "f" * 32 + ", repr=<flwr.simulation.ray_transport.ray_actor.ClientAppActor object "
    "at 0x7f>)\n  File \"/srv/metafed/client/sites.py\", line 88, in load_site\n    raise SiteDataError(...)\n"
    "common.data.site.SiteDataError: /data/train/site-0003/labels.npy has 33 rows, image.npy has 36\n\n"
    "The above exception was the direct cause of the following exception:\n\n"
    "\x1b[36mray::ClientAppActor.run()\x1b[39m (pid=4242, ip=10.0.0.7)\n"
    "  File \"/venv/flwr/simulation/ray_transport/ray_actor.py\", line 65, in run\n"
    "flwr.clientapp.client_app.ClientAppException: \nException ClientAppException occurred. Message: "
    "/data/train/site-0003/labels.npy has 33 rows, image.npy has 36'>"
)


def test_failure_reason_keeps_type_message_and_file_without_ansi_or_ray_header():
    got = clean_reason(RAY_REASON)
    assert got.startswith("SiteDataError: /data/train/site-0003/labels.npy has 33 rows, image.npy has 36")
    assert "\x1b" not in got and "pid=" not in got and "actor_id" not in got
    assert got.endswith("(at /srv/metafed/client/sites.py:88)")  # where it was raised, not Flower's wrapper
    assert clean_reason("site site-0001 (/d): labels.npy is empty") == "site site-0001 (/d): labels.npy is empty"
    long = clean_reason("\x1b[31mValueError: " + "x" * 5000)
    assert len(long) == 400 and long.startswith("ValueError: xxx") and long.endswith("...")
