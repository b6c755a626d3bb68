"""TensorBoard event files of a run (``runtime.tensorboard: true``), through ``torch.utils.tensorboard``.

Each round's ``metrics.jsonl`` line becomes scalars at step = round:

- ``train/<key>``, ``meta_test/<key>``, ``federated_eval/<key>``,
  ``privacy/<key>``, ``bounds/<key>``: every finite number of that part of the line;
- ``sites/<sampled|replied|failed|invalid|missing>``, ``bytes/<sent|received>``,
  ``time/<elapsed|round_seconds>``;
- ``accuracy/<curve>``: the held-out accuracy (``held_out``, with
  ``held_out_low`` / ``held_out_high`` from its 95% CI) and its baselines on the
  same episodes (every ``raw_1nn*`` and ``random_init*`` key of the meta-test),
  plus ``chance`` = 1 / ways. A custom-scalars layout draws them on one chart.

Needs the ``tensorboard`` package (``pip install 'metafed[tensorboard]'``).
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any

_SECTIONS = ("train", "meta_test", "federated_eval", "privacy", "bounds")
_SITES = ("sampled", "replied", "failed", "invalid", "missing")
_BASELINE_PREFIXES = ("raw_1nn", "random_init")


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def scalars(line: dict[str, Any], *, ways: int) -> dict[str, float]:
    """The tag -> value pairs a round's metrics line gives (pure; see the module doc)."""
    out: dict[str, float] = {}
    for section in _SECTIONS:
        for key, value in (line.get(section) or {}).items():
            if (number := _number(value)) is not None:
                out[f"{section}/{key}"] = number
    for key in _SITES:
        if (number := _number(line.get(f"sites_{key}"))) is not None:
            out[f"sites/{key}"] = number
    for key in ("sent", "received"):
        if (number := _number(line.get(f"bytes_{key}"))) is not None:
            out[f"bytes/{key}"] = number
    for key in ("elapsed", "round_seconds"):
        if (number := _number(line.get(key))) is not None:
            out[f"time/{key}"] = number
    meta = line.get("meta_test") or {}
    if (acc := _number(meta.get("accuracy"))) is not None:
        out["accuracy/held_out"] = acc
        ci = _number(meta.get("ci95"))
        if ci is not None:
            out["accuracy/held_out_low"] = acc - ci
            out["accuracy/held_out_high"] = acc + ci
        for key, value in meta.items():
            if key.startswith(_BASELINE_PREFIXES) and not key.endswith("ci95"):
                if (number := _number(value)) is not None:
                    out[f"accuracy/{key}"] = number
        out["accuracy/chance"] = 1.0 / ways
    fed = line.get("federated_eval") or {}
    if (acc := _number(fed.get("accuracy"))) is not None:
        out["accuracy/federated_eval"] = acc
        out.setdefault("accuracy/chance", 1.0 / ways)
    return out


def require():
    """``torch.utils.tensorboard.SummaryWriter``; a ``ConfigError`` saying what to install when it is missing."""
    from common.config import ConfigError

    if importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(
            "runtime.tensorboard=true needs the tensorboard package: pip install 'metafed[tensorboard]' "
            "(or pip install tensorboard), or set runtime.tensorboard=false"
        )
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter


class RoundEvents:
    """One event-file writer per run session under ``log_dir``."""

    def __init__(self, log_dir: str | Path, *, ways: int, purge_step: int | None = None) -> None:
        """``purge_step``: the first round this writer logs; events of that round and later already in
        ``log_dir`` (from a session that ended after its last checkpoint) are dropped on reading."""
        SummaryWriter = require()

        self.ways = ways
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)
        self.writer.add_custom_scalars({
            "accuracy": {
                "held-out accuracy and baselines": ["Multiline", ["accuracy/(?!held_out_)"]],
                "held-out accuracy, 95% CI": [
                    "Margin", ["accuracy/held_out", "accuracy/held_out_low", "accuracy/held_out_high"],
                ],
            },
        })

    def write(self, line: dict[str, Any]) -> None:
        step = int(line["round"])
        for tag, value in scalars(line, ways=self.ways).items():
            self.writer.add_scalar(tag, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
