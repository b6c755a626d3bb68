"""How validated site updates become one pseudo-gradient.

The strategy hands an aggregator the deltas ``phi_i - theta`` of the sites that
replied (sorted by site id, so that the sum has a fixed order) with their
weights, and gets back ``delta`` for the outer step
``theta <- server_opt(theta, delta)``, or None for "no update this round".

A client-level differential-privacy aggregator (clip each delta, sum, add
Gaussian noise scaled to the *expected* number of sampled sites, account the
release; :mod:`server.dp_aggregation`) implements the same method plus
``state_dict`` / ``load_state_dict``, so that its accountant is checkpointed
with the server, and ``last``, which the round's metrics line reports.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from common import tree
from common.config import Config
from common.tree import Tree

logger = logging.getLogger("flwr")


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

    # What the latest ``aggregate`` reports (epsilon so far, ...): it goes in the
    # round's metrics line under ``privacy`` when not empty.
    last: dict[str, float]


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

    last: dict[str, float] = {}


def make_aggregator(config: Config, *, secret_key: bytes | None = None) -> Aggregator:
    """Client-level DP (:mod:`server.dp_aggregation`) when ``privacy.client.enabled``, else the weighted mean.

    The accountant's sampling rate is ``federation.fraction`` under Poisson
    sampling of sites; with a fixed number of sites per round no amplification
    by sampling holds, and each round is accounted at ``q = 1``. The noise is
    drawn with ``secret_key`` (the run's :attr:`server.state.ServerState.secret_key`).
    """
    dp = config.privacy.client
    if not dp.enabled:
        return WeightedMean()
    if secret_key is None:
        raise ValueError("client-level DP needs the server's secret key: make_aggregator(config, "
                         "secret_key=state.secret_key)")
    from server.dp_aggregation import ClientLevelDP

    fed = config.federation
    if not fed.poisson:
        logger.warning(
            "client-level DP without Poisson sampling (federation.poisson=false): "
            "no amplification by sampling, each round is accounted at q=1"
        )
    return ClientLevelDP(
        clip_norm=dp.clip_norm, noise_multiplier=dp.noise_multiplier,
        sample_rate=fed.fraction if fed.poisson else 1.0, delta=dp.delta, accountant=dp.accountant,
        secret_key=secret_key,
    )
