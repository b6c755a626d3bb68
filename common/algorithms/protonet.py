"""Federated prototypical networks: a Reptile/FedAvg round over a metric-learning objective.

Snell, Swersky & Zemel, "Prototypical Networks for Few-shot Learning",
NeurIPS 2017. The prototype of class ``k`` is the mean of the support's
embeddings of that class, ``c_k = mean_{i: y_i = k} f(x_i)``, and a query
``x`` is classified by a softmax over ``-d(f(x), c_k)``, with ``d`` the
squared Euclidean distance (the paper's choice, a Bregman divergence, so
that the classifier is a linear model on the embedding; Sec. 2.3) or, with
``algorithm.proto_distance: cosine``, ``d = -s * cos(f(x), c_k)`` with a fixed
scale ``s`` (:data:`COSINE_SCALE`; an unscaled cosine's logits lie in
[-1, 1] and cannot express confidence, Oreshkin et al., "TADAM", NeurIPS 2018).
The loss of an episode is the mean cross-entropy of its query records.

Embedding: what the fusion's linear heads see
(``model(..., head_inputs=True)``, ``[B, H, F]`` with presence ``[B, H]``): the
fused embedding for early and attention fusion (``H = 1``), one embedding per
modality for late fusion. With several heads the distance of a query to a
class is the mean, over the heads that both the query and the class's
prototype have, of the per-head distances; a class whose support has none of
the query's heads is compared at the origin (as the Proto-MAML head of
:func:`common.algorithms.inner.prototype_head` does). The classification heads'
own weights are not used.

A site's update (Reptile's shape, Nichol et al. 2018): each episode of its
meta-batch adapts the shared weights with ``algorithm.inner_steps`` steps on
its own prototypical loss (prototypes from its support, loss on its query),
all episodes at once with ``torch.func.vmap``; the site replies with the mean
of the adapted weights, and the server's common step ``theta + eps *
mean(phi - theta)`` aggregates them as for every other algorithm.

Meta-test (:func:`common.evaluation.score_episodes` with ``classifier =
"prototypes"``): prototypes from the support set, every query scored by its
nearest prototype; with ``algorithm.proto_finetune_steps > 0`` the weights
first take that many steps on the support set's own prototypical loss (the
support serves as prototypes and as queries).

Record-level DP is refused (:func:`common.config.validate`): a support
record is inside its class's prototype, which every query record's loss
reads, so one record moves every per-record gradient of the sum and clipping
each of them to ``C`` does not bound its influence.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vmap

from common.algorithms.base import Algorithm, ClientHParams, ClientResult, plain_init
from common.algorithms.inner import Batch, GradientFn, adapt, head_inputs
from common.tree import Tree, mean_over_leading

DISTANCES = ("euclidean", "cosine")
# Logit scale of the cosine distance (s in the module docstring).
COSINE_SCALE = 10.0


def class_prototypes(features: torch.Tensor, present: torch.Tensor, labels: torch.Tensor,
                     weights: torch.Tensor, *, ways: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class means ``[W, H, F]`` of ``features`` ``[B, H, F]`` and how many records each has ``[W, H]``.

    Record ``i`` counts for class ``labels[i]`` and head ``h`` when it has that
    head (``present[i, h]``) and is real (``weights[i] > 0``, which also
    weighs it); a class with no record at a head has the zero vector there.
    """
    # A comparison, not F.one_hot: one_hot checks its labels' range with a
    # data-dependent read that vmap refuses under a gradient transform.
    classes = torch.arange(ways, device=features.device)
    members = (labels[:, None] == classes).to(features.dtype) * weights[:, None]  # [B, W]
    members = members[:, :, None] * present[:, None, :].to(features.dtype)  # [B, W, H]
    counts = members.sum(0)  # [W, H]
    centres = torch.einsum("bwh,bhf->whf", members, features) / counts[..., None].clamp(min=1.0)
    return centres, counts


def prototype_logits(model: nn.Module, params: Mapping[str, torch.Tensor], support: Batch, query: Batch, *,
                     distance: str = "euclidean") -> torch.Tensor:
    """``[Q, W]``: minus the distance of every query record to every class prototype of ``support``."""
    support_features, support_has = head_inputs(model, params, support)
    query_features, query_has = head_inputs(model, params, query)
    centres, counts = class_prototypes(support_features, support_has, support["labels"], support["weights"],
                                       ways=model.ways)
    x = query_features[:, None]  # [Q, 1, H, F]
    if distance == "euclidean":
        per_head = -((x - centres[None]) ** 2).sum(-1)  # [Q, W, H]
    elif distance == "cosine":
        per_head = COSINE_SCALE * F.cosine_similarity(x, centres[None], dim=-1, eps=1e-8)
    else:
        raise ValueError(f"algorithm.proto_distance must be one of {', '.join(DISTANCES)}; got {distance!r}")
    both = query_has[:, None, :] & (counts > 0)[None]  # [Q, W, H]
    fallback = query_has[:, None, :].expand_as(both)
    use = torch.where(both.any(-1, keepdim=True), both, fallback).to(per_head.dtype)
    return (use * per_head).sum(-1) / use.sum(-1).clamp(min=1.0)


def prototypical_loss(model: nn.Module, params: Mapping[str, torch.Tensor], support: Batch, query: Batch, *,
                      distance: str = "euclidean") -> torch.Tensor:
    """Mean cross-entropy of the query's real records under the prototypical classifier."""
    logits = prototype_logits(model, params, support, query, distance=distance)
    losses = F.cross_entropy(logits, query["labels"], reduction="none")
    weights = query["weights"]
    return (losses * weights).sum() / weights.sum().clamp_min(1.0)


def prototypical_accuracy(model: nn.Module, params: Mapping[str, torch.Tensor], support: Batch, query: Batch, *,
                          distance: str = "euclidean") -> torch.Tensor:
    logits = prototype_logits(model, params, support, query, distance=distance)
    weights = query["weights"]
    correct = (logits.argmax(dim=-1) == query["labels"]).to(weights.dtype)
    return (correct * weights).sum() / weights.sum().clamp_min(1.0)


def prototypical_gradient(model: nn.Module, *, query: Batch | None = None, distance: str = "euclidean") -> GradientFn:
    """An inner-loop oracle: the gradient of the prototypical loss, prototypes from the batch adapted on.

    The loss is taken on ``query``; without one, on the batch itself (meta-test
    fine-tuning on the support alone).
    """

    def gradient(params: Tree, batch: Batch, step: int) -> Tree:
        target = batch if query is None else query
        return torch.func.grad(lambda p: prototypical_loss(model, p, batch, target, distance=distance))(params)

    return gradient


def client_update(
    *,
    model: nn.Module,
    params: Tree,
    episodes: dict,
    hparams: ClientHParams,
    gradient: GradientFn | None = None,
) -> ClientResult:
    if gradient is not None:
        raise ValueError("protonet has no record-level private inner loop (the config refuses privacy.record "
                         "with algorithm.name=protonet)")
    distance = hparams.proto_distance
    # The classification heads are not part of the objective: never start them from prototypes.
    loop = dataclasses.replace(hparams.loop, head_init="shared")

    def one_episode(support, query):
        oracle = prototypical_gradient(model, query=query, distance=distance)
        adapted = adapt(model, params, support, loop=loop, gradient=oracle)
        before = prototypical_loss(model, params, support, query, distance=distance)
        after = prototypical_loss(model, adapted, support, query, distance=distance)
        return adapted, before, after

    with torch.no_grad():
        adapted, loss_before, loss_after = vmap(one_episode)(episodes["support"], episodes["query"])
    return ClientResult(
        params=mean_over_leading(adapted),
        metrics={"train_loss": loss_before.mean(), "adapted_loss": loss_after.mean()},
    )


ALGORITHM = Algorithm(
    name="protonet",
    paper="Snell, Swersky & Zemel, NeurIPS 2017",
    init=plain_init,
    client_update=client_update,
    uses_query_gradient=True,
    classifier="prototypes",
)
