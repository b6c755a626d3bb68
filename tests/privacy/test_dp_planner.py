"""Planning: the planned noise reaches the target epsilon (re-accounted), and the summary."""

from __future__ import annotations

import math

import pytest

# Planning searches huge noise multipliers, where the best RDP order is the largest.
pytestmark = pytest.mark.filterwarnings("ignore:Optimal order is the")

from common.privacy.accounting import (
    PrivacyAccountant,
    client_level_round_steps,
    compute_epsilon,
    record_level_round_steps,
    steps_for_epochs,
)
from common.privacy.planner import (
    format_plan,
    participations,
    plan_client_noise,
    plan_noise_multiplier,
    plan_sigma_for_steps,
)

DELTA = 1e-5
TOL = 0.01  # Opacus's default epsilon_tolerance: eps lands in [target - TOL, target]


def test_opacus_oracle_noise_multiplier():
    """get_noise_multiplier(target_epsilon=8, target_delta=1e-5, sample_rate=0.04, epochs=90) -> 1.416."""
    steps = steps_for_epochs(epochs=90, sample_rate=0.04)
    sigma = plan_client_noise(target_epsilon=8.0, delta=DELTA, rounds=steps, sample_rate=0.04)
    assert round(sigma, 3) == 1.416
    assert 8.0 - TOL <= compute_epsilon(steps=[(sigma, 0.04, steps)], delta=DELTA) <= 8.0


def test_record_level_plan_reaches_target_when_reaccounted():
    target, k, q = 3.0, 5, 0.005
    sigma = plan_noise_multiplier(target_epsilon=target, delta=DELTA, rounds=20, episodes_per_round=8,
                                  inner_steps=k, sample_rate=q)
    # the planner's formula: Opacus's sigma' for rounds * episodes steps, times sqrt(k)
    from opacus.accountants.utils import get_noise_multiplier

    sigma_prime = get_noise_multiplier(target_epsilon=target, target_delta=DELTA, sample_rate=q, steps=160)
    assert sigma == pytest.approx(sigma_prime * math.sqrt(k), rel=1e-12)
    # re-account the run round by round, as a site would
    acc = PrivacyAccountant()
    for _ in range(20):
        acc.step_many(record_level_round_steps(episodes=8, inner_steps=k, noise_multiplier=sigma, sample_rate=q))
    assert target - TOL <= acc.epsilon(delta=DELTA) <= target


def test_record_level_plan_with_query_release_reaches_target():
    target = 6.0
    sigma = plan_noise_multiplier(target_epsilon=target, delta=DELTA, expected_participations=2.0,
                                  episodes_per_round=4, inner_steps=3, sample_rate=0.02, query_release=True,
                                  query_sample_rate=1.0)
    round_steps = record_level_round_steps(episodes=4, inner_steps=3, noise_multiplier=sigma, sample_rate=0.02,
                                           query_release=True, query_sample_rate=1.0)
    eps = compute_epsilon(steps=round_steps * 2, delta=DELTA)
    assert target - TOL <= eps <= target


def test_client_level_plan_with_prv_reaches_target():
    # q = 1 (sites not Poisson-sampled) keeps the PRV search fast; the search is the same for any q.
    sigma = plan_client_noise(target_epsilon=5.0, delta=DELTA, rounds=10, sample_rate=1.0, accountant="prv",
                              epsilon_tolerance=0.05)
    eps = compute_epsilon(steps=client_level_round_steps(noise_multiplier=sigma, sample_rate=1.0) * 10,
                          delta=DELTA, accountant="prv")
    assert 5.0 - 0.05 <= eps <= 5.0


def test_infinite_target_means_no_noise_and_bad_targets_are_explained():
    assert plan_client_noise(target_epsilon=math.inf, delta=DELTA, rounds=10, sample_rate=0.1) == 0.0
    assert plan_noise_multiplier(target_epsilon=math.inf, delta=DELTA, rounds=10, episodes_per_round=2,
                                 inner_steps=5, sample_rate=0.1) == 0.0
    with pytest.raises(ValueError, match="target_epsilon must be > 0"):
        plan_client_noise(target_epsilon=0.0, delta=DELTA, rounds=10, sample_rate=0.1)
    with pytest.raises(ValueError, match="raise the target epsilon"):
        plan_client_noise(target_epsilon=0.05, delta=DELTA, rounds=10, sample_rate=1.0)


def test_participations():
    assert participations(rounds=30) == 30
    assert participations(expected_participations=30 * 0.1) == 3  # 3.0000000000000004
    assert participations(expected_participations=2.2) == 3
    with pytest.raises(ValueError, match="exactly one"):
        participations(rounds=3, expected_participations=3.0)


def test_plan_sigma_for_steps_single_schedule_matches_scaled_opacus():
    base = plan_sigma_for_steps(target_epsilon=2.0, delta=DELTA, steps=[(1.0, 100, 1.0)])
    scaled = plan_sigma_for_steps(target_epsilon=2.0, delta=DELTA, steps=[(1.0, 60, 0.5), (1.0, 40, 0.5)])
    assert scaled == pytest.approx(base / 0.5, rel=1e-12)


def test_format_plan_names_everything_a_claim_needs():
    steps = record_level_round_steps(episodes=40, inner_steps=5, noise_multiplier=2.5, sample_rate=0.02)
    text = format_plan(level="record", accountant="rdp", delta=DELTA, noise_multiplier=2.5, clip_norm=1.0,
                       sample_rate=0.02, steps=steps, target_epsilon=4.0, inner_steps=5)
    eps = compute_epsilon(steps=steps, delta=DELTA)
    for needle in (f"epsilon = {eps:.4g}", "delta = 1e-05", "sigma = 2.5", "C = 1", "q = 0.02",
                   "40 x", "rdp", "target 4", "sigma/sqrt(5) = 1.118"):
        assert needle in text, (needle, text)
    client = format_plan(level="client", accountant="prv", delta=DELTA, noise_multiplier=1.0, clip_norm=0.5,
                         sample_rate=0.1, steps=[(1.0, 0.1, 3)], epsilon=1.25)
    assert "client-level" in client and "epsilon = 1.25" in client
