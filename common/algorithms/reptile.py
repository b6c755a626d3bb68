"""Reptile, batched: each episode adapts from theta; the site replies with the mean.

Nichol, Achiam & Schulman, "On First-Order Meta-Learning Algorithms",
arXiv 1803.02999 (v3), Algorithm 2. The site computes
``phi_i = adapt(theta, support_i)`` for its meta-batch of episodes at once
(``torch.func.vmap``) and replies with ``mean_i phi_i``; the server's
``theta + eps * mean(phi - theta)`` then is batched Reptile across sites.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import vmap

from common.algorithms.base import Algorithm, ClientHParams, ClientResult, plain_init
from common.algorithms.inner import GradientFn, adapt, batch_accuracy, batch_loss
from common.tree import Tree, mean_over_leading


def client_update(
    *,
    model: nn.Module,
    params: Tree,
    episodes: dict,
    hparams: ClientHParams,
    gradient: GradientFn | None = None,
) -> ClientResult:
    def one_episode(support, query):
        adapted = adapt(model, params, support, loop=hparams.loop, gradient=gradient)
        return adapted, batch_loss(model, params, support), batch_loss(model, adapted, query), batch_accuracy(model, adapted, query)

    with torch.no_grad():
        adapted, support_loss, query_loss, query_acc = vmap(one_episode)(episodes["support"], episodes["query"])
    return ClientResult(
        params=mean_over_leading(adapted),
        metrics={
            "train_loss": support_loss.mean(),
            "query_loss": query_loss.mean(),
            "query_accuracy": query_acc.mean(),
        },
    )


ALGORITHM = Algorithm(
    name="reptile",
    paper="Nichol, Achiam & Schulman 2018, arXiv 1803.02999",
    init=plain_init,
    client_update=client_update,
    uses_query_gradient=False,
)
