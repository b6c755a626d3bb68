"""DP-SGD inside the vmapped inner loop."""

import math

import pytest
import torch

from common import tree
from common.algorithms import get_algorithm
from common.algorithms.inner import InnerLoop, adapt, index_episode, loss_gradient
from common.algorithms.private import dp_gradient
from common.privacy.clipping import draw_standard_noise

from .tiny import TinyNet, make_episodes, make_params


def _with_noise(episodes, params, *, steps, expected, seed=0):
    episodes = {"support": dict(episodes["support"]), "query": episodes["query"]}
    n = episodes["support"]["labels"].shape[0]
    episodes["support"]["dp_noise"] = tree.to(
        draw_standard_noise(params, generator=torch.Generator().manual_seed(seed), leading_shape=(n, steps)),
        dtype=torch.float64,
    )
    episodes["support"]["dp_expected"] = torch.full((n,), float(expected), dtype=torch.float64)
    return episodes


@pytest.mark.parametrize("name", ["reptile", "fedavg"])
def test_dp_with_no_noise_and_no_clipping_equals_the_plain_update(name):
    model = TinyNet().double()
    params = make_params(model, torch.float64)
    algorithm = get_algorithm(name)
    hparams = algorithm.hparams(inner_steps=3, inner_lr=0.1, train_on_query=False)
    data = make_episodes(4, support=6)
    # the non-private update on the same data (the support only, which DP uses)
    plain = algorithm.client_update(model=model, params=params, episodes=data, hparams=hparams,
                                    gradient=loss_gradient(model)).params
    private = algorithm.client_update(
        model=model, params=params, episodes=_with_noise(data, params, steps=3, expected=6), hparams=hparams,
        gradient=dp_gradient(model, clip_norm=math.inf, noise_multiplier=0.0),
    ).params
    assert tree.max_abs_diff(plain, private) < 1e-12


def test_dp_step_clips_and_adds_calibrated_noise():
    model = TinyNet().double()
    params = make_params(model, torch.float64)
    data = make_episodes(1, support=6)
    sigma, clip, expected = 2.0, 0.1, 6.0
    noisy = _with_noise(data, params, steps=1, expected=expected, seed=5)
    support = index_episode(noisy, 0)["support"]
    adapted = adapt(model, params, support, loop=InnerLoop(1, 1.0),
                    gradient=dp_gradient(model, clip_norm=clip, noise_multiplier=sigma))
    step = tree.sub(params, adapted)  # lr 1: the private gradient itself
    noise = {k: v[0] for k, v in support["dp_noise"].items()}
    # what is left after removing the noise is a sum of 6 clipped gradients / 6: norm <= C
    signal = tree.sub(step, tree.scale(noise, sigma * clip / expected))
    assert float(tree.global_norm(signal)) <= clip + 1e-9
    # and equals the per-record gradients, each clipped by hand, summed, over the expected size
    from common.algorithms.inner import batch_loss

    expected_sum = tree.zeros_like(params)
    norms = []
    for i in range(6):
        one = {k: ({m: t[i:i + 1] for m, t in v.items()} if isinstance(v, dict) else v[i:i + 1])
               for k, v in index_episode(data, 0)["support"].items()}
        leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        grads = dict(zip(leaves, torch.autograd.grad(batch_loss(model, leaves, one), list(leaves.values()))))
        norm = float(tree.global_norm(grads))
        norms.append(norm)
        expected_sum = tree.axpy(min(1.0, clip / (norm + 1e-6)), grads, expected_sum)
    assert min(norms) > clip  # every record was clipped: the test exercises clipping
    assert tree.max_abs_diff(signal, tree.scale(expected_sum, 1 / expected)) < 1e-12
