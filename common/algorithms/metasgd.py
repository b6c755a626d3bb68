"""Meta-SGD: the inner learning rate of every parameter is learned with it.

Li, Zhou, Chen & Li, "Meta-SGD: Learning to Learn Quickly for Few-Shot
Learning", arXiv 1707.09835; a FedMeta client step (Chen et al. 2018). The
learned rates alpha live in the same parameter tree as the weights (keys
prefixed ``inner_lr/``), start at the configured inner learning rate, are
adapted with ``phi_k = theta_k - alpha_k * g_k`` and receive the meta-gradient
``dL_query/dalpha`` (not the weights' gradient), then travel and aggregate
like any weight.

Under record-level DP Meta-SGD runs first-order: the noised inner gradients
are released values, their sum ``G`` is a constant, ``phi = theta - alpha * G``
and the rates still receive ``-g_query * G`` through the clipped, noised
query release (:func:`common.algorithms.private.dp_meta_gradient`).
"""

from __future__ import annotations

import torch

from common.algorithms import maml
from common.algorithms.base import Algorithm
from common.algorithms.inner import LR_PREFIX
from common.tree import Tree


def init(model_params: Tree, inner_lr: float) -> Tree:
    params = {k: v.detach().clone() for k, v in model_params.items()}
    params.update({LR_PREFIX + k: torch.full_like(v, inner_lr) for k, v in model_params.items()})
    return params


ALGORITHM = Algorithm(
    name="metasgd",
    paper="Li, Zhou, Chen & Li 2017, arXiv 1707.09835",
    init=init,
    client_update=maml.client_update,
    uses_query_gradient=True,
    second_order=True,
)
