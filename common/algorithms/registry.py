"""Algorithm names -> their functions, decided once here and nowhere else."""

from __future__ import annotations

from dataclasses import replace

from common.algorithms import fedavg, maml, metasgd, protonet, reptile, untrained
from common.algorithms.base import Algorithm

ALGORITHMS: dict[str, Algorithm] = {
    # No training: the random initialization, the baseline of every report.
    "none": untrained.ALGORITHM,
    "fedavg": fedavg.ALGORITHM,
    "reptile": reptile.ALGORITHM,
    # FOMAML is MAML that never differentiates through the inner gradients.
    "fomaml": replace(maml.ALGORITHM, name="fomaml", second_order=False),
    "maml": maml.ALGORITHM,
    "metasgd": metasgd.ALGORITHM,
    "protonet": protonet.ALGORITHM,
}


def get_algorithm(name: str) -> Algorithm:
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r}; choose one of {', '.join(ALGORITHMS)}") from None
