"""How validated site updates become one pseudo-gradient.

The strategy hands an aggregator the deltas ``phi_i - theta`` of the sites that
replied (sorted by site id, so that the sum has a fixed order) with their
weights, and gets back ``delta`` for the outer step
``theta <- server_opt(theta, delta)``, or None for "no update this round".

A client-level differential-privacy aggregator (clip each delta, sum, add
Gaussian noise scaled to the *expected* number of sampled sites, account the
release) implements the same two methods plus ``state_dict`` /
``load_state_dict`` so that its accountant is checkpointed with the server.
"""

from __future__ import annotations

from typing import Any, Protocol

from common import tree
from common.tree import Tree


class Aggregator(Protocol):
    def aggregate(
        self,
        deltas: list[Tree],
        weights: list[float],
        *,
        template: Tree,
        server_round: int,
        num_sampled: int,
        expected_sampled: float,
    ) -> Tree | None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class WeightedMean:
    """``delta = sum_i w_i delta_i / sum_i w_i`` (weights: episodes each site used)."""

    def aggregate(
        self,
        deltas: list[Tree],
        weights: list[float],
        *,
        template: Tree,
        server_round: int,
        num_sampled: int,
        expected_sampled: float,
    ) -> Tree | None:
        if not deltas:
            return None
        return tree.weighted_mean(deltas, weights)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None
