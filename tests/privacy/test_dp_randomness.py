"""The keyed source of DP noise and coins: the right distribution, replayable with the key only."""

import math

import numpy as np
import pytest
import torch

from common.privacy.clipping import draw_standard_noise
from common.privacy.randomness import KeyedStream, fresh_key, reproducible_key


def test_standard_normal_has_the_moments_and_tails_of_n01():
    z = KeyedStream(fresh_key()).standard_normal((400_001,)).numpy()  # odd: one Box-Muller half is cut
    assert z.shape == (400_001,) and np.isfinite(z).all()
    assert abs(z.mean()) < 4 / math.sqrt(z.size)
    assert z.std() == pytest.approx(1.0, abs=0.005)
    assert np.mean(z**4) == pytest.approx(3.0, abs=0.05)  # kurtosis of a Gaussian
    assert np.mean(np.abs(z) > 1.959964) == pytest.approx(0.05, abs=0.002)
    from scipy import stats

    assert stats.kstest(z[:50_000], "norm").pvalue > 1e-4


def test_uniform_is_uniform_and_coins_have_the_rate():
    u = KeyedStream(fresh_key()).uniform((200, 1000)).numpy()
    assert u.min() >= 0.0 and u.max() < 1.0
    assert np.histogram(u, bins=10, range=(0, 1))[0] == pytest.approx([20_000] * 10, rel=0.03)
    assert np.mean(u < 0.3) == pytest.approx(0.3, abs=0.005)


def test_same_key_replays_and_another_key_or_label_does_not():
    key = fresh_key()
    a, b = KeyedStream(key), KeyedStream(key)
    assert torch.equal(a.standard_normal((5, 7)), b.standard_normal((5, 7)))
    assert torch.equal(a.uniform((9,)), b.uniform((9,)))
    assert not torch.equal(a.uniform((9,)), KeyedStream(key).uniform((9,)))  # calls advance the stream
    assert not torch.equal(KeyedStream(key).child("noise").uniform((9,)), KeyedStream(key).child("coins").uniform((9,)))
    assert not torch.equal(KeyedStream(fresh_key()).uniform((9,)), KeyedStream(key).uniform((9,)))
    assert reproducible_key(3) == reproducible_key(3) != reproducible_key(4)
    assert key.hex() not in repr(a)


def test_draw_standard_noise_takes_a_keyed_stream_in_sorted_key_order():
    params = {"b": torch.zeros(3, dtype=torch.float64), "a": torch.zeros(2, 2)}
    key = fresh_key()
    x = draw_standard_noise(params, generator=KeyedStream(key), leading_shape=(4,))
    y = draw_standard_noise(dict(reversed(list(params.items()))), generator=KeyedStream(key), leading_shape=(4,))
    assert list(x) == ["b", "a"] and x["a"].shape == (4, 2, 2) and x["b"].dtype == torch.float64
    assert all(torch.equal(x[k], y[k]) for k in params)


def test_a_short_key_is_refused():
    with pytest.raises(ValueError, match="at least 16 bytes"):
        KeyedStream(b"seed")
