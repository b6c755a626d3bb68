"""Federated prototypical networks (``algorithm.name: protonet``).

Properties: the prototypes are the class means; the loss is the direct
formula; the vmapped site update equals the per-episode autograd loop;
meta-test scores by the support's prototypes; record-level DP is refused.
"""

from __future__ import annotations

import math

import pytest
import torch

from common import tree
from common.algorithms import get_algorithm
from common.algorithms.inner import InnerLoop, adapt, batch_accuracy, head_inputs, index_episode
from common.algorithms.protonet import (
    COSINE_SCALE,
    class_prototypes,
    prototypical_accuracy,
    prototypical_gradient,
    prototypical_loss,
)
from common.algorithms.reference import REFERENCES
from common.config import ConfigError, load
from common.evaluation import score_episodes
from tests.models.test_models_grad import SPECS, WAYS, make_batch, make_model

SCHEMA = {"image": SPECS["image"], "series": SPECS["series"], "tokens": SPECS["tokens"]}


def batch(n=9, seed=0, lead=()):
    b = make_batch(SCHEMA, n, generator=torch.Generator().manual_seed(seed), lead=lead)
    b["weights"] = torch.ones(b["labels"].shape, dtype=torch.float64)
    return b


def episodes(count=3, seed=0):
    support, query = batch(n=6, seed=seed, lead=(count,)), batch(n=7, seed=seed + 1, lead=(count,))
    support["labels"] = (torch.arange(6) % WAYS).expand(count, 6).clone()  # every class in every support
    query["weights"][:, -1] = 0.0  # one padded query per episode
    return {"support": support, "query": query}


def test_prototypes_are_the_class_means_of_the_real_records_that_have_the_head():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(10, 2, 3, generator=g, dtype=torch.float64)
    present = torch.rand(10, 2, generator=g) > 0.3
    labels = torch.randint(0, 4, (10,), generator=g)
    weights = torch.ones(10, dtype=torch.float64)
    weights[3] = 0.0  # padding
    centres, counts = class_prototypes(features, present, labels, weights, ways=4)
    for k in range(4):
        for h in range(2):
            rows = [features[i, h] for i in range(10) if labels[i] == k and present[i, h] and i != 3]
            assert int(counts[k, h]) == len(rows)
            expected = torch.stack(rows).mean(0) if rows else torch.zeros(3, dtype=torch.float64)
            torch.testing.assert_close(centres[k, h], expected)


def _direct_loss(model, params, support, query, distance):
    """The loss from its definition, one query record and one class at a time."""
    xs, hs = head_inputs(model, params, support)
    xq, hq = head_inputs(model, params, query)
    heads = xs.shape[1]
    total, weight = 0.0, 0.0
    for j in range(xq.shape[0]):
        if query["weights"][j] == 0:
            continue
        logits = []
        for k in range(WAYS):
            members = [i for i in range(xs.shape[0]) if support["labels"][i] == k]
            terms = []
            for h in range(heads):
                inside = [xs[i, h] for i in members if hs[i, h]]
                if hq[j, h] and inside:
                    terms.append((h, torch.stack(inside).mean(0)))
            if not terms:  # no prototype on any of the query's heads: compared at the origin
                terms = [(h, torch.zeros_like(xq[j, h])) for h in range(heads) if hq[j, h]]
            scores = []
            for h, c in terms:
                if distance == "euclidean":
                    scores.append(-float(((xq[j, h] - c) ** 2).sum()))
                else:
                    cos = float(xq[j, h] @ c) / max(float(xq[j, h].norm() * c.norm()), 1e-8)
                    scores.append(COSINE_SCALE * cos)
            logits.append(sum(scores) / len(scores) if scores else 0.0)
        true = logits[int(query["labels"][j])]
        total += -(true - math.log(sum(math.exp(v) for v in logits)))
        weight += 1.0
    return total / weight


@pytest.mark.parametrize("fusion", ["late", "attention", "early"])
@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_the_loss_equals_its_direct_formula(fusion, distance):
    model, params = make_model(fusion, SCHEMA)
    episode = index_episode(episodes(seed=2), 0)
    got = float(prototypical_loss(model, params, episode["support"], episode["query"], distance=distance))
    assert got == pytest.approx(_direct_loss(model, params, episode["support"], episode["query"], distance),
                                rel=1e-9)


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_the_vmapped_site_update_equals_the_per_episode_loop(distance, optimizer):
    model, params = make_model("late", SCHEMA)
    algorithm = get_algorithm("protonet")
    hparams = algorithm.hparams(inner_steps=3, inner_lr=0.05, optimizer=optimizer, proto_distance=distance)
    data = episodes(seed=4)
    fast = algorithm.client_update(model=model, params=params, episodes=data, hparams=hparams)
    slow = REFERENCES["protonet"](model=model, params=params, episodes=data, hparams=hparams).params
    # float64; Adam's per-coordinate division magnifies rounding where a gradient is near 0
    # (2e-9 seen under vmap's other summation order), still 5 orders below the update itself.
    assert tree.max_abs_diff(fast.params, slow) < (1e-10 if optimizer == "sgd" else 1e-8)
    assert tree.max_abs_diff(fast.params, params) > 1e-4  # the update did something
    assert float(fast.metrics["adapted_loss"]) < float(fast.metrics["train_loss"])
    # The heads are not part of the objective: they come back as they went.
    for k in params:
        if k.startswith("fusion.heads."):
            assert float((fast.params[k] - params[k]).abs().max()) < 1e-12, k  # up to the mean's rounding


def test_head_init_prototypes_does_not_leak_into_the_reply():
    model, params = make_model("late", SCHEMA)
    algorithm = get_algorithm("protonet")
    data = episodes(seed=5)
    plain = algorithm.client_update(model=model, params=params, episodes=data,
                                    hparams=algorithm.hparams(inner_steps=2, inner_lr=0.05))
    proto = algorithm.client_update(model=model, params=params, episodes=data,
                                    hparams=algorithm.hparams(inner_steps=2, inner_lr=0.05, head_init="prototypes"))
    assert tree.max_abs_diff(plain.params, proto.params) == 0


def test_meta_test_scores_by_the_support_prototypes():
    model, params = make_model("attention", SCHEMA)
    data = episodes(count=4, seed=6)
    scores = score_episodes(model, params, data, inner_steps=0, inner_lr=0.1, classifier="prototypes")
    for e in range(4):
        ep = index_episode(data, e)
        assert float(scores.accuracy[e]) == pytest.approx(
            float(prototypical_accuracy(model, params, ep["support"], ep["query"])))
        assert float(scores.loss[e]) == pytest.approx(
            float(prototypical_loss(model, params, ep["support"], ep["query"])))
        # With one head, squared-Euclidean prototypes classify as the Proto-MAML head before any
        # step (the records that have some modality: one with none has no embedding to compare).
        has_any = torch.stack([ep["query"]["masks"][m] for m in SCHEMA]).any(0)
        query = {**ep["query"], "weights": ep["query"]["weights"] * has_any}
        proto_head = adapt(model, params, ep["support"], loop=InnerLoop(0, 0.1, head_init="prototypes"))
        assert float(prototypical_accuracy(model, params, ep["support"], query)) == pytest.approx(
            float(batch_accuracy(model, proto_head, query)))


def test_meta_test_fine_tuning_steps_on_the_support_prototypical_loss():
    model, params = make_model("late", SCHEMA)
    data = episodes(count=2, seed=7)
    still = score_episodes(model, params, data, inner_steps=0, inner_lr=0.1, classifier="prototypes")
    tuned = score_episodes(model, params, data, inner_steps=3, inner_lr=0.1, classifier="prototypes")
    assert not torch.equal(still.loss, tuned.loss)
    for e in range(2):
        ep = index_episode(data, e)
        # The support serves as prototypes and as queries: the query is never read before scoring.
        adapted = adapt(model, params, ep["support"], loop=InnerLoop(3, 0.1), gradient=prototypical_gradient(model))
        assert float(tuned.loss[e]) == pytest.approx(
            float(prototypical_loss(model, adapted, ep["support"], ep["query"])), rel=1e-9)
        assert float(prototypical_loss(model, adapted, ep["support"], ep["support"])) < float(
            prototypical_loss(model, params, ep["support"], ep["support"]))


def test_record_level_dp_refuses_protonet_with_the_way_out():
    with pytest.raises(ConfigError, match="protonet cannot be privatized.*client-level DP"):
        load(None, overrides=["algorithm.name=protonet", "privacy.record.enabled=true"])
    with pytest.raises(ConfigError, match="algorithm.proto_distance must be one of euclidean, cosine"):
        load(None, overrides=["algorithm.proto_distance=manhattan"])
    config = load(None, overrides=["algorithm.name=protonet", "privacy.client.enabled=true",
                                   "federation.fraction=0.1", "federation.poisson=true"])
    assert config.algorithm.name == "protonet"


def test_protonet_is_in_the_comparison():
    from simulations.cli import _parser
    from simulations.experiments import ALGORITHMS

    assert "protonet" in ALGORITHMS and len(ALGORITHMS) >= 6
    assert "protonet" in _parser().parse_args(["compare"]).algorithms.split(",")
