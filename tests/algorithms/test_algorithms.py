"""Properties of the inner loop and the site updates."""

import pytest
import torch

from common import tree
from common.algorithms import get_algorithm
from common.algorithms.inner import InnerLoop, adapt, batch_loss, index_episode
from common.algorithms.maml import episode_meta_loss
from common.algorithms.reference import REFERENCES, meta_gradient_reference

from .tiny import TinyNet, make_episodes, make_params

NAMES = ["fedavg", "reptile", "fomaml", "maml", "metasgd"]


def _setup(name, dtype, *, episodes=4, inner_steps=3, local_meta_steps=1):
    model = TinyNet().to(dtype)
    algorithm = get_algorithm(name)
    params = algorithm.init(make_params(model, dtype), 0.1)
    hparams = algorithm.hparams(inner_steps=inner_steps, inner_lr=0.1, client_meta_lr=0.3,
                                local_meta_steps=local_meta_steps)
    data = make_episodes(episodes, dtype=dtype)
    return model, algorithm, params, hparams, data


@pytest.mark.parametrize("name", NAMES)
def test_vectorized_update_equals_per_episode_reference_float64(name):
    model, algorithm, params, hparams, data = _setup(name, torch.float64, local_meta_steps=2)
    fast = algorithm.client_update(model=model, params=params, episodes=data, hparams=hparams).params
    slow = REFERENCES[name](model=model, params=params, episodes=data, hparams=hparams).params
    assert tree.max_abs_diff(fast, slow) < 1e-10
    assert tree.max_abs_diff(fast, params) > 1e-3  # the update did something


@pytest.mark.parametrize("name", NAMES)
def test_adam_inner_loop_vectorized_equals_reference(name):
    model = TinyNet().double()
    algorithm = get_algorithm(name)
    params = algorithm.init(make_params(model, torch.float64), 0.01)
    hparams = algorithm.hparams(inner_steps=3, inner_lr=0.01, client_meta_lr=0.3, optimizer="adam")
    data = make_episodes(3)
    fast = algorithm.client_update(model=model, params=params, episodes=data, hparams=hparams).params
    slow = REFERENCES[name](model=model, params=params, episodes=data, hparams=hparams).params
    assert tree.max_abs_diff(fast, slow) < 1e-10


@pytest.mark.parametrize("name", NAMES)
def test_vectorized_update_equals_reference_float32(name):
    model, algorithm, params, hparams, data = _setup(name, torch.float32)
    fast = algorithm.client_update(model=model, params=params, episodes=data, hparams=hparams).params
    slow = REFERENCES[name](model=model, params=params, episodes=data, hparams=hparams).params
    for k in fast:
        scale = slow[k].abs().max().clamp_min(1.0)
        assert float((fast[k] - slow[k]).abs().max() / scale) < 1e-5, k


def _finite_difference(f, params, eps=1e-6):
    grads = {}
    for k, v in params.items():
        g = torch.zeros_like(v)
        flat = g.view(-1)
        for i in range(v.numel()):
            plus = {**params, k: v.clone().view(-1).index_fill(0, torch.tensor([i]), v.view(-1)[i] + eps).view_as(v)}
            minus = {**params, k: v.clone().view(-1).index_fill(0, torch.tensor([i]), v.view(-1)[i] - eps).view_as(v)}
            flat[i] = (f(plus) - f(minus)) / (2 * eps)
        grads[k] = g
    return grads


@pytest.mark.parametrize("name", ["maml", "metasgd"])
def test_meta_gradient_equals_finite_differences(name):
    model, algorithm, params, hparams, data = _setup(name, torch.float64, episodes=1, inner_steps=2)
    episode = index_episode(data, 0)

    def meta_loss(p):
        return float(episode_meta_loss(model, p, episode["support"], episode["query"], hparams=hparams)[0])

    numeric = _finite_difference(meta_loss, params)
    analytic = meta_gradient_reference(model=model, params=params, episode=episode, hparams=hparams)
    vectorized = torch.func.grad(
        lambda p: episode_meta_loss(model, p, episode["support"], episode["query"], hparams=hparams)[0]
    )(params)
    assert tree.max_abs_diff(analytic, numeric) < 1e-7
    assert tree.max_abs_diff(vectorized, numeric) < 1e-7
    if name == "metasgd":
        # the learned rates get their own, non-trivial meta-gradient
        rates = {k: v for k, v in vectorized.items() if k.startswith("inner_lr/")}
        assert rates and tree.global_norm(rates) > 1e-4


def test_maml_and_fomaml_differ_measurably():
    model, maml_algo, params, _, data = _setup("maml", torch.float64, episodes=1, inner_steps=3)
    episode = index_episode(data, 0)
    second = get_algorithm("maml").hparams(inner_steps=3, inner_lr=0.5)
    first = get_algorithm("fomaml").hparams(inner_steps=3, inner_lr=0.5)
    assert not second.loop.first_order and first.loop.first_order
    g2 = meta_gradient_reference(model=model, params=params, episode=episode, hparams=second)
    g1 = meta_gradient_reference(model=model, params=params, episode=episode, hparams=first)
    relative = tree.global_norm(tree.sub(g2, g1)) / tree.global_norm(g2)
    assert relative > 0.01


def test_first_order_flag_in_config_turns_maml_first_order():
    hp = get_algorithm("maml").hparams(inner_steps=1, inner_lr=0.1, first_order=True)
    assert hp.loop.first_order


def test_adapting_lowers_support_loss():
    model, _, params, _, data = _setup("reptile", torch.float64, episodes=1)
    support = index_episode(data, 0)["support"]
    before = float(batch_loss(model, params, support))
    after = float(batch_loss(model, adapt(model, params, support, loop=InnerLoop(5, 0.1)), support))
    assert after < before - 1e-3


@pytest.mark.parametrize("name", ["maml", "fomaml", "metasgd"])
def test_meta_gradients_reach_every_initialization_tensor(name):
    model, algorithm, params, hparams, data = _setup(name, torch.float64, episodes=1)
    episode = index_episode(data, 0)
    g = meta_gradient_reference(model=model, params=params, episode=episode, hparams=hparams)
    for k, v in g.items():
        assert float(v.abs().max()) > 0, f"no meta-gradient reaches {k}"


def test_reptile_moves_toward_adapted_weights():
    model, algorithm, params, hparams, data = _setup("reptile", torch.float64)
    result = algorithm.client_update(model=model, params=params, episodes=data, hparams=hparams)
    # phi - theta is a descent direction on the episodes' support loss (first-order Reptile argument)
    delta = tree.sub(result.params, params)
    support = data["support"]
    loss_before = sum(float(batch_loss(model, params, index_episode(data, i)["support"])) for i in range(4))
    small_step = tree.axpy(0.1, delta, params)
    loss_after = sum(float(batch_loss(model, small_step, index_episode(data, i)["support"])) for i in range(4))
    assert loss_after < loss_before
    assert {"train_loss", "adapted_loss"} <= set(result.metrics)


def test_unknown_algorithm_lists_valid_names():
    with pytest.raises(ValueError, match="reptile"):
        get_algorithm("nope")


def test_none_replies_with_the_weights_it_was_sent():
    model, algorithm, params, hparams, data = _setup("none", torch.float64)
    result = algorithm.client_update(model=model, params=params, episodes=data, hparams=hparams)
    assert tree.max_abs_diff(result.params, params) == 0
    assert all(result.params[k] is not params[k] for k in params)  # copies: the caller's may be reused


def test_reptile_reports_the_query_loss_after_adaptation():
    model, algorithm, params, hparams, data = _setup("reptile", torch.float64)
    metrics = algorithm.client_update(model=model, params=params, episodes=data, hparams=hparams).metrics
    assert "query_loss" in metrics and float(metrics["query_loss"]) < float(metrics["train_loss"])
