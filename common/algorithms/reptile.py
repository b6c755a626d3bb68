"""Reptile, batched: each episode adapts from theta; the site replies with the mean.

Nichol, Achiam & Schulman, "On First-Order Meta-Learning Algorithms",
arXiv 1803.02999 (v3), Algorithm 2. The site computes
``phi_i = adapt(theta, support_i)`` for its meta-batch of episodes at once
(``torch.func.vmap``) and replies with ``mean_i phi_i``; the server's
``theta + eps * mean(phi - theta)`` then is batched Reptile across sites.

The inner steps alternate between the episode's two halves (support, then
query, then support...): Reptile's meta-learning term, which raises the inner
product of gradients on *different* minibatches of a task (Nichol et al.,
Sec. 5), is absent when every inner step sees the same batch. Under
record-level DP only the Poisson-sampled support is used (the query is not
Poisson-sampled, so amplification would not hold for it).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import vmap

from common.algorithms.base import Algorithm, ClientHParams, ClientResult, plain_init
from common.algorithms.inner import GradientFn, adapt, batch_loss
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
        oracle = gradient or alternating_gradient(model, (support, query))
        adapted = adapt(model, params, support, loop=hparams.loop, gradient=oracle)
        return (adapted, batch_loss(model, params, support), batch_loss(model, adapted, support),
                batch_loss(model, adapted, query))

    with torch.no_grad():
        adapted, loss_before, loss_after, query_after = vmap(one_episode)(episodes["support"], episodes["query"])
    # query_loss: the query's loss after adaptation, the quantity the progress
    # line follows (train_loss is the shared head's before it, which prototype
    # heads never use). Reptile's inner steps alternate over both halves, so
    # the query has been stepped on: it measures how far the adaptation gets.
    return ClientResult(
        params=mean_over_leading(adapted),
        metrics={"train_loss": loss_before.mean(), "adapted_loss": loss_after.mean(),
                 "query_loss": query_after.mean()},
    )


def alternating_gradient(model: nn.Module, batches: tuple[dict, ...]) -> GradientFn:
    """Inner step ``i`` takes the gradient on ``batches[i % len(batches)]``."""

    def gradient(params, _batch, step):
        batch = batches[step % len(batches)]
        return torch.func.grad(lambda p: batch_loss(model, p, batch))(params)

    return gradient


ALGORITHM = Algorithm(
    name="reptile",
    paper="Nichol, Achiam & Schulman 2018, arXiv 1803.02999",
    init=plain_init,
    client_update=client_update,
    uses_query_gradient=False,
)
