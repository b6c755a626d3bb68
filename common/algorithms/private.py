"""DP-SGD as a gradient oracle for :func:`common.algorithms.inner.adapt`.

Abadi et al., "Deep Learning with Differential Privacy", CCS 2016: each
record's gradient is clipped to norm C, the clipped gradients are summed,
Gaussian noise of std sigma*C is added and the sum is divided by the expected
batch size. Per-example gradients come from ``vmap(grad(loss of one
record))``, which nests inside the ``vmap`` over episodes (Opacus's hooks do
not compose with ``torch.func``; the arithmetic is Opacus's, see
:mod:`common.privacy.clipping`).

The noise is drawn outside, from the site's seeded generator, and travels
with the support set: ``support["dp_noise"]`` holds standard normal draws with
a leading ``[inner_steps]`` axis and ``support["dp_expected"]`` the expected
support size. That keeps the oracle pure and every run reproducible.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.algorithms.inner import GradientFn, logits
from common.privacy.clipping import per_example_grads, private_gradient
from common.tree import Tree

CORE_KEYS = ("inputs", "masks", "labels", "weights")


def _as_batch_of_one(example: dict) -> dict:
    return {k: (_as_batch_of_one(v) if isinstance(v, dict) else v.unsqueeze(0)) for k, v in example.items()}


def dp_gradient(model: nn.Module, *, clip_norm: float, noise_multiplier: float) -> GradientFn:
    """A gradient oracle that returns the DP-SGD gradient of the support loss."""

    def loss_of_one(params: Tree, example: dict) -> torch.Tensor:
        one = _as_batch_of_one(example)
        return F.cross_entropy(logits(model, params, one), one["labels"], reduction="sum")

    def gradient(params: Tree, batch: dict, step: int) -> Tree:
        core = {k: batch[k] for k in CORE_KEYS}
        per_example = per_example_grads(loss_of_one, params, core)
        return private_gradient(
            per_example,
            weights=batch["weights"],
            clip_norm=clip_norm,
            noise_multiplier=noise_multiplier,
            standard_noise={k: v[step] for k, v in batch["dp_noise"].items()},
            expected_batch_size=batch["dp_expected"],
        )

    return gradient
