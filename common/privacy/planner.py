"""Budget planning: the noise multiplier that reaches a target epsilon, and its summary.

Record-level DP accounts each episode as ONE release at ``(sigma / sqrt(k), q)``
(:func:`common.privacy.accounting.episode_release`), so planning finds the
per-episode noise multiplier ``sigma'`` with Opacus's ``get_noise_multiplier``
over ``participations * episodes_per_round`` steps and returns the per-inner-step
``sigma = sigma' * sqrt(k)``. Algorithms that also release a noised query
gradient per episode (FOMAML, Meta-SGD: ``query_release``) add one release at
``(sigma, q_query)`` per episode, and ``sigma`` is then found by a binary
search over the composition of both kinds of release. Client-level DP is one
release per round at the site sampling rate ``q_c``.

Planning follows Opacus: the returned noise multiplier gives an epsilon in
``[target_epsilon - epsilon_tolerance, target_epsilon]`` (binary search,
default tolerance 0.01).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .accounting import (
    ACCOUNTANTS,
    Step,
    compute_epsilon,
    validate_steps,
)

# Opacus's bound on the noise multiplier its search tries (opacus.accountants.utils.MAX_SIGMA).
MAX_SIGMA = 1e6

__all__ = [
    "plan_sigma_for_steps",
    "plan_noise_multiplier",
    "plan_client_noise",
    "participations",
    "format_plan",
]


def _check_target(target_epsilon: float, delta: float, accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {', '.join(ACCOUNTANTS)}; got {accountant!r}")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1); got {delta}")
    if math.isnan(target_epsilon) or target_epsilon <= 0:
        raise ValueError(
            f"target_epsilon must be > 0 (math.inf for no privacy, i.e. no noise); got {target_epsilon}"
        )


def _too_low(target_epsilon: float, delta: float, what: str) -> ValueError:
    return ValueError(
        f"target_epsilon={target_epsilon} at delta={delta} cannot be reached with a noise "
        f"multiplier up to {MAX_SIGMA:g} for {what}: raise the target epsilon (or delta), or "
        "make fewer releases (rounds, episodes) or lower the sample rate"
    )


def _bisect(eps_of: Callable[[float], float], target_epsilon: float, tolerance: float, what: str, delta: float) -> float:
    """Opacus's search (``get_noise_multiplier``) for any monotone ``eps_of(sigma)``."""
    eps_high = math.inf
    sigma_low, sigma_high = 0.0, 10.0
    while eps_high > target_epsilon:
        sigma_high = 2 * sigma_high
        eps_high = eps_of(sigma_high)
        if sigma_high > MAX_SIGMA:
            raise _too_low(target_epsilon, delta, what)
    while target_epsilon - eps_high > tolerance:
        sigma = (sigma_low + sigma_high) / 2
        eps = eps_of(sigma)
        if eps < target_epsilon:
            sigma_high, eps_high = sigma, eps
        else:
            sigma_low = sigma
    return sigma_high


def plan_sigma_for_steps(
    *,
    target_epsilon: float,
    delta: float,
    steps: Sequence[tuple[float, int, float]],
    accountant: str = "rdp",
    epsilon_tolerance: float = 0.01,
) -> float:
    """The base noise multiplier ``sigma`` for a schedule of releases.

    ``steps`` lists ``(sample_rate, count, sigma_scale)``: ``count`` releases at
    noise multiplier ``sigma * sigma_scale`` and rate ``sample_rate``. The
    returned ``sigma`` makes the whole schedule reach ``target_epsilon`` at
    ``delta`` (within ``epsilon_tolerance`` below it). A schedule with a single
    kind of release is planned with Opacus's ``get_noise_multiplier`` itself;
    a mixed one with the same binary search over the composed history.
    ``target_epsilon=inf`` returns 0.0 (no noise).
    """
    _check_target(target_epsilon, delta, accountant)
    if math.isinf(target_epsilon):
        return 0.0
    kinds: dict[tuple[float, float], int] = {}
    for entry in steps:
        if len(entry) != 3:
            raise ValueError(f"planning steps are (sample_rate, count, sigma_scale); got {entry!r}")
        q, count, scale = entry
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"sigma_scale must be finite and > 0; got {scale!r}")
        validate_steps([(1.0, q, count)])
        if count:
            kinds[(float(q), float(scale))] = kinds.get((float(q), float(scale)), 0) + int(count)
    if not kinds:
        return 0.0  # nothing is released, nothing to protect
    what = f"{sum(kinds.values())} releases"
    if len(kinds) == 1:
        from opacus.accountants.utils import get_noise_multiplier  # slow import, done when needed

        ((q, scale), count), = kinds.items()
        try:
            with np.errstate(divide="ignore"):  # PRV at q = 1 takes a harmless log(0)
                sigma_eff = get_noise_multiplier(
                    target_epsilon=target_epsilon,
                    target_delta=delta,
                    sample_rate=q,
                    steps=count,
                    accountant=accountant,
                    epsilon_tolerance=epsilon_tolerance,
                )
        except ValueError as err:
            if "too low" in str(err):
                raise _too_low(target_epsilon, delta, what) from None
            raise
        return float(sigma_eff) / scale

    def eps_of(sigma: float) -> float:
        history = [(sigma * scale, q, count) for (q, scale), count in kinds.items()]
        return compute_epsilon(steps=history, delta=delta, accountant=accountant)

    return _bisect(eps_of, target_epsilon, epsilon_tolerance, what, delta)


def participations(*, rounds: int | None = None, expected_participations: float | None = None) -> int:
    """Rounds a site takes part in: ``rounds`` or ``ceil(expected_participations)``.

    With sites sampled at rate ``q_c`` a site takes part in about ``rounds * q_c``
    rounds. Planning for the expectation (rounded up) is an estimate, not a
    guarantee: a site that is sampled more often spends more, and its ledger's
    ``max_epsilon`` is what stops it.
    """
    if (rounds is None) == (expected_participations is None):
        raise ValueError("give exactly one of rounds= or expected_participations=")
    if rounds is not None:
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
            raise ValueError(f"rounds must be a whole number >= 0; got {rounds!r}")
        return rounds
    if not (math.isfinite(expected_participations) and expected_participations >= 0):
        raise ValueError(f"expected_participations must be finite and >= 0; got {expected_participations}")
    # rounds * q_c is often a float a hair above a whole number (30 * 0.1).
    return math.ceil(expected_participations - 1e-9)


def plan_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    episodes_per_round: int,
    inner_steps: int,
    sample_rate: float,
    rounds: int | None = None,
    expected_participations: float | None = None,
    query_release: bool = False,
    query_sample_rate: float = 1.0,
    accountant: str = "rdp",
    epsilon_tolerance: float = 0.01,
) -> float:
    """Record-level noise multiplier per inner step for a site's whole budget.

    Args:
        target_epsilon: the site's budget (``inf``: returns 0.0).
        delta: the site's delta.
        episodes_per_round: support sets drawn per round the site takes part in.
        inner_steps: DP-SGD steps per support set (``k``).
        sample_rate: Poisson rate ``q`` of each record into a support set.
        rounds / expected_participations: how many rounds the site takes part
            in (exactly one; see :func:`participations`).
        query_release: FOMAML / Meta-SGD also release a noised query gradient per
            episode, at ``query_sample_rate`` and the same ``sigma``.

    Without a query release this is Opacus's ``get_noise_multiplier`` for
    ``participations * episodes_per_round`` steps at ``q``, times ``sqrt(k)``.
    """
    if isinstance(inner_steps, bool) or not isinstance(inner_steps, int) or inner_steps < 0:
        raise ValueError(f"inner_steps must be a whole number >= 0; got {inner_steps!r}")
    if isinstance(episodes_per_round, bool) or not isinstance(episodes_per_round, int) or episodes_per_round < 0:
        raise ValueError(f"episodes_per_round must be a whole number >= 0; got {episodes_per_round!r}")
    n = participations(rounds=rounds, expected_participations=expected_participations)
    episodes = n * episodes_per_round
    schedule: list[tuple[float, int, float]] = []
    if inner_steps:
        schedule.append((sample_rate, episodes, 1.0 / math.sqrt(inner_steps)))
    if query_release:
        schedule.append((query_sample_rate, episodes, 1.0))
    if inner_steps and not query_release:
        # sigma = sigma' * sqrt(k), with sigma' from get_noise_multiplier (exact form of 1/scale).
        _check_target(target_epsilon, delta, accountant)
        if math.isinf(target_epsilon) or episodes == 0:
            return 0.0
        sigma_eff = plan_sigma_for_steps(
            target_epsilon=target_epsilon, delta=delta, steps=[(sample_rate, episodes, 1.0)],
            accountant=accountant, epsilon_tolerance=epsilon_tolerance,
        )
        return sigma_eff * math.sqrt(inner_steps)
    return plan_sigma_for_steps(
        target_epsilon=target_epsilon, delta=delta, steps=schedule,
        accountant=accountant, epsilon_tolerance=epsilon_tolerance,
    )


def plan_client_noise(
    *,
    target_epsilon: float,
    delta: float,
    rounds: int,
    sample_rate: float,
    accountant: str = "rdp",
    epsilon_tolerance: float = 0.01,
) -> float:
    """Client-level noise multiplier ``z``: one release per round at site sampling rate ``q_c``."""
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise ValueError(f"rounds must be a whole number >= 0; got {rounds!r}")
    return plan_sigma_for_steps(
        target_epsilon=target_epsilon, delta=delta, steps=[(sample_rate, rounds, 1.0)],
        accountant=accountant, epsilon_tolerance=epsilon_tolerance,
    )


def _num(x: float) -> str:
    if x is None:
        return "-"
    if math.isinf(x):
        return "inf"
    return f"{x:.4g}"


def format_plan(
    *,
    level: str,
    accountant: str,
    delta: float,
    noise_multiplier: float,
    clip_norm: float,
    sample_rate: float,
    steps: Sequence[Step] | Sequence[Sequence[Any]],
    epsilon: float | None = None,
    target_epsilon: float | None = None,
    inner_steps: int | None = None,
    query_release: bool = False,
) -> str:
    """A readable summary of a privacy plan, for the command line.

    ``steps`` is the whole run's step list (e.g. a round's
    :func:`~common.privacy.accounting.record_level_round_steps` times the
    participations); ``epsilon`` is computed from it when not given.
    ``query_release`` says that each episode also releases a noised query
    gradient (FOMAML, Meta-SGD).
    """
    steps = validate_steps(steps)
    if epsilon is None:
        epsilon = compute_epsilon(steps=steps, delta=delta, accountant=accountant)
    if level == "record":
        title = "record-level DP (each record of a site), DP-SGD in the inner loop"
    elif level == "client":
        title = "client-level DP (each site's participation), DP-FedAvg on the server"
    else:
        raise ValueError(f"level must be 'record' or 'client'; got {level!r}")
    target = "" if target_epsilon is None else f" (target {_num(target_epsilon)})"
    lines = [
        f"{title}, {accountant} accountant",
        f"  epsilon = {_num(epsilon)} at delta = {delta:g}{target}",
        f"  noise multiplier sigma = {_num(noise_multiplier)}, clipping norm C = {_num(clip_norm)}, "
        f"sample rate q = {_num(sample_rate)}",
    ]
    if inner_steps:
        lines.append(
            f"  {inner_steps} inner steps per episode on one support sample: one release at "
            f"sigma/sqrt({inner_steps}) = {_num(noise_multiplier / math.sqrt(inner_steps))} per episode"
        )
    if query_release:
        lines.append(
            f"  plus one query-gradient release per episode at sigma = {_num(noise_multiplier)} on its own "
            "Poisson sample (first-order meta-gradient, clipped per query record)"
        )
    total = sum(c for _, _, c in steps)
    lines.append(f"  releases: {total} in all")
    for sigma, q, count in steps:
        lines.append(f"    {count} x Gaussian(noise multiplier {_num(sigma)}) at sample rate {_num(q)}")
    return "\n".join(lines)
