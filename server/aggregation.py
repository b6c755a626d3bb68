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

import logging
from typing import Any, Protocol

import torch

from common import tree
from common.config import Config
from common.tree import Tree
from server.state import STREAM_DP_NOISE, derived_seed

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

    def report(self) -> dict[str, Any] | None:
        """What goes in the round's metrics line under ``privacy`` (None: nothing)."""
        ...


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

    def report(self) -> dict[str, Any] | None:
        return None


class ClientLevelDP:
    """DP-FedAvg at the server: ``(sum_i clip_S(delta_i) + N(0, (z S)^2)) / (q N)``.

    Each site's delta is clipped to ``privacy.client.clip_norm`` (S) as a whole,
    the clipped deltas are summed with equal weight (a weighted sum would break
    the per-site sensitivity bound), Gaussian noise of std ``z S`` is added and
    the sum is divided by the *expected* number of sampled sites (``q N``), not
    by the number that replied. A round in which Poisson sampling picks no site
    still releases noise, and is accounted like any other.

    Accounting: one release per round at ``(z, q)`` (:func:`client_level_round_steps`)
    in a :class:`PrivacyAccountant` whose state is checkpointed with the server, so
    epsilon is cumulative over rounds and across resumed sessions. ``q`` is
    ``federation.fraction`` under Poisson sampling; with a fixed number of sites per
    round no amplification by sampling holds and ``q = 1`` is accounted.

    The noise generator is seeded from ``(federation.seed, round)`` so that runs
    are reproducible and resumable; the base seed stays on the server (sites only
    ever see per-site seeds derived from it by a hash).
    """

    def __init__(self, config: Config) -> None:
        from common.privacy import PrivacyAccountant

        self.dp = config.privacy.client
        self.seed = config.federation.seed
        fed = config.federation
        self.sample_rate = fed.fraction if fed.poisson else 1.0
        if not fed.poisson:
            logger.warning(
                "client-level DP without Poisson sampling (federation.poisson=false): "
                "no amplification by sampling, each round is accounted at q=1"
            )
        self.accountant = PrivacyAccountant(self.dp.accountant)
        self.rounds = 0

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
        from common.privacy import client_level_round_steps, noisy_mean_of_clipped

        generator = torch.Generator().manual_seed(derived_seed(self.seed, server_round, STREAM_DP_NOISE))
        delta = noisy_mean_of_clipped(
            deltas,
            clip_norm=self.dp.clip_norm,
            noise_multiplier=self.dp.noise_multiplier,
            expected_clients=expected_sampled,
            generator=generator,
            template=template,
        )
        self.accountant.step_many(
            client_level_round_steps(noise_multiplier=self.dp.noise_multiplier, sample_rate=self.sample_rate)
        )
        self.rounds += 1
        return delta

    def state_dict(self) -> dict[str, Any]:
        return {"accountant": self.accountant.state_dict(), "rounds": self.rounds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.accountant.load_state_dict(state["accountant"])
        self.rounds = int(state.get("rounds", 0))

    def report(self) -> dict[str, Any] | None:
        return {
            "client_epsilon": self.accountant.epsilon(delta=self.dp.delta),
            "client_delta": self.dp.delta,
            "noise_multiplier": self.dp.noise_multiplier,
            "clip_norm": self.dp.clip_norm,
            "sample_rate": self.sample_rate,
            "accountant": self.dp.accountant,
            "rounds_accounted": self.rounds,
        }


def make_aggregator(config: Config) -> Aggregator:
    """Client-level DP when ``privacy.client.enabled``, else the episode-weighted mean."""
    if config.privacy.client.enabled:
        return ClientLevelDP(config)
    return WeightedMean()
