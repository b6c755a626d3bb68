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

Robust rules (``aggregation.rule``) bound what a few bad sites can do to the
mean: the coordinate-wise median and trimmed mean, multi-Krum, and norm
clipping before the mean. Where Flower ships the arithmetic
(``flwr.serverapp.strategy``: FedMedian, FedTrimmedAvg, MultiKrum) they run it,
so they give exactly Flower's result on the same updates.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean
from flwr.serverapp.strategy.multikrum import select_multikrum
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from common import tree
from common.config import AggregationConfig, Config
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


def _numpy_layers(deltas: list[Tree], key: str) -> np.ndarray:
    return np.stack([d[key].detach().cpu().numpy() for d in deltas])


def _as_tree(arrays: dict[str, np.ndarray], template: Tree) -> Tree:
    return {k: torch.from_numpy(np.array(arrays[k], copy=True)).to(template[k].dtype) for k in template}


class _Stateless:
    last: dict[str, float] = {}
    report_key = "aggregation"  # where the round's metrics line reports ``last``

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


class CoordinateMedian(_Stateless):
    """Coordinate-wise median of the updates, unweighted.

    Yin, Chen, Ramchandran & Bartlett, "Byzantine-Robust Distributed Learning:
    Towards Optimal Statistical Rates", ICML 2018. Any minority of sites cannot
    move a coordinate outside the range of the honest values. Flower's FedMedian
    arithmetic (``np.median`` over the stacked layers).
    """

    def aggregate(self, deltas: list[Tree], weights: list[float], *, template: Tree, **_: Any) -> Tree | None:
        if not deltas:
            return None
        return _as_tree({k: np.asarray(np.median(_numpy_layers(deltas, k), axis=0)) for k in template}, template)


class TrimmedMean(_Stateless):
    """Coordinate-wise trimmed mean: drop the ``beta`` share of largest and smallest values, average the rest.

    Yin, Chen, Ramchandran & Bartlett, ICML 2018 (as above). Tolerates up to a
    ``beta`` share of bad sites per coordinate. Flower's ``trim_mean`` (FedTrimmedAvg).
    """

    def __init__(self, *, beta: float) -> None:
        self.beta = beta

    def aggregate(self, deltas: list[Tree], weights: list[float], *, template: Tree, **_: Any) -> Tree | None:
        if not deltas:
            return None
        return _as_tree({k: np.asarray(trim_mean(_numpy_layers(deltas, k), self.beta)) for k in template}, template)


class MultiKrum(_Stateless):
    """Multi-Krum: average the ``m`` updates closest to their ``n - f - 2`` nearest neighbours.

    Blanchard, El Mhamdi, Guerraoui & Stainer, "Machine Learning with
    Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS 2017. Each
    update's score is the sum of squared L2 distances to its ``n - f - 2``
    closest others; the ``m`` lowest-scoring ones (``m = n - f`` unless set) are
    averaged, weighted by episodes. Flower's ``select_multikrum`` and weighted
    average (MultiKrum), on the updates packed as its records.
    """

    def __init__(self, *, byzantine: int, select: int = 0) -> None:
        self.byzantine = byzantine
        self.select = select
        self.last: dict[str, float] = {}

    def aggregate(self, deltas: list[Tree], weights: list[float], *, template: Tree, **_: Any) -> Tree | None:
        if not deltas:
            return None
        contents = [
            RecordDict({"arrays": ArrayRecord({k: Array(d[k].detach().cpu().numpy()) for k in template}),
                        "metrics": MetricRecord({"weight": float(w)})})
            for d, w in zip(deltas, weights)
        ]
        m = self.select or max(1, len(deltas) - self.byzantine)
        chosen = select_multikrum(contents, num_malicious_nodes=self.byzantine, num_nodes_to_select=m)
        self.last = {"krum_selected": float(len(chosen)), "krum_left_out": float(len(deltas) - len(chosen))}
        mean = aggregate_arrayrecords(chosen, "weight")
        return _as_tree({k: mean[k].numpy() for k in template}, template)


class ClippedMean(_Stateless):
    """Clip each update to L2 norm ``S``, then the episode-weighted mean.

    Sun, Kairouz, Suresh & McMahan, "Can You Really Backdoor Federated
    Learning?", 2019 (norm bounding). ``S`` is ``clip_norm``, or the round's
    median update norm when 0, so that one site moves the mean by at most
    its weight share of ``S``. Flower has no server-side clipping outside its DP
    wrappers (which add noise), so the clipping is here.
    """

    def __init__(self, *, clip_norm: float = 0.0) -> None:
        self.clip_norm = clip_norm
        self.last: dict[str, float] = {}

    def aggregate(self, deltas: list[Tree], weights: list[float], *, template: Tree, **_: Any) -> Tree | None:
        if not deltas:
            return None
        norms = [float(tree.global_norm(d)) for d in deltas]
        bound = self.clip_norm or statistics.median(norms)
        clipped = [d if n <= bound else tree.scale(d, bound / n) for d, n in zip(deltas, norms)]
        self.last = {"clip_norm": bound, "clipped": float(sum(n > bound for n in norms))}
        return tree.weighted_mean(clipped, weights)


# aggregation.rule -> the aggregator it names.
RULES: dict[str, Callable[[AggregationConfig], Aggregator]] = {
    "mean": lambda c: WeightedMean(),
    "median": lambda c: CoordinateMedian(),
    "trimmed_mean": lambda c: TrimmedMean(beta=c.trim_fraction),
    "multikrum": lambda c: MultiKrum(byzantine=c.krum_byzantine, select=c.krum_select),
    "clipped_mean": lambda c: ClippedMean(clip_norm=c.clip_norm),
}


def make_aggregator(config: Config, *, secret_key: bytes | None = None) -> Aggregator:
    """Client-level DP (:mod:`server.dp_aggregation`) when ``privacy.client.enabled``, else ``aggregation.rule``.

    The config refuses a robust rule together with client-level DP, whose noise
    is calibrated to the mean of clipped updates.

    The accountant's sampling rate is ``federation.fraction`` under Poisson
    sampling of sites; with a fixed number of sites per round no amplification
    by sampling holds, and each round is accounted at ``q = 1``. The noise is
    drawn with ``secret_key`` (the run's :attr:`server.state.ServerState.secret_key`).
    """
    dp = config.privacy.client
    if not dp.enabled:
        return RULES[config.aggregation.rule](config.aggregation)
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
