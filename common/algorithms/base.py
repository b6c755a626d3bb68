"""What every algorithm provides, as plain data and pure functions.

An algorithm (fedjax's ``FederatedAlgorithm`` shape) is: how to turn the
model's initial weights into the shared parameters it learns (``init``), what
a site does with them on a meta-batch of its episodes (``client_update``),
and how evaluation adapts them on a support set (``eval_learning_rates``
selects Meta-SGD's learned rates). The server step is common to all of them
(:mod:`common.algorithms.server_opt`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from common.algorithms.inner import GradientFn, InnerLoop
from common.tree import Tree


@dataclass(frozen=True)
class ClientHParams:
    """A site's hyperparameters for one round."""

    loop: InnerLoop
    # MAML family: the site's own meta-step size and count (FedMeta's client step).
    client_meta_lr: float = 0.5
    local_meta_steps: int = 1
    # FedAvg: train on support and query (all labelled records) unless False.
    train_on_query: bool = True
    # protonet: "euclidean" (squared) or "cosine" distance to the prototypes.
    proto_distance: str = "euclidean"


@dataclass
class ClientResult:
    """A site's reply: adapted parameters phi and per-episode metrics."""

    params: Tree
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


ClientUpdate = Callable[..., ClientResult]


@dataclass(frozen=True)
class Algorithm:
    name: str
    paper: str
    # model weights -> the parameters this algorithm learns and sends
    init: Callable[[Tree, float], Tree]
    # (model=, params=, episodes=, hparams=, gradient=) -> ClientResult
    client_update: ClientUpdate
    # Does a site's update use the query set's gradient (a separate privacy release)?
    uses_query_gradient: bool
    # Differentiate through the inner loop (MAML, Meta-SGD) unless the config
    # asks for first order; False for algorithms that never need it.
    second_order: bool = False
    # How meta-test classifies a query after adapting on the support:
    # "head", the model's own logits; "prototypes", the nearest class prototype
    # of the support's embeddings (:mod:`common.algorithms.protonet`).
    classifier: str = "head"

    def hparams(self, *, inner_steps: int, inner_lr: float, first_order: bool = False,
                client_meta_lr: float = 0.5, local_meta_steps: int = 1,
                train_on_query: bool = True, optimizer: str = "sgd", head_init: str = "shared",
                proto_distance: str = "euclidean", align_weight: float = 0.0,
                align_temperature: float = 0.1) -> ClientHParams:
        loop = InnerLoop(inner_steps=inner_steps, inner_lr=inner_lr,
                         first_order=first_order or not self.second_order, optimizer=optimizer, head_init=head_init,
                         align_weight=align_weight, align_temperature=align_temperature)
        return ClientHParams(loop=loop, client_meta_lr=client_meta_lr,
                             local_meta_steps=local_meta_steps, train_on_query=train_on_query,
                             proto_distance=proto_distance)


def plain_init(model_params: Tree, inner_lr: float) -> Tree:
    return {k: v.detach().clone() for k, v in model_params.items()}


GradientFactory = Callable[[nn.Module], GradientFn]
