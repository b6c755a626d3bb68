"""Cross-modal alignment (``algorithm.align_weight``): an InfoNCE term in every algorithm's inner loop.

Properties: the loss is the direct formula; missing modalities and padding
are masked; one inner step is the classification step plus the weighted
alignment gradient; weight 0 leaves every algorithm's update bit-identical;
record-level DP refuses it.
"""

from __future__ import annotations

import math

import pytest
import torch

from common import tree
from common.algorithms import get_algorithm
from common.algorithms.alignment import alignment_loss, info_nce, modality_embeddings
from common.algorithms.inner import InnerLoop, adapt, batch_loss
from common.config import ConfigError, load
from tests.algorithms.test_protonet import SCHEMA, batch, episodes
from tests.models.test_models_grad import make_model

NAMES = ["fedavg", "reptile", "fomaml", "maml", "metasgd", "protonet"]


def _direct(embeddings, present, weights, temperature):
    b, m, _ = embeddings.shape
    z = embeddings / embeddings.norm(dim=-1, keepdim=True)
    total, count = 0.0, 0
    for a in range(m):
        for c in range(m):
            if a == c:
                continue
            valid = [i for i in range(b) if present[i, a] and present[i, c] and weights[i] > 0]
            if len(valid) < 2:
                continue
            for i in valid:
                scores = [float(z[i, a] @ z[j, c]) / temperature for j in valid]
                own = float(z[i, a] @ z[i, c]) / temperature
                total += -(own - math.log(sum(math.exp(s) for s in scores)))
                count += 1
    return total / max(count, 1)


def _random(seed=0, b=7, m=3, d=5):
    g = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(b, m, d, generator=g, dtype=torch.float64)
    present = torch.rand(b, m, generator=g) > 0.3
    weights = torch.ones(b, dtype=torch.float64)
    weights[-1] = 0.0
    return embeddings, present, weights


@pytest.mark.parametrize("temperature", [0.1, 1.0])
def test_the_loss_equals_its_direct_formula(temperature):
    embeddings, present, weights = _random()
    got = float(info_nce(embeddings, present, weights, temperature=temperature))
    assert got == pytest.approx(_direct(embeddings, present, weights, temperature), rel=1e-10)
    assert got > 0


def test_missing_modalities_and_padding_are_masked():
    embeddings, present, weights = _random(seed=1)
    before = info_nce(embeddings, present, weights, temperature=0.2)
    noisy = embeddings.clone()
    noisy[~present] = 1e3 * torch.randn_like(noisy[~present])  # whatever a missing modality holds
    noisy[-1] = -7.0  # the padded record
    assert torch.equal(info_nce(noisy, present, weights, temperature=0.2), before)
    # A pair that no two records share contributes nothing; no pair at all gives 0, not NaN.
    alone = torch.zeros_like(present)
    alone[0] = True
    assert float(info_nce(embeddings, alone, weights, temperature=0.2)) == 0.0
    grads = torch.func.grad(lambda e: info_nce(e, alone, weights, temperature=0.2))(embeddings)
    assert torch.isfinite(grads).all() and float(grads.abs().sum()) == 0.0


def test_the_model_loss_reads_the_encoders_only():
    model, params = make_model("late", SCHEMA)
    support = batch(n=8, seed=3)
    embeddings, present = modality_embeddings(model, params, support)
    assert embeddings.shape[:2] == (8, len(SCHEMA)) and present.dtype == torch.bool
    grads = torch.func.grad(lambda p: alignment_loss(model, p, support, temperature=0.1))(params)
    assert all(float(g.abs().sum()) == 0 for k, g in grads.items() if k.startswith("fusion."))
    for m in SCHEMA:
        assert any(float(g.abs().sum()) > 0 for k, g in grads.items() if k.startswith(f"encoders.{m}."))


def test_one_inner_step_adds_the_weighted_alignment_gradient():
    model, params = make_model("attention", SCHEMA)
    support = batch(n=8, seed=4)
    loop = InnerLoop(inner_steps=1, inner_lr=0.1, align_weight=0.3, align_temperature=0.2)
    got = adapt(model, params, support, loop=loop)
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    total = batch_loss(model, leaves, support) + 0.3 * alignment_loss(model, leaves, support, temperature=0.2)
    grads = torch.autograd.grad(total, list(leaves.values()), allow_unused=True)
    expected = {k: params[k] - 0.1 * (g if g is not None else 0) for k, g in zip(leaves, grads)}
    assert tree.max_abs_diff(got, expected) < 1e-12


@pytest.mark.parametrize("name", NAMES)
def test_weight_zero_is_bit_identical_and_a_positive_weight_is_not(name):
    model, params = make_model("late", SCHEMA)
    algorithm = get_algorithm(name)
    params = algorithm.init(params, 0.05)
    data = episodes(seed=8)
    common = dict(inner_steps=2, inner_lr=0.05, client_meta_lr=0.3)
    today = algorithm.client_update(model=model, params=params, episodes=data, hparams=algorithm.hparams(**common))
    off = algorithm.client_update(model=model, params=params, episodes=data,
                                  hparams=algorithm.hparams(**common, align_weight=0.0, align_temperature=0.5))
    on = algorithm.client_update(model=model, params=params, episodes=data,
                                 hparams=algorithm.hparams(**common, align_weight=0.5, align_temperature=0.5))
    assert all(torch.equal(today.params[k], off.params[k]) for k in params)
    assert tree.max_abs_diff(on.params, today.params) > 1e-6


def test_the_config_carries_it_to_the_inner_loop_and_record_dp_refuses_it():
    from common.task import Task

    config = load(None, overrides={"algorithm.align_weight": 0.25, "algorithm.align_temperature": 0.3,
                                   "runtime.device": "cpu"})
    loop = Task(config).hparams(Task(config).round_settings(None)).loop
    assert (loop.align_weight, loop.align_temperature) == (0.25, 0.3)
    with pytest.raises(ConfigError, match="align_weight > 0 cannot be privatized.*align_weight: 0"):
        load(None, overrides=["algorithm.align_weight=0.1", "privacy.record.enabled=true"])
    with pytest.raises(ConfigError, match="algorithm.align_temperature must be > 0"):
        load(None, overrides=["algorithm.align_temperature=0"])
    with pytest.raises(ConfigError, match="algorithm.align_weight must be >= 0"):
        load(None, overrides=["algorithm.align_weight=-1"])
