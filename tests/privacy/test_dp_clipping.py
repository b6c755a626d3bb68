"""Clipping and noise: bounds, exact no-DP limit, padding, noise scale, vmap, client level."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from common.privacy.clipping import (
    clip_per_example,
    clip_update,
    draw_standard_noise,
    noisy_mean_of_clipped,
    per_example_grads,
    private_gradient,
    reject_non_finite,
)

D, K = 5, 3  # features, classes


def _params(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(K, D, generator=g, dtype=torch.float64),
        "b": torch.randn(K, generator=g, dtype=torch.float64),
    }


def _batch(n: int, seed: int = 1, scale: float = 3.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "x": scale * torch.randn(n, D, generator=g, dtype=torch.float64),
        "y": torch.randint(0, K, (n,), generator=g),
    }


def _loss_of_one(params, example):
    logits = example["x"] @ params["w"].T + params["b"]
    return F.cross_entropy(logits.unsqueeze(0), example["y"].unsqueeze(0))


def _zero_noise(params):
    return {k: torch.zeros_like(v) for k, v in params.items()}


def test_clipped_norms_never_exceed_clip_norm():
    params = _params()
    per_example = per_example_grads(_loss_of_one, params, _batch(64))
    for clip_norm in (1e-3, 0.1, 0.5, 2.0):
        clipped, norms = clip_per_example(per_example, clip_norm=clip_norm)
        after = torch.sqrt(sum(v.flatten(1).pow(2).sum(1) for v in clipped.values()))
        assert (after <= clip_norm + 1e-6).all()
        small = norms < clip_norm  # unclipped examples keep (almost) their gradient
        assert torch.allclose(after[small], norms[small], rtol=1e-5)
    # C = inf: exactly unchanged
    clipped, _ = clip_per_example(per_example, clip_norm=math.inf)
    assert all(torch.equal(clipped[k], per_example[k]) for k in per_example)


def test_no_noise_no_clipping_is_the_plain_mean_gradient():
    params = _params()
    batch = _batch(16)
    per_example = per_example_grads(_loss_of_one, params, batch)
    out = private_gradient(
        per_example, weights=torch.ones(16, dtype=torch.float64), clip_norm=math.inf,
        noise_multiplier=0.0, standard_noise=draw_standard_noise(params, generator=torch.Generator()),
        expected_batch_size=16,
    )
    full = torch.func.grad(
        lambda p: F.cross_entropy(batch["x"] @ p["w"].T + p["b"], batch["y"])
    )(params)
    for k in params:
        assert torch.allclose(out[k], full[k], rtol=1e-12, atol=1e-15)
        # factor exactly 1, noise exactly 0: only the summation order can differ
        assert torch.allclose(out[k], per_example[k].sum(0) / 16, rtol=1e-14, atol=1e-16)


def test_padding_contributes_nothing():
    params = _params()
    batch = _batch(8)
    per_example = per_example_grads(_loss_of_one, params, batch)
    weights = torch.tensor([1, 1, 0, 1, 0, 0, 1, 1], dtype=torch.float64)
    noise = draw_standard_noise(params, generator=torch.Generator().manual_seed(5))
    kwargs = dict(clip_norm=0.3, noise_multiplier=1.0, standard_noise=noise, expected_batch_size=4.0)
    padded = private_gradient(per_example, weights=weights, **kwargs)
    real = weights > 0
    unpadded = private_gradient(
        {k: v[real] for k, v in per_example.items()}, weights=torch.ones(5, dtype=torch.float64), **kwargs
    )
    garbage = {k: torch.where(real.reshape(-1, *[1] * (v.dim() - 1)), v, torch.inf) for k, v in per_example.items()}
    poisoned = private_gradient(garbage, weights=weights, **kwargs)
    for k in params:
        assert torch.allclose(padded[k], unpadded[k], rtol=1e-13, atol=1e-15)
        assert torch.equal(poisoned[k], padded[k])


def test_noise_std_is_sigma_c_over_expected_batch():
    params = {"a": torch.zeros(10, 5), "b": torch.zeros(7)}
    per_example = {k: torch.zeros(4, *v.shape) for k, v in params.items()}
    sigma, clip_norm, expected = 1.7, 0.6, 12.0
    noise = draw_standard_noise(params, generator=torch.Generator().manual_seed(0), leading_shape=(4000,))
    assert noise["a"].shape == (4000, 10, 5)
    release = torch.func.vmap(
        lambda z: private_gradient(
            per_example, weights=torch.ones(4), clip_norm=clip_norm, noise_multiplier=sigma,
            standard_noise=z, expected_batch_size=expected,
        )
    )(noise)
    samples = torch.cat([v.flatten() for v in release.values()])
    target = sigma * clip_norm / expected
    assert abs(samples.std().item() / target - 1) < 0.02
    assert abs(samples.mean().item()) < 0.02 * target


def test_noise_draws_are_seeded_and_order_independent():
    params = _params()
    a = draw_standard_noise(params, generator=torch.Generator().manual_seed(9))
    b = draw_standard_noise(dict(reversed(list(params.items()))), generator=torch.Generator().manual_seed(9))
    assert list(a) == list(params)
    assert all(torch.equal(a[k], b[k]) for k in params)
    assert a["w"].dtype == torch.float64


def test_nested_vmap_over_episodes_equals_a_loop():
    """A meta-batch of episodes runs its DP gradients at once under an outer vmap."""
    params = _params()
    episodes = 3
    batches = {k: torch.stack([_batch(6, seed=s)[k] for s in range(episodes)]) for k in ("x", "y")}
    weights = torch.tensor([[1, 1, 1, 0, 1, 0], [1] * 6, [0, 1, 1, 1, 1, 1]], dtype=torch.float64)
    noise = draw_standard_noise(params, generator=torch.Generator().manual_seed(2), leading_shape=(episodes,))
    sigmas = torch.tensor([0.0, 0.5, 2.0], dtype=torch.float64)  # per-episode tensors are fine too

    def one(batch, w, z, sigma):
        pe = per_example_grads(_loss_of_one, params, batch)
        return private_gradient(pe, weights=w, clip_norm=0.7, noise_multiplier=sigma,
                                standard_noise=z, expected_batch_size=5.0)

    batched = torch.func.vmap(one)(batches, weights, noise, sigmas)
    for e in range(episodes):
        ref = one({k: v[e] for k, v in batches.items()}, weights[e], {k: v[e] for k, v in noise.items()},
                  float(sigmas[e]))
        for k in params:
            assert torch.allclose(batched[k][e], ref[k], rtol=1e-12, atol=1e-14)


def test_noise_without_a_finite_clip_norm_is_refused():
    params = _params()
    per_example = {k: torch.zeros(2, *v.shape, dtype=v.dtype) for k, v in params.items()}
    with pytest.raises(ValueError, match="finite clip_norm"):
        private_gradient(per_example, weights=torch.ones(2), clip_norm=math.inf, noise_multiplier=1.0,
                         standard_noise=_zero_noise(params), expected_batch_size=2)


# --------------------------------------------------------------------------- client level


def _tree_norm(t):
    return math.sqrt(sum(float(v.double().pow(2).sum()) for v in t.values()))


def test_clip_update_bounds_norm_and_handles_zero():
    g = torch.Generator().manual_seed(0)
    for scale in (0.01, 1.0, 50.0):
        delta = {"w": scale * torch.randn(4, 3, generator=g), "b": scale * torch.randn(3, generator=g)}
        clipped, norm = clip_update(delta, clip_norm=1.5)
        assert norm == pytest.approx(_tree_norm(delta))
        assert _tree_norm(clipped) <= 1.5 * (1 + 1e-6)
        if norm <= 1.5:
            assert all(torch.equal(clipped[k], delta[k]) for k in delta)
    zero = {"w": torch.zeros(4, 3), "b": torch.zeros(3)}
    clipped, norm = clip_update(zero, clip_norm=1.0)
    assert norm == 0.0 and all(torch.equal(clipped[k], zero[k]) for k in zero)
    with pytest.raises(ValueError, match="reject_non_finite"):
        clip_update({"w": torch.tensor([1.0, math.nan])}, clip_norm=1.0)


def test_reject_non_finite():
    ok = {"w": torch.ones(3)}
    deltas = [ok, {"w": torch.tensor([1.0, math.nan, 0.0])}, ok, {"w": torch.tensor([math.inf, 0, 0])}]
    kept, rejected = reject_non_finite(deltas)
    assert rejected == [1, 3] and len(kept) == 2
    # why: a NaN passes a min(1, C / norm) clip unchanged, Inf turns into NaN
    nan_norm = torch.tensor(math.nan)
    assert torch.isnan(torch.clamp(1.0 / nan_norm, max=1.0))


def test_noisy_mean_divides_by_expected_clients_not_replies():
    deltas = [{"w": torch.full((3,), 2.0)}, {"w": torch.full((3,), 0.1)}]
    out = noisy_mean_of_clipped(deltas, clip_norm=1.0, noise_multiplier=0.0, expected_clients=4.0,
                                generator=torch.Generator().manual_seed(0))
    first = 2.0 * 1.0 / math.sqrt(12.0)  # clipped to norm 1
    assert torch.allclose(out["w"], torch.full((3,), (first + 0.1) / 4.0))
    # no site sampled this round: the release is noise alone
    empty = noisy_mean_of_clipped([], clip_norm=1.0, noise_multiplier=1.0, expected_clients=4.0,
                                  generator=torch.Generator().manual_seed(0), template=deltas[0])
    assert empty["w"].shape == (3,) and (empty["w"] != 0).all()
    with pytest.raises(ValueError, match="template"):
        noisy_mean_of_clipped([], clip_norm=1.0, noise_multiplier=1.0, expected_clients=4.0,
                              generator=torch.Generator())


def test_client_noise_std_is_z_s_over_expected_clients():
    z, clip_norm, expected = 1.2, 0.5, 8.0
    g = torch.Generator().manual_seed(11)
    deltas = [{"w": torch.zeros(50, dtype=torch.float64), "b": torch.zeros(50, dtype=torch.float64)}] * 3
    samples = torch.cat([
        torch.cat(list(noisy_mean_of_clipped(deltas, clip_norm=clip_norm, noise_multiplier=z,
                                             expected_clients=expected, generator=g).values()))
        for _ in range(1500)
    ])
    target = z * clip_norm / expected
    assert abs(samples.std().item() / target - 1) < 0.02
    # and every clipped update stays within S
    big = [{"w": torch.randn(100, generator=g, dtype=torch.float64) * 10} for _ in range(20)]
    assert all(_tree_norm(clip_update(d, clip_norm=clip_norm)[0]) <= clip_norm * (1 + 1e-12) for d in big)
