"""Meta-learning algorithms as pure functions over parameter trees."""

from common.algorithms.base import Algorithm, ClientHParams, ClientResult
from common.algorithms.inner import InnerLoop, adapt, batch_accuracy, batch_loss
from common.algorithms.registry import ALGORITHMS, get_algorithm

__all__ = [
    "ALGORITHMS",
    "Algorithm",
    "ClientHParams",
    "ClientResult",
    "InnerLoop",
    "adapt",
    "batch_accuracy",
    "batch_loss",
    "get_algorithm",
]
