"""The outer step's exact arithmetic, and state kept across rounds."""

import math

import torch

from common.algorithms import server_opt
from common.config import ServerOptConfig


def test_sgd_step_is_theta_plus_lr_times_delta():
    cfg = ServerOptConfig(name="sgd", lr=0.5)
    theta = {"w": torch.tensor([1.0, -2.0])}
    delta = {"w": torch.tensor([0.4, 0.2])}
    state = server_opt.init_state(theta, config=cfg)
    new, state = server_opt.apply(theta, delta, state, config=cfg, round_index=0, total_rounds=10)
    assert torch.equal(new["w"], torch.tensor([1.2, -1.9]))
    assert state["step"] == 1


def test_linear_schedule_anneals_to_zero():
    cfg = ServerOptConfig(name="sgd", lr=1.0, schedule="linear")
    assert server_opt.step_size(config=cfg, round_index=0, total_rounds=4) == 1.0
    assert server_opt.step_size(config=cfg, round_index=3, total_rounds=4) == 0.25


def test_adam_two_rounds_match_hand_computation():
    cfg = ServerOptConfig(name="adam", lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8)
    theta = {"w": torch.tensor([0.0], dtype=torch.float64)}
    state = server_opt.init_state(theta, config=cfg)
    d1, d2 = 0.5, -0.25
    theta, state = server_opt.apply(theta, {"w": torch.tensor([d1], dtype=torch.float64)}, state,
                                    config=cfg, round_index=0, total_rounds=2)
    # round 1: g=-d1, m=0.1 g, v=0.01 g^2, bias-corrected m_hat=g, v_hat=g^2 -> step lr*sign
    assert math.isclose(float(theta["w"]), 0.1 * 0.5 / (0.5 + 1e-8), rel_tol=1e-12)
    theta, state = server_opt.apply(theta, {"w": torch.tensor([d2], dtype=torch.float64)}, state,
                                    config=cfg, round_index=1, total_rounds=2)
    g1, g2 = -d1, -d2
    m = 0.9 * (0.1 * g1) + 0.1 * g2
    v = 0.99 * (0.01 * g1**2) + 0.01 * g2**2
    m_hat, v_hat = m / (1 - 0.9**2), v / (1 - 0.99**2)
    expected = 0.1 * 0.5 / (0.5 + 1e-8) - 0.1 * m_hat / (math.sqrt(v_hat) + 1e-8)
    assert math.isclose(float(theta["w"]), expected, rel_tol=1e-12)
    assert state["step"] == 2


def test_momentum_state_round_trips_through_arrays():
    cfg = ServerOptConfig(name="sgd", lr=1.0, momentum=0.9)
    theta = {"w": torch.ones(3)}
    state = server_opt.init_state(theta, config=cfg)
    theta, state = server_opt.apply(theta, {"w": torch.ones(3)}, state, config=cfg, round_index=0, total_rounds=3)
    tensors, scalars = server_opt.state_to_arrays(state)
    restored = server_opt.state_from_arrays(tensors, scalars)
    a, _ = server_opt.apply(theta, {"w": torch.ones(3)}, state, config=cfg, round_index=1, total_rounds=3)
    b, _ = server_opt.apply(theta, {"w": torch.ones(3)}, restored, config=cfg, round_index=1, total_rounds=3)
    assert torch.equal(a["w"], b["w"]) and torch.equal(a["w"], torch.full((3,), 1 + 1 + 1.9))
