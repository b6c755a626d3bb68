"""Per-episode reference implementations with ``torch.autograd``.

A plain Python loop over episodes, gradients from ``torch.autograd.grad``
(``create_graph`` for second order). Written independently of the vmapped
path so that tests can check one against the other, and so the benchmark
has a baseline to compare with.
"""

from __future__ import annotations

import torch
from torch import nn

from common.algorithms.base import ClientHParams, ClientResult
from common.algorithms.inner import (
    batch_accuracy,
    batch_loss,
    head_inputs,
    index_episode,
    lr_part,
    merge_support_query,
    model_part,
    num_episodes,
)
from common.tree import Tree


def prototype_head_reference(model: nn.Module, params: Tree, support: dict) -> Tree:
    """Proto-MAML's head (Triantafillou et al., ICLR 2020), one class and one head at a time:
    row ``k`` is ``2 c_k`` and its bias ``-|c_k|^2``, ``c_k`` the weighted mean of what the head
    sees over the support records of class ``k`` that have its input (zeros for none)."""
    features, has = head_inputs(model, params, support)  # [B, H, F], [B, H]
    head = {}
    for h, name in enumerate(model.fusion.head_names):
        rows = []
        for k in range(model.ways):
            weight = support["weights"] * ((support["labels"] == k) & has[:, h]).to(features.dtype)  # [B]
            total = (weight[:, None] * features[:, h]).sum(0)
            rows.append(total / max(float(weight.sum()), 1.0))
        centres = torch.stack(rows)
        head[f"fusion.{name}.weight"] = 2.0 * centres
        head[f"fusion.{name}.bias"] = -(centres * centres).sum(-1)
    return head


def adapt_reference(
    model: nn.Module,
    params: Tree,
    support: dict,
    *,
    inner_steps: int,
    inner_lr: float,
    first_order: bool,
    learning_rates: Tree | None = None,
    alternate_with: dict | None = None,
    optimizer: str = "sgd",
    head_init: str = "shared",
    beta2: float = 0.999,
    eps: float = 1e-8,
) -> Tree:
    if head_init == "prototypes":
        # Clones, so that each inner gradient is the partial one: the head is a variable of
        # its own that starts at the prototypes, not a function of the weights it sees.
        adapted = {k: v.clone() for k, v in params.items()}
        adapted.update(prototype_head_reference(model, params, support))
    else:
        adapted = dict(params)
    names = list(adapted)
    squares = {k: torch.zeros_like(v) for k, v in adapted.items()}
    for t in range(1, inner_steps + 1):
        batch = alternate_with if (alternate_with is not None and t % 2 == 0) else support
        loss = batch_loss(model, adapted, batch)
        grads = torch.autograd.grad(loss, [adapted[k] for k in names], create_graph=not first_order)
        rates = learning_rates or {k: inner_lr for k in names}
        for k, g in zip(names, grads):
            if optimizer == "adam":  # beta1 = 0
                squares[k] = beta2 * squares[k] + (1 - beta2) * g * g
                g = g / ((squares[k] / (1 - beta2**t)).sqrt() + eps)
            adapted[k] = adapted[k] - rates[k] * g
    return adapted


def _requires_grad(params: Tree) -> Tree:
    return {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}


def reptile_reference(*, model, params, episodes, hparams: ClientHParams) -> ClientResult:
    loop = hparams.loop
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    n = num_episodes(episodes)
    for i in range(n):
        episode = index_episode(episodes, i)
        adapted = adapt_reference(model, _requires_grad(params), episode["support"],
                                  inner_steps=loop.inner_steps, inner_lr=loop.inner_lr, first_order=True,
                                  alternate_with=episode["query"], optimizer=loop.optimizer,
                                  head_init=loop.head_init)
        total = {k: total[k] + adapted[k].detach() for k in total}
    return ClientResult(params={k: v / n for k, v in total.items()})


def fedavg_reference(*, model, params, episodes, hparams: ClientHParams) -> ClientResult:
    loop = hparams.loop
    current = dict(params)
    for i in range(num_episodes(episodes)):
        episode = index_episode(episodes, i)
        batch = merge_support_query(episode) if hparams.train_on_query else episode["support"]
        current = adapt_reference(model, _requires_grad(current), batch,
                                  inner_steps=loop.inner_steps, inner_lr=loop.inner_lr, first_order=True,
                                  optimizer=loop.optimizer)
        current = {k: v.detach() for k, v in current.items()}
    return ClientResult(params=current)


def meta_gradient_reference(*, model, params, episode, hparams: ClientHParams) -> Tree:
    """One episode's meta-gradient (MAML, FOMAML, Meta-SGD) by plain autograd."""
    leaves = _requires_grad(params)
    loop = hparams.loop
    rates = lr_part(leaves) or None
    adapted = adapt_reference(model, model_part(leaves), episode["support"], inner_steps=loop.inner_steps,
                              inner_lr=loop.inner_lr, first_order=loop.first_order, learning_rates=rates,
                              optimizer=loop.optimizer, head_init=loop.head_init)
    loss = batch_loss(model, adapted, episode["query"])
    names = list(leaves)
    grads = torch.autograd.grad(loss, [leaves[k] for k in names], allow_unused=True)
    return {k: (g if g is not None else torch.zeros_like(leaves[k])) for k, g in zip(names, grads)}


def maml_reference(*, model, params, episodes, hparams: ClientHParams) -> ClientResult:
    from common.algorithms.maml import _split_episodes

    current = {k: v.detach() for k, v in params.items()}
    for chunk in _split_episodes(episodes, hparams.local_meta_steps):
        n = num_episodes(chunk)
        mean = {k: torch.zeros_like(v) for k, v in current.items()}
        for i in range(n):
            g = meta_gradient_reference(model=model, params=current, episode=index_episode(chunk, i), hparams=hparams)
            mean = {k: mean[k] + g[k] / n for k in mean}
        current = {k: current[k] - hparams.client_meta_lr * mean[k] for k in current}
    return ClientResult(params=current)


def protonet_reference(*, model, params, episodes, hparams: ClientHParams) -> ClientResult:
    """Prototypical networks' site update, one episode at a time with ``torch.autograd``."""
    from common.algorithms.protonet import prototypical_loss

    loop = hparams.loop
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    n = num_episodes(episodes)
    for i in range(n):
        episode = index_episode(episodes, i)
        adapted = _requires_grad(params)
        names = list(adapted)
        squares = {k: torch.zeros_like(v) for k, v in adapted.items()}
        for t in range(1, loop.inner_steps + 1):
            loss = prototypical_loss(model, adapted, episode["support"], episode["query"],
                                     distance=hparams.proto_distance)
            grads = torch.autograd.grad(loss, [adapted[k] for k in names], allow_unused=True)
            for k, g in zip(names, grads):
                g = torch.zeros_like(adapted[k]) if g is None else g
                if loop.optimizer == "adam":  # beta1 = 0
                    squares[k] = loop.beta2 * squares[k] + (1 - loop.beta2) * g * g
                    g = g / ((squares[k] / (1 - loop.beta2**t)).sqrt() + loop.eps)
                adapted[k] = (adapted[k] - loop.inner_lr * g).detach().requires_grad_(True)
        total = {k: total[k] + adapted[k].detach() for k in total}
    return ClientResult(params={k: v / n for k, v in total.items()})


REFERENCES = {
    "fedavg": fedavg_reference,
    "reptile": reptile_reference,
    "fomaml": maml_reference,
    "maml": maml_reference,
    "metasgd": maml_reference,
    "protonet": protonet_reference,
}


def query_accuracy_reference(model, params, episode) -> torch.Tensor:
    return batch_accuracy(model, params, episode["query"])
