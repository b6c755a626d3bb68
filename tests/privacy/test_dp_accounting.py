"""Accounting: oracle values, the sigma/sqrt(k) rule, state round-trips, monotonicity.

Oracle values come from the privacy notes (Opacus 1.6 / dp-accounting 0.6,
delta = 1e-5), printed there to 4-5 significant digits. Each case is checked
three ways:

* against the printed table value, to its printed precision (half a unit in the
  last printed digit: the table is rounded, so 1e-6 relative cannot be asked of it);
* against the full-precision value Opacus 1.6 gives for the same history, to
  1e-6 relative (pins the result; PRV is a deterministic FFT computation whose
  output, an upper bound within Opacus's eps_error=0.01 of the true epsilon, is
  reproduced to ~1e-15 here, so the same 1e-6 holds for it).

That the wrapper returns exactly what Opacus's accountants return for the same
history is checked once more in ``test_state_is_interchangeable_with_opacus``.
"""

from __future__ import annotations

import json
import math

import pytest

from common.privacy.accounting import (
    PrivacyAccountant,
    client_level_round_steps,
    compute_epsilon,
    episode_release,
    record_level_round_steps,
    steps_for_epochs,
)

DELTA = 1e-5
MNIST_Q = 256 / 60000

# (sigma, q, steps, kind, table value, printed decimals, full-precision Opacus 1.6 value)
ORACLES = [
    (1.1, MNIST_Q, 14062, "rdp", 2.5966, 4, 2.5965558689607486),
    (1.1, MNIST_Q, 14062, "prv", 2.3917, 4, 2.391743703391286),
    (1.1, MNIST_Q, 3515, "rdp", 1.2811, 4, 1.281144275963647),
    (1.1, MNIST_Q, 3515, "prv", 1.1438, 4, 1.143789530418123),
    (0.7, MNIST_Q, 10546, "rdp", 6.3181, 4, 6.318100586877763),
    (0.7, MNIST_Q, 10546, "prv", 5.6498, 4, 5.649766689462127),
    (1.0, 1.0, 100, "rdp", 96.116, 3, 96.11630842505602),
    (1.0, 0.2, 100, "rdp", 15.973, 3, 15.972634593460551),
    (1.0, 0.1, 100, "rdp", 7.899, 3, 7.899255002434629),
    (1.5, 0.04, 2249, "prv", 6.7774, 4, 6.777395710070868),  # Opacus's own test
]


def test_step_conventions_match_opacus_epochs():
    assert steps_for_epochs(epochs=60, sample_rate=MNIST_Q) == 14062
    assert steps_for_epochs(epochs=15, sample_rate=MNIST_Q) == 3515
    assert steps_for_epochs(epochs=45, sample_rate=MNIST_Q) == 10546
    # Opacus's own PRV test writes int(90 // 0.04) = 2249; get_noise_multiplier(epochs=90)
    # uses int(90 / 0.04) = 2250, which is what steps_for_epochs follows.
    assert steps_for_epochs(epochs=90, sample_rate=0.04) == 2250


@pytest.mark.filterwarnings("ignore:Optimal order")
@pytest.mark.parametrize("sigma,q,steps,kind,table,decimals,full", ORACLES,
                         ids=[f"{o[3]}-s{o[0]}-q{o[1]:.4g}-n{o[2]}" for o in ORACLES])
def test_oracle_values(sigma, q, steps, kind, table, decimals, full):
    acc = PrivacyAccountant(kind)
    acc.step(noise_multiplier=sigma, sample_rate=q, num_steps=steps)
    eps = acc.epsilon(delta=DELTA)
    assert abs(eps - table) <= 0.5 * 10 ** -decimals + 1e-12
    assert eps == pytest.approx(full, rel=1e-6)


def test_one_step_at_a_time_equals_num_steps():
    a, b = PrivacyAccountant(), PrivacyAccountant()
    for _ in range(250):
        a.step(noise_multiplier=1.1, sample_rate=0.01)
    b.step(noise_multiplier=1.1, sample_rate=0.01, num_steps=250)
    assert a.history == b.history == [(1.1, 0.01, 250)]
    assert a.epsilon(delta=DELTA) == b.epsilon(delta=DELTA)


def test_episode_rule_sigma_over_sqrt_k():
    """200 episodes, k=5 inner steps, sigma=1, q=0.01: naive 2.10, correct 12.97."""
    assert episode_release(noise_multiplier=1.0, inner_steps=5) == pytest.approx(1 / math.sqrt(5))
    naive = compute_epsilon(steps=[(1.0, 0.01, 200 * 5)], delta=DELTA)
    steps = record_level_round_steps(episodes=200, inner_steps=5, noise_multiplier=1.0, sample_rate=0.01)
    assert steps == [(1.0 / math.sqrt(5), 0.01, 200)]
    correct = compute_epsilon(steps=steps, delta=DELTA)
    assert round(naive, 2) == 2.10
    assert round(correct, 2) == 12.97
    assert correct > naive
    with pytest.raises(ValueError, match="inner_steps"):
        episode_release(noise_multiplier=1.0, inner_steps=0)


def test_k_releases_on_one_sample_equal_one_at_sigma_over_sqrt_k_without_sampling():
    """At q = 1 (no sampling) the rule is the plain composition of Gaussians: RDP adds linearly."""
    k = 7
    composed = compute_epsilon(steps=[(2.0, 1.0, k)], delta=DELTA)
    single = compute_epsilon(steps=[(episode_release(noise_multiplier=2.0, inner_steps=k), 1.0, 1)], delta=DELTA)
    assert composed == pytest.approx(single, rel=1e-9)


def test_query_release_is_one_more_release_per_episode():
    steps = record_level_round_steps(episodes=8, inner_steps=4, noise_multiplier=4.0, sample_rate=0.01,
                                     query_release=True)
    assert steps == [(2.0, 0.01, 8), (4.0, 1.0, 8)]
    without = compute_epsilon(steps=steps[:1], delta=DELTA)
    assert compute_epsilon(steps=steps, delta=DELTA) > without
    assert record_level_round_steps(episodes=8, inner_steps=0, noise_multiplier=2.0, sample_rate=0.1) == []
    assert client_level_round_steps(noise_multiplier=1.0, sample_rate=0.1) == [(1.0, 0.1, 1)]


@pytest.mark.parametrize("kind", ["rdp", "prv"])
def test_state_round_trips_through_json(kind):
    acc = PrivacyAccountant(kind)
    # (RDP and PRV are slow for large q at fractional orders; these rates keep the test fast.)
    acc.step(noise_multiplier=1.5, sample_rate=0.01, num_steps=40)
    acc.step_many(record_level_round_steps(episodes=10, inner_steps=4, noise_multiplier=4.0, sample_rate=0.02,
                                           query_release=True))
    before = acc.epsilon(delta=DELTA)
    restored = PrivacyAccountant(kind)
    restored.load_state_dict(json.loads(json.dumps(acc.state_dict())))
    assert restored.history == acc.history
    assert all(isinstance(entry, tuple) for entry in restored.history)
    assert restored.epsilon(delta=DELTA) == before
    assert PrivacyAccountant.from_state_dict(acc.state_dict()).history == acc.history
    with pytest.raises(ValueError, match="PrivacyAccountant\\(kind="):
        PrivacyAccountant("prv" if kind == "rdp" else "rdp").load_state_dict(acc.state_dict())


def test_state_is_interchangeable_with_opacus():
    from opacus.accountants import RDPAccountant

    theirs = RDPAccountant()
    for _ in range(30):
        theirs.step(noise_multiplier=0.9, sample_rate=0.02)
    ours = PrivacyAccountant.from_state_dict(theirs.state_dict())
    assert ours.epsilon(delta=DELTA) == theirs.get_epsilon(delta=DELTA)
    back = RDPAccountant()
    back.load_state_dict(ours.state_dict())
    assert back.get_epsilon(delta=DELTA) == theirs.get_epsilon(delta=DELTA)


def test_epsilon_is_zero_before_any_step_and_monotone():
    acc = PrivacyAccountant()
    assert acc.epsilon(delta=DELTA) == 0.0
    last = 0.0
    for sigma, q in [(2.0, 0.01), (2.0, 0.01), (5.0, 1.0), (1.5, 1.0), (3.0, 0.01)]:
        acc.step(noise_multiplier=sigma, sample_rate=q, num_steps=20)
        eps = acc.epsilon(delta=DELTA)
        assert eps >= last
        last = eps
    assert acc.num_steps == 100


def test_epsilon_if_does_not_change_state():
    acc = PrivacyAccountant()
    acc.step(noise_multiplier=2.0, sample_rate=1.0, num_steps=10)
    history, eps = acc.history, acc.epsilon(delta=DELTA)
    ahead = acc.epsilon_if(delta=DELTA, noise_multiplier=2.0, sample_rate=0.01, num_steps=90)
    assert acc.history == history and acc.epsilon(delta=DELTA) == eps
    twin = acc.copy()
    twin.step(noise_multiplier=2.0, sample_rate=0.01, num_steps=90)
    assert twin.epsilon(delta=DELTA) == ahead > eps
    assert acc.history == history  # the copy is independent


def test_no_noise_means_no_guarantee_and_bad_steps_are_refused():
    acc = PrivacyAccountant()
    acc.step(noise_multiplier=0.0, sample_rate=0.5)
    assert acc.epsilon(delta=DELTA) == math.inf
    with pytest.raises(ValueError, match="sample_rate"):
        acc.step(noise_multiplier=1.0, sample_rate=0.0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        acc.step(noise_multiplier=-1.0, sample_rate=0.5)
    with pytest.raises(ValueError, match="accountant must be one of"):
        PrivacyAccountant("gdp")
    before = acc.history
    with pytest.raises(ValueError):
        acc.step_many([(1.0, 0.1, 5), (1.0, 2.0, 5)])  # all-or-nothing
    assert acc.history == before
