"""MAML and FOMAML as a site's step (FedMeta).

Finn, Abbeel & Levine, "Model-Agnostic Meta-Learning for Fast Adaptation of
Deep Networks", ICML 2017; as the client step of FedMeta (Chen, Luo, Dong, Li
& He, arXiv 1802.07876). For each episode the meta-gradient is
``d/dtheta L_query(adapt(theta, support))``, second-order unless
``first_order`` (FOMAML drops the inner gradients' dependence on theta). The
site takes ``local_meta_steps`` steps of ``client_meta_lr`` on the mean
meta-gradient of its episodes and replies with the result, so the server's
``theta + eps * mean(phi - theta)`` is FedMeta's update.

Meta-SGD reuses this with learned per-parameter inner rates
(:mod:`common.algorithms.metasgd`).

Under record-level DP the site passes ``meta_gradient``
(:func:`common.algorithms.private.dp_meta_gradient`): each episode's
meta-gradient is then the noised, clipped query release at the first-order
adapted weights, and the site's meta-steps are taken on those released values
exactly as here. Second-order MAML cannot be privatized that way (the
argument is in that function's docstring) and is refused by the config.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.func import vmap

from common.algorithms.base import Algorithm, ClientHParams, ClientResult, plain_init
from common.algorithms.inner import (
    GradientFn,
    adapt,
    batch_accuracy,
    batch_loss,
    lr_part,
    model_part,
)
from common.tree import Tree, mean_over_leading

if TYPE_CHECKING:
    from common.algorithms.private import MetaGradientFn


def _split_episodes(episodes: dict, parts: int) -> list[dict]:
    total = int(episodes["support"]["labels"].shape[0])
    parts = max(1, min(parts, total))
    bounds = [round(i * total / parts) for i in range(parts + 1)]

    def take(x, lo, hi):
        return {k: take(v, lo, hi) for k, v in x.items()} if isinstance(x, dict) else x[lo:hi]

    return [take(episodes, bounds[i], bounds[i + 1]) for i in range(parts)]


def episode_meta_loss(model, params, support, query, *, hparams, gradient=None):
    """Query loss after adapting on the support; a function of all learned params."""
    rates = lr_part(params) or None
    adapted = adapt(model, model_part(params), support, loop=hparams.loop, learning_rates=rates, gradient=gradient)
    return batch_loss(model, adapted, query), batch_accuracy(model, adapted, query).detach()


def meta_gradients(model, params, episodes, *, hparams, gradient=None, meta_gradient=None):
    """Per-episode meta-gradients (leading axis E), query losses and accuracies.

    ``meta_gradient`` replaces the exact meta-gradient of an episode (the DP
    one, :func:`common.algorithms.private.dp_meta_gradient`); ``gradient``
    is the inner loop's oracle either way.
    """
    if meta_gradient is not None:
        return vmap(lambda s, q: meta_gradient(params, s, q, hparams.loop, gradient))(
            episodes["support"], episodes["query"]
        )

    def one(support, query):
        grad_fn = torch.func.grad_and_value(
            lambda p: episode_meta_loss(model, p, support, query, hparams=hparams, gradient=gradient),
            has_aux=True,
        )
        grads, (loss, acc) = grad_fn(params)
        return grads, loss, acc

    return vmap(one)(episodes["support"], episodes["query"])


def client_update(
    *,
    model: nn.Module,
    params: Tree,
    episodes: dict,
    hparams: ClientHParams,
    gradient: GradientFn | None = None,
    meta_gradient: MetaGradientFn | None = None,
) -> ClientResult:
    current = dict(params)
    losses, accs = [], []
    for chunk in _split_episodes(episodes, hparams.local_meta_steps):
        grads, loss, acc = meta_gradients(model, current, chunk, hparams=hparams, gradient=gradient,
                                          meta_gradient=meta_gradient)
        mean_grad = mean_over_leading(grads)
        current = {k: (current[k] - hparams.client_meta_lr * mean_grad[k]).detach() for k in current}
        losses.append(loss.detach())
        accs.append(acc)
    return ClientResult(
        params=current,
        metrics={
            "train_loss": torch.cat(losses).mean(),
            "query_loss": torch.cat(losses).mean(),
            "query_accuracy": torch.cat(accs).mean(),
        },
    )


ALGORITHM = Algorithm(
    name="maml",
    paper="Finn, Abbeel & Levine, ICML 2017; Chen et al. 2018, arXiv 1802.07876",
    init=plain_init,
    client_update=client_update,
    uses_query_gradient=True,
    second_order=True,
)
