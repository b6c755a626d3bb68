"""Differential privacy for metafed: clipping and noise, accounting, planning, the ledger.

* :mod:`.clipping` -- pure, vmappable per-example clipping and noise (record
  level, DP-SGD) and the server's clipped noisy mean (client level, DP-FedAvg).
* :mod:`.accounting` -- :class:`PrivacyAccountant` over Opacus's RDP / PRV
  accountants and the rules that say what each round costs.
* :mod:`.planner` -- the noise multiplier for a target epsilon, and a summary.
* :mod:`.ledger` -- a site's spent budget, kept in a JSON file across runs.
* :mod:`.randomness` -- secret, keyed draws for noise and sampling coins.

Names are loaded from their module on first use, so importing the package (or
just :mod:`.clipping`) does not pay for importing Opacus.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "clipping": (
        "clip_per_example",
        "clip_update",
        "draw_standard_noise",
        "noisy_mean_of_clipped",
        "per_example_grads",
        "private_gradient",
        "reject_non_finite",
    ),
    "accounting": (
        "ACCOUNTANTS",
        "PrivacyAccountant",
        "client_level_round_steps",
        "compute_epsilon",
        "episode_release",
        "record_level_round_steps",
        "steps_for_epochs",
    ),
    "planner": (
        "format_plan",
        "participations",
        "plan_client_noise",
        "plan_noise_multiplier",
        "plan_sigma_for_steps",
    ),
    "ledger": ("BudgetExceeded", "PrivacyLedger", "PrivacyLedgerError"),
    "randomness": ("KeyedStream", "fresh_key", "reproducible_key"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
