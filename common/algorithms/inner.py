"""The inner loop: one ``adapt()`` for training and evaluation.

A model is only ever called as ``functional_call(model, params, (inputs, masks))``
so that adaptation is a pure function of a parameter dict. Gradients come from
``torch.func.grad``, which composes with itself (second-order MAML) and with
``torch.func.vmap`` (a meta-batch of episodes at once; per-example gradients
for DP-SGD). Parameters are never assigned through ``.data``: that would cut
the graph and make every meta-gradient silently first-order.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from common.algorithms.alignment import with_alignment
from common.tree import Tree

Batch = dict  # see common/data/schema.py for the layout

# Meta-SGD keeps one learned inner learning rate per parameter in the same
# tree as the weights, under this prefix, so the server treats them alike.
LR_PREFIX = "inner_lr/"


def model_part(params: Mapping[str, torch.Tensor]) -> Tree:
    """The model's own weights (everything but Meta-SGD's learning rates)."""
    return {k: v for k, v in params.items() if not k.startswith(LR_PREFIX)}


def lr_part(params: Mapping[str, torch.Tensor]) -> Tree:
    """Meta-SGD's per-parameter learning rates, keyed like the weights they scale."""
    return {k[len(LR_PREFIX):]: v for k, v in params.items() if k.startswith(LR_PREFIX)}


def logits(model: nn.Module, params: Mapping[str, torch.Tensor], batch: Batch) -> torch.Tensor:
    return functional_call(model, dict(params), (batch["inputs"], batch["masks"]))


def example_losses(model: nn.Module, params: Mapping[str, torch.Tensor], batch: Batch) -> torch.Tensor:
    return F.cross_entropy(logits(model, params, batch), batch["labels"], reduction="none")


def batch_loss(model: nn.Module, params: Mapping[str, torch.Tensor], batch: Batch) -> torch.Tensor:
    """Mean cross-entropy over the real records (padding has weight 0)."""
    weights = batch["weights"]
    return (example_losses(model, params, batch) * weights).sum() / weights.sum().clamp_min(1.0)


def batch_accuracy(model: nn.Module, params: Mapping[str, torch.Tensor], batch: Batch) -> torch.Tensor:
    weights = batch["weights"]
    correct = (logits(model, params, batch).argmax(dim=-1) == batch["labels"]).to(weights.dtype)
    return (correct * weights).sum() / weights.sum().clamp_min(1.0)


# A gradient oracle: (params, batch, step) -> gradient tree. The default is the
# exact gradient of the batch loss; DP-SGD plugs in a clipped, noised one.
GradientFn = Callable[[Tree, Batch, int], Tree]


def loss_gradient(model: nn.Module) -> GradientFn:
    def gradient(params: Tree, batch: Batch, step: int) -> Tree:
        return torch.func.grad(lambda p: batch_loss(model, p, batch))(params)

    return gradient


@dataclass(frozen=True)
class InnerLoop:
    """Settings of one inner loop (hyperparameters only; no data, no state)."""

    inner_steps: int
    inner_lr: float
    # Stop gradients through the inner gradients (FOMAML / Reptile): the
    # adapted weights still depend on theta, but only through the identity.
    first_order: bool = True
    # "sgd", or "adam" with beta1 = 0 as Reptile uses it (Nichol et al. 2018,
    # Sec. 6): a per-coordinate step size from the running squared gradient.
    optimizer: str = "sgd"
    beta2: float = 0.999
    eps: float = 1e-8
    # "shared": start from the learned head; "prototypes": from the support's
    # class prototypes (:func:`prototype_head`).
    head_init: str = "shared"
    # Cross-modal alignment (:mod:`common.algorithms.alignment`): every inner
    # step adds this weight times the InfoNCE gradient on the batch it adapts
    # on; 0 leaves the loop exactly as without it.
    align_weight: float = 0.0
    align_temperature: float = 0.1


def prototype_head(model: nn.Module, params: Mapping[str, torch.Tensor], support: Batch) -> Tree:
    """Linear head weights that make the model a nearest-class-mean classifier on ``support``.

    Proto-MAML (Triantafillou et al., "Meta-Dataset", ICLR 2020, Sec. 4): row
    ``k`` of each linear head is ``2 c_k`` and its bias ``-|c_k|^2``, where
    ``c_k`` is the mean of what that head sees over the support records of
    class ``k`` (records lacking the head's modality, and padding, left out).
    Then a head's logit is ``-|x - c_k|^2`` up to a term equal for every class,
    as in a prototypical network (Snell et al. 2017). The prototypes are
    functions of ``params``, so the meta-gradient flows through them. The
    fusion's heads must be single linear layers (``head_hidden = 0``).
    """
    for name in model.fusion.head_names:
        if len(model.fusion.get_submodule(name.rsplit(".", 1)[0])) != 1:
            raise ValueError("algorithm.head_init=prototypes needs linear classifier heads; this model's "
                             "heads have a hidden layer (head_hidden > 0): build it with head_hidden=0 "
                             "or use head_init='shared'")
    features, has = head_inputs(model, params, support)  # [B, H, F], [B, H]
    # A comparison, not F.one_hot: one_hot checks its labels' range with a data-dependent
    # read, which vmap refuses once a gradient transform is inside it (MAML, FOMAML).
    classes = torch.arange(model.ways, device=features.device)
    labels = (support["labels"][:, None] == classes).to(features.dtype) * support["weights"][:, None]  # [B, W]
    head = {}
    for h, name in enumerate(model.fusion.head_names):
        members = labels * has[:, h : h + 1].to(features.dtype)  # [B, W]
        centres = members.T @ features[:, h] / members.sum(0)[:, None].clamp(min=1.0)  # [W, F]
        head[f"fusion.{name}.weight"] = 2.0 * centres
        head[f"fusion.{name}.bias"] = -(centres**2).sum(-1)
    return head


def head_inputs(model: nn.Module, params: Mapping[str, torch.Tensor], batch: Batch):
    """What the fusion's linear heads see for ``batch`` (see ``MultimodalModel.forward``)."""
    return functional_call(model, dict(params), (batch["inputs"], batch["masks"]), {"head_inputs": True})


def adapt(
    model: nn.Module,
    params: Tree,
    support: Batch,
    *,
    loop: InnerLoop,
    learning_rates: Tree | None = None,
    gradient: GradientFn | None = None,
) -> Tree:
    """``loop.inner_steps`` steps of gradient descent on the support set.

    ``params`` are model weights only. ``learning_rates`` (Meta-SGD, Li et al.
    2017, arXiv 1707.09835) are per-parameter rates that replace
    ``loop.inner_lr``. Differentiable in ``params`` (and the rates) unless
    ``loop.first_order``. Works unchanged under ``torch.func.vmap``.
    """
    adapted, _ = _inner_loop(model, params, support, loop=loop, learning_rates=learning_rates,
                             gradient=gradient, keep_directions=False)
    return adapted


def adapt_directions(
    model: nn.Module,
    params: Tree,
    support: Batch,
    *,
    loop: InnerLoop,
    learning_rates: Tree | None = None,
    gradient: GradientFn | None = None,
) -> Tree:
    """The sum ``D`` of the inner loop's step directions: ``adapt(...) = params - rates * D``.

    A step direction is the gradient the oracle returned (after Adam's
    per-coordinate scaling with ``loop.optimizer="adam"``), so with a fixed
    rate per parameter the ``k`` steps add up to one step of ``rates * D``.
    Under ``loop.first_order`` the directions do not depend on ``params``
    through autograd (each gradient is detached), and ``D`` is a constant:
    the adapted weights are then ``params - rates * D`` as a function of the
    params and the rates (FOMAML; first-order Meta-SGD).
    """
    if loop.head_init != "shared":
        raise ValueError("adapt_directions needs loop.head_init='shared': a head that starts from the "
                         "support's prototypes is not params - rates * D")
    _, directions = _inner_loop(model, params, support, loop=loop, learning_rates=learning_rates,
                                gradient=gradient, keep_directions=True)
    return directions


def _inner_loop(model, params, support, *, loop, learning_rates, gradient, keep_directions):
    gradient = gradient or loss_gradient(model)
    if loop.align_weight > 0:  # the one place the auxiliary loss joins the inner loop, for every algorithm
        gradient = with_alignment(model, gradient, weight=loop.align_weight, temperature=loop.align_temperature)
    adapted = dict(params)
    if loop.head_init == "prototypes":
        adapted.update(prototype_head(model, params, support))
    rates = learning_rates or {k: loop.inner_lr for k in adapted}
    second_moment = {k: torch.zeros_like(v) for k, v in adapted.items()} if loop.optimizer == "adam" else None
    directions = {k: torch.zeros_like(v) for k, v in adapted.items()} if keep_directions else None
    for step in range(loop.inner_steps):
        grads = gradient(adapted, support, step)
        if loop.first_order:
            grads = {k: g.detach() for k, g in grads.items()}
        if second_moment is not None:
            second_moment = {k: loop.beta2 * second_moment[k] + (1 - loop.beta2) * grads[k] ** 2 for k in grads}
            correction = 1.0 - loop.beta2 ** (step + 1)
            grads = {k: grads[k] / (torch.sqrt(second_moment[k] / correction) + loop.eps) for k in grads}
        adapted = {k: adapted[k] - rates[k] * grads[k] for k in adapted}
        if directions is not None:
            directions = {k: directions[k] + grads[k] for k in directions}
    return adapted, directions


def merge_support_query(episode: Mapping[str, Batch]) -> Batch:
    """All labelled records of an episode as one batch (FedAvg trains on all of them)."""
    support, query = episode["support"], episode["query"]

    def cat(a, b):
        if isinstance(a, dict):
            return {k: cat(a[k], b[k]) for k in a}
        return torch.cat([a, b], dim=0)

    return cat(support, query)


def index_episode(episodes: Mapping, i: int):
    """Episode ``i`` of a meta-batch (leading axis E on every tensor)."""
    if isinstance(episodes, Mapping):
        return {k: index_episode(v, i) for k, v in episodes.items()}
    return episodes[i]


def num_episodes(episodes: Mapping) -> int:
    return int(episodes["support"]["labels"].shape[0])
