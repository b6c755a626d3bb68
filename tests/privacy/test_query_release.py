"""Record-level DP for FOMAML and Meta-SGD: the private query release and its accounting."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common import tree
from common.algorithms import get_algorithm
from common.algorithms.inner import LR_PREFIX, index_episode, loss_gradient, lr_part, model_part
from common.algorithms.private import (
    adapted_weights,
    dp_gradient,
    dp_meta_gradient,
    query_example_grads,
    released_directions,
)
from common.privacy.accounting import compute_epsilon, record_level_round_steps
from common.privacy.clipping import clip_per_example, draw_standard_noise
from algorithms.tiny import TinyNet  # tests/ is on sys.path (tests/conftest.py)

# Planning searches huge noise multipliers, where the best RDP order is the largest.
pytestmark = pytest.mark.filterwarnings("ignore:Optimal order is the")

DELTA = 1e-5


def _batch(n, *, episodes, generator, pad=0, ways=3, dim=4):
    labels = torch.randint(0, ways, (episodes, n), generator=generator)
    x = torch.randn(episodes, n, dim, generator=generator, dtype=torch.float64) + labels.unsqueeze(-1)
    weights = torch.ones(episodes, n, dtype=torch.float64)
    if pad:
        weights[:, n - pad:] = 0.0  # padding rows: weight 0, mask off, label 0 (as the sampler writes them)
        labels[:, n - pad:] = 0
    return {"inputs": {"x": x}, "masks": {"x": weights > 0}, "labels": labels, "weights": weights}


def _setup(name, *, episodes=4, support=6, query=8, pad=0, inner_steps=3, seed=0):
    model = TinyNet().double()
    g = torch.Generator().manual_seed(seed)
    weights = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) * 0.5 for k, v in model.named_parameters()}
    algorithm = get_algorithm(name)
    params = algorithm.init(weights, 0.1)
    hparams = algorithm.hparams(inner_steps=inner_steps, inner_lr=0.1, first_order=True, client_meta_lr=0.3)
    data = {"support": _batch(support, episodes=episodes, generator=g, pad=pad),
            "query": _batch(query, episodes=episodes, generator=g, pad=pad)}
    return model, algorithm, params, hparams, data


def _with_noise(data, params, *, inner_steps, support_expected=None, query_expected=None, seed=0,
                same_support_noise=False):
    """The batch as the site builds it: standard normal draws and expected sizes travel with it."""
    g = torch.Generator().manual_seed(seed)
    e = data["support"]["labels"].shape[0]
    support, query = dict(data["support"]), dict(data["query"])
    lead = (1, inner_steps) if same_support_noise else (e, inner_steps)
    noise = draw_standard_noise(model_part(params), generator=g, leading_shape=lead)
    support["dp_noise"] = {k: v.expand(e, *v.shape[1:]) for k, v in noise.items()}
    support["dp_expected"] = (support["weights"].sum(1) if support_expected is None
                              else torch.full((e,), float(support_expected), dtype=torch.float64))
    query["dp_noise"] = draw_standard_noise(params, generator=g, leading_shape=(e,))
    query["dp_expected"] = (query["weights"].sum(1) if query_expected is None
                            else torch.full((e,), float(query_expected), dtype=torch.float64))
    return {"support": support, "query": query}


def _repeat(x, n):
    """Every tensor's leading axis of 1 repeated ``n`` times (nested dicts included)."""
    if isinstance(x, dict):
        return {k: _repeat(v, n) for k, v in x.items()}
    return x.expand(n, *x.shape[1:])


def _private_update(model, algorithm, params, hparams, episodes, *, clip_norm, sigma):
    return algorithm.client_update(
        model=model, params=params, episodes=episodes, hparams=hparams,
        gradient=dp_gradient(model, clip_norm=clip_norm, noise_multiplier=sigma),
        meta_gradient=dp_meta_gradient(model, clip_norm=clip_norm, noise_multiplier=sigma),
    ).params


# --------------------------------------------------------------------------- the release itself


@pytest.mark.parametrize("name", ["fomaml", "metasgd"])
@pytest.mark.parametrize("pad", [0, 2])
def test_no_noise_and_no_clipping_equals_the_first_order_update(name, pad):
    model, algorithm, params, hparams, data = _setup(name, pad=pad)
    plain = algorithm.client_update(model=model, params=params, episodes=data, hparams=hparams,
                                    gradient=loss_gradient(model)).params
    private = _private_update(model, algorithm, params, hparams, _with_noise(data, params, inner_steps=3),
                              clip_norm=math.inf, sigma=0.0)
    assert private.keys() == plain.keys()
    assert tree.max_abs_diff(plain, private) < 1e-12
    assert tree.max_abs_diff(private, params) > 1e-3  # the update did something
    if name == "metasgd":  # the learned rates received their meta-gradient
        assert max(float((private[k] - params[k]).abs().max()) for k in params if k.startswith(LR_PREFIX)) > 1e-4


def test_local_meta_steps_take_the_same_steps_as_the_plain_update():
    model = TinyNet().double()
    _, algorithm, params, _, data = _setup("fomaml", episodes=4)
    hparams = algorithm.hparams(inner_steps=2, inner_lr=0.1, first_order=True, client_meta_lr=0.3,
                                local_meta_steps=2, optimizer="adam")
    plain = algorithm.client_update(model=model, params=params, episodes=data, hparams=hparams).params
    private = _private_update(model, algorithm, params, hparams, _with_noise(data, params, inner_steps=2),
                              clip_norm=math.inf, sigma=0.0)
    assert tree.max_abs_diff(plain, private) < 1e-12


def _opacus_grad_samples(model: nn.Module, weights, batch) -> dict[str, torch.Tensor]:
    from opacus import GradSampleModule

    reference = copy.deepcopy(model)
    with torch.no_grad():
        for k, p in reference.named_parameters():
            p.copy_(weights[k])
    gsm = GradSampleModule(reference, batch_first=True, loss_reduction="sum")
    loss = F.cross_entropy(gsm(batch["inputs"], batch["masks"]), batch["labels"], reduction="sum")
    loss.backward()
    return {k: p.grad_sample.detach().clone() for k, p in reference.named_parameters()}


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("name", ["fomaml", "metasgd"])
def test_per_query_example_grads_equal_opacus_at_the_adapted_weights(name):
    model, _, params, hparams, data = _setup(name, episodes=1)
    noisy = index_episode(_with_noise(data, params, inner_steps=3, seed=4), 0)
    # the adapted weights come from a private (clipped, noised) inner loop
    directions = released_directions(model, params, noisy["support"], loop=hparams.loop,
                                     gradient=dp_gradient(model, clip_norm=0.5, noise_multiplier=1.0))
    phi = adapted_weights(params, directions, inner_lr=0.1)
    ours = query_example_grads(model, params, directions, noisy["query"], inner_lr=0.1)
    theirs = _opacus_grad_samples(model, phi, noisy["query"])
    assert set(ours) == set(params)
    for k in theirs:  # d loss_j / d theta = d loss_j / d phi: dphi/dtheta is the identity
        assert ours[k].shape == (8, *params[k].shape)
        assert (ours[k] - theirs[k]).abs().max().item() < 1e-10, k
    if name == "metasgd":  # d loss_j / d alpha = -(d loss_j / d phi) * G
        for k in theirs:
            assert (ours[LR_PREFIX + k] + theirs[k] * directions[k]).abs().max().item() < 1e-10, k
    # phi really is theta - rate * G: the inner loop moved the weights
    assert tree.max_abs_diff(model_part(phi), model_part(params)) > 1e-3


def test_query_release_clips_each_record_and_sums_the_clipped_gradients():
    model, _, params, hparams, data = _setup("metasgd", episodes=1, pad=2)
    clip, expected = 0.05, 7.5
    noisy = index_episode(_with_noise(data, params, inner_steps=3, query_expected=expected), 0)
    inner = dp_gradient(model, clip_norm=clip, noise_multiplier=1.0)
    directions = released_directions(model, params, noisy["support"], loop=hparams.loop, gradient=inner)
    per_example = query_example_grads(model, params, directions, noisy["query"], inner_lr=0.1)
    clipped, norms = clip_per_example(per_example, clip_norm=clip)
    assert float(norms.min()) > clip  # every record is clipped: the test exercises clipping
    clipped_norms = torch.stack([g.flatten(1).norm(dim=1) for g in clipped.values()], dim=1).norm(dim=1)
    assert float(clipped_norms.max()) <= clip + 1e-12
    # without noise, the release is the sum of the real records' clipped gradients over the expected size
    grads, _, _ = dp_meta_gradient(model, clip_norm=clip, noise_multiplier=0.0)(
        params, noisy["support"], noisy["query"], hparams.loop, inner)
    real = noisy["query"]["weights"] > 0
    manual = {k: g[real].sum(0) / expected for k, g in clipped.items()}
    assert tree.max_abs_diff(grads, manual) < 1e-14
    assert float(tree.global_norm(grads)) <= int(real.sum()) * clip / expected + 1e-12


def test_query_release_noise_has_std_sigma_c_over_the_expected_size():
    draws, sigma, clip, expected = 1000, 1.7, 0.3, 5.0
    model, _, params, hparams, data = _setup("metasgd", episodes=1)
    # one episode and one support noise, repeated: only the query noise differs between draws
    repeated = _repeat(data, draws)
    noisy = _with_noise(repeated, params, inner_steps=3, query_expected=expected, seed=11, same_support_noise=True)
    inner = dp_gradient(model, clip_norm=clip, noise_multiplier=sigma)
    meta = dp_meta_gradient(model, clip_norm=clip, noise_multiplier=sigma)
    grads, _, _ = torch.func.vmap(lambda s, q: meta(params, s, q, hparams.loop, inner))(
        noisy["support"], noisy["query"])
    centred = torch.cat([(g - g.mean(0)).flatten(1) for g in grads.values()], dim=1)
    # per coordinate, the spread over draws is the noise alone; pool the variances
    empirical = float(centred.pow(2).sum(0).div(draws - 1).mean().sqrt())
    assert empirical == pytest.approx(sigma * clip / expected, rel=0.02)


def test_metasgd_learning_rates_move_under_private_training():
    model, algorithm, params, hparams, data = _setup("metasgd")
    noisy = _with_noise(data, params, inner_steps=3, seed=2)
    for sigma in (0.0, 1.0):  # with and without noise: the rates' gradient arrives
        after = _private_update(model, algorithm, params, hparams, noisy, clip_norm=1.0, sigma=sigma)
        moved = [float((after[k] - params[k]).abs().max()) for k in params if k.startswith(LR_PREFIX)]
        assert len(moved) == len(lr_part(params)) and min(moved) > 1e-5, moved


# --------------------------------------------------------------------------- accounting and planning


def test_query_release_raises_epsilon():
    support_only = record_level_round_steps(episodes=8, inner_steps=3, noise_multiplier=1.2, sample_rate=0.1)
    both = record_level_round_steps(episodes=8, inner_steps=3, noise_multiplier=1.2, sample_rate=0.1,
                                    query_release=True, query_sample_rate=0.1, query_noise_multiplier=1.2)
    assert both == support_only + [(1.2, 0.1, 8)]
    assert compute_epsilon(steps=both * 10, delta=DELTA) > compute_epsilon(steps=support_only * 10, delta=DELTA)


def test_planned_sigma_covers_both_releases_and_reaches_the_target():
    from common.privacy.planner import plan_noise_multiplier

    target, q, k, episodes, rounds = 4.0, 0.05, 3, 8, 20
    common = dict(target_epsilon=target, delta=DELTA, rounds=rounds, episodes_per_round=episodes, inner_steps=k,
                  sample_rate=q)
    reptile = plan_noise_multiplier(**common)
    fomaml = plan_noise_multiplier(**common, query_release=True, query_sample_rate=q)
    assert fomaml > reptile
    steps = record_level_round_steps(episodes=episodes, inner_steps=k, noise_multiplier=fomaml, sample_rate=q,
                                     query_release=True, query_sample_rate=q) * rounds
    eps = compute_epsilon(steps=steps, delta=DELTA)
    assert target - 0.01 <= eps <= target
    # the support-only plan would overspend once the query release is counted
    under = record_level_round_steps(episodes=episodes, inner_steps=k, noise_multiplier=reptile, sample_rate=q,
                                     query_release=True, query_sample_rate=q) * rounds
    assert compute_epsilon(steps=under, delta=DELTA) > target


def test_alternating_releases_are_accounted_as_two_entries(monkeypatch):
    """Support and query releases alternate every round; epsilon costs the same as for two grouped entries."""
    import common.privacy.accounting as accounting
    from common.privacy.accounting import PrivacyAccountant

    acc = PrivacyAccountant()
    for _ in range(50):
        acc.step_many(record_level_round_steps(episodes=4, inner_steps=3, noise_multiplier=1.1, sample_rate=0.02,
                                               query_release=True, query_sample_rate=0.02))
    assert len(acc.history) == 100  # the stored history keeps the order of the releases
    seen = []
    new_opacus = accounting._new_opacus

    def spy(kind):
        opacus = new_opacus(kind)
        seen.append(opacus)
        return opacus

    monkeypatch.setattr(accounting, "_new_opacus", spy)
    eps = acc.epsilon(delta=DELTA)
    assert [len(o.history) for o in seen] == [2]  # Opacus is handed one entry per kind of release
    grouped = compute_epsilon(steps=[(1.1 / math.sqrt(3), 0.02, 200), (1.1, 0.02, 200)], delta=DELTA)
    assert eps == pytest.approx(grouped, rel=1e-12)
