"""Proto-MAML's head initialization (``algorithm.head_init: prototypes``).

Properties: with the head built from the support's class means the model is a
nearest-class-mean classifier on what its heads see (for every fusion); it
works unchanged under vmap; the meta-gradient flows through the prototypes;
FedAvg's own training ignores it; record-level DP refuses it.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.func import functional_call, grad, vmap

from common import tree
from common.algorithms import get_algorithm
from common.algorithms.inner import InnerLoop, adapt, adapt_directions, batch_loss, head_inputs, prototype_head
from common.algorithms.reference import REFERENCES
from common.config import ConfigError, load
from common.models import FUSIONS
from tests.models.test_models_grad import SPECS, WAYS, assert_trees_close, index, make_batch, make_model

SCHEMA = {"image": SPECS["image"], "series": SPECS["series"], "tokens": SPECS["tokens"]}


def batch(n=9, seed=0, lead=()):
    b = make_batch(SCHEMA, n, generator=torch.Generator().manual_seed(seed), lead=lead)
    b["weights"] = torch.ones(b["labels"].shape, dtype=torch.float64)
    return b


@pytest.mark.parametrize("fusion", FUSIONS)
def test_prototype_head_is_a_nearest_class_mean_classifier(fusion):
    model, params = make_model(fusion, SCHEMA)
    support, query = batch(seed=1), batch(seed=2)
    support["labels"] = torch.arange(9) % WAYS  # every class present
    support["weights"][-1] = 0.0  # padding never counts
    head = prototype_head(model, params, support)
    assert set(head) == {f"fusion.{name}.{p}" for name in model.fusion.head_names for p in ("weight", "bias")}
    logits = functional_call(model, {**params, **head}, (query["inputs"], query["masks"]))
    # The same from the definition: a class mean per head over the support
    # records that have its input; logit = mean over the record's heads of
    # -|x - c_k|^2, up to a term that is the same for every class.
    xs, has_s = head_inputs(model, params, support)
    xq, has_q = head_inputs(model, params, query)
    for h in range(xs.shape[1]):
        members = [(i, k) for i in range(8) for k in [int(support["labels"][i])] if has_s[i, h]]
        for k in range(WAYS):
            rows = [xs[i, h] for i, c in members if c == k]
            centre = torch.stack(rows).mean(0) if rows else torch.zeros_like(xs[0, h])
            torch.testing.assert_close(head[f"fusion.{model.fusion.head_names[h]}.weight"][k], 2 * centre)
    if fusion == "late":
        weights = has_q.double() / has_q.double().sum(1, keepdim=True).clamp(min=1)
        heads = [head[f"fusion.{n}.weight"] / 2 for n in model.fusion.head_names]
        distance = torch.stack([((xq[:, h, None, :] - heads[h][None]) ** 2).sum(-1) for h in range(len(heads))], 1)
        expected = -(weights[..., None] * distance).sum(1)  # [B, W]
        shift = (logits - expected)
        has_any = has_q.any(1)
        torch.testing.assert_close(shift[has_any] - shift[has_any][:, :1], torch.zeros_like(shift[has_any]))
    else:
        centres = head[f"fusion.{model.fusion.head_names[0]}.weight"] / 2
        expected = -((xq[:, 0, None, :] - centres[None]) ** 2).sum(-1)
        shift = logits - expected
        torch.testing.assert_close(shift - shift[:, :1], torch.zeros_like(shift))


def test_a_head_with_a_hidden_layer_is_refused_with_the_fix():
    model, params = make_model("late", SCHEMA, head_hidden=5)
    with pytest.raises(ValueError, match="needs linear classifier heads.*head_hidden=0"):
        prototype_head(model, params, batch())


def test_adapt_with_prototypes_under_vmap_equals_a_loop():
    model, params = make_model("late", SCHEMA)
    support = batch(n=6, seed=3, lead=(4,))
    loop = InnerLoop(inner_steps=2, inner_lr=0.1, head_init="prototypes")
    batched = vmap(lambda s: adapt(model, params, s, loop=loop))(support)
    for e in range(4):
        assert_trees_close(index(batched, e), adapt(model, params, index(support, e), loop=loop))


def test_the_meta_gradient_flows_through_the_prototypes():
    """First-order in the inner steps, with 0 steps: the query loss still reaches the encoders."""
    model, params = make_model("attention", SCHEMA)
    support, query = batch(seed=4), batch(seed=5)
    loop = InnerLoop(inner_steps=0, inner_lr=0.1, head_init="prototypes")
    shared = InnerLoop(inner_steps=0, inner_lr=0.1)
    g_proto = grad(lambda p: batch_loss(model, adapt(model, p, support, loop=loop), query))(params)
    g_shared = grad(lambda p: batch_loss(model, adapt(model, p, support, loop=shared), query))(params)
    encoder = [k for k in params if k.startswith("encoders.image.")]
    assert all(float(g_proto[k].abs().sum()) > 0 for k in encoder)
    assert any(not torch.allclose(g_proto[k], g_shared[k]) for k in encoder)
    # The shared head is not used at all: no gradient reaches it.
    assert all(float(g_proto[k].abs().sum()) == 0 for k in params if k.startswith("fusion.head."))
    with pytest.raises(ValueError, match="head_init='shared'"):
        adapt_directions(model, params, support, loop=loop)


def test_fedavg_trains_its_shared_head_whatever_head_init_says():
    model, params = make_model("late", SCHEMA)
    episodes = {"support": batch(n=6, seed=6, lead=(2,)), "query": batch(n=6, seed=7, lead=(2,))}
    fedavg = get_algorithm("fedavg")
    shared = fedavg.client_update(model=model, params=params, episodes=episodes,
                                  hparams=fedavg.hparams(inner_steps=2, inner_lr=0.1))
    proto = fedavg.client_update(model=model, params=params, episodes=episodes,
                                 hparams=fedavg.hparams(inner_steps=2, inner_lr=0.1, head_init="prototypes"))
    assert_trees_close(shared.params, proto.params, atol=0)
    reptile = get_algorithm("reptile")
    moved = reptile.client_update(model=model, params=params, episodes=episodes,
                                  hparams=dataclasses.replace(reptile.hparams(inner_steps=2, inner_lr=0.1),
                                                              loop=InnerLoop(2, 0.1, head_init="prototypes")))
    assert not torch.allclose(moved.params["fusion.heads.image.net.0.weight"], params["fusion.heads.image.net.0.weight"])


def test_record_level_dp_refuses_prototype_heads(tmp_path):
    with pytest.raises(ConfigError, match="head_init=prototypes cannot be privatized.*head_init: shared"):
        load(None, overrides=["algorithm.head_init=prototypes", "privacy.record.enabled=true"])
    with pytest.raises(ConfigError, match="algorithm.head_init must be one of shared, prototypes"):
        load(None, overrides=["algorithm.head_init=zeros"])


@pytest.mark.parametrize("name", ["reptile", "fomaml", "maml", "metasgd"])
def test_every_meta_learner_with_prototype_heads_equals_its_per_episode_reference(name):
    """The vmapped site update (the query-gradient algorithms differentiate through
    the prototypes inside vmap) equals the plain per-episode loop."""
    model, params = make_model("late", SCHEMA)
    algorithm = get_algorithm(name)
    params = algorithm.init(params, 0.1)
    hparams = algorithm.hparams(inner_steps=2, inner_lr=0.1, client_meta_lr=0.3, head_init="prototypes")
    episodes = {"support": batch(n=6, seed=6, lead=(3,)), "query": batch(n=6, seed=7, lead=(3,))}
    fast = algorithm.client_update(model=model, params=params, episodes=episodes, hparams=hparams).params
    slow = REFERENCES[name](model=model, params=params, episodes=episodes, hparams=hparams).params
    assert tree.max_abs_diff(fast, slow) < 1e-10
    assert tree.max_abs_diff(fast, params) > 1e-4  # the update did something
