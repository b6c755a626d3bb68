"""Server optimizers for the outer (meta) step over a pseudo-gradient.

Each round the server forms ``delta = mean_i w_i (phi_i - theta)`` from the
sites' adapted weights ``phi_i``. Batched Reptile (Nichol, Achiam & Schulman
2018, arXiv 1803.02999, Alg. 2) is ``theta <- theta + eps * delta``, which is
FedAvg with a server step size; FedOpt (Reddi et al., ICLR 2021, "Adaptive
Federated Optimization") uses ``-delta`` as a gradient for Adam. The optimizer
state is a plain dict that lives in the server state, so it is checkpointed
and never rebuilt between rounds.
"""

from __future__ import annotations

from typing import Any

import torch

from common import tree
from common.config import ServerOptConfig
from common.tree import Tree

OptState = dict[str, Any]


def init_state(params: Tree, *, config: ServerOptConfig) -> OptState:
    """Fresh optimizer state for ``params`` (moments at zero, step 0)."""
    state: OptState = {"step": 0}
    if config.name == "sgd" and config.momentum > 0:
        state["momentum"] = tree.zeros_like(params)
    if config.name == "adam":
        state["m"] = tree.zeros_like(params)
        state["v"] = tree.zeros_like(params)
    return state


def step_size(*, config: ServerOptConfig, round_index: int, total_rounds: int) -> float:
    """The outer step size at 0-based ``round_index``.

    ``linear`` anneals from ``lr`` towards 0 over the run, as Reptile does.
    """
    if config.schedule == "linear":
        return config.lr * (1.0 - round_index / max(total_rounds, 1))
    return config.lr


def apply(
    params: Tree,
    delta: Tree,
    state: OptState,
    *,
    config: ServerOptConfig,
    round_index: int,
    total_rounds: int,
) -> tuple[Tree, OptState]:
    """One outer step: returns new parameters and new state (inputs unchanged).

    ``delta`` is the weighted mean of ``phi_i - theta`` (an ascent direction on
    the sites' adapted weights, i.e. minus a gradient).
    """
    lr = step_size(config=config, round_index=round_index, total_rounds=total_rounds)
    step = int(state["step"]) + 1
    new_state: OptState = {"step": step}
    if config.name == "sgd":
        direction = delta
        if config.momentum > 0:
            # Heavy-ball on the pseudo-gradient, as FedAvgM (Hsu et al. 2019).
            direction = tree.axpy(config.momentum, state["momentum"], delta)
            new_state["momentum"] = direction
        return tree.axpy(lr, direction, params), new_state
    if config.name == "adam":
        grad = tree.scale(delta, -1.0)
        b1, b2 = config.beta1, config.beta2
        m = {k: b1 * state["m"][k] + (1 - b1) * grad[k] for k in params}
        v = {k: b2 * state["v"][k] + (1 - b2) * grad[k] * grad[k] for k in params}
        m_hat_scale = 1.0 / (1 - b1**step)
        v_hat_scale = 1.0 / (1 - b2**step)
        new_params = {
            k: params[k] - lr * (m[k] * m_hat_scale) / (torch.sqrt(v[k] * v_hat_scale) + config.eps)
            for k in params
        }
        new_state.update(m=m, v=v)
        return new_params, new_state
    raise ValueError(f"server_opt.name must be 'sgd' or 'adam'; got {config.name!r}")


def state_to_arrays(state: OptState) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split the state into named tensors and JSON-able scalars (for checkpoints)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, dict):
            for name, t in value.items():
                tensors[f"{key}/{name}"] = t
        else:
            scalars[key] = value
    return tensors, scalars


def state_from_arrays(tensors: dict[str, torch.Tensor], scalars: dict[str, Any]) -> OptState:
    state: OptState = dict(scalars)
    for flat, t in tensors.items():
        key, name = flat.split("/", 1)
        state.setdefault(key, {})[name] = t
    return state
