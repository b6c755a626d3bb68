"""DP-SGD as a gradient oracle, and the private meta-gradient of the MAML family.

Abadi et al., "Deep Learning with Differential Privacy", CCS 2016: each
record's gradient is clipped to norm C, the clipped gradients are summed,
Gaussian noise of std sigma*C is added and the sum is divided by the expected
batch size (here a constant of the configuration, see
:meth:`common.task.Task.record_dp_divisors`: a divisor counted from the data
would leak the count). Per-example gradients come from ``vmap(grad(loss of one
record))``, which nests inside the ``vmap`` over episodes (Opacus's hooks do
not compose with ``torch.func``; the arithmetic is Opacus's, see
:mod:`common.privacy.clipping`).

The noise is drawn outside, from the site's secret keyed stream (see
:meth:`common.task.Task.record_dp_randomness`), and travels with the batch:
``support["dp_noise"]`` holds standard normal draws with a leading
``[inner_steps]`` axis and ``support["dp_expected"]`` the divisor;
``query["dp_noise"]`` (one draw per sent parameter, Meta-SGD's rates included)
and ``query["dp_expected"]`` do the same for the query release of
:func:`dp_meta_gradient`. That keeps the oracles pure and testable with any
noise.

Two releases per episode, under record-level DP:

* :func:`dp_gradient` -- the ``k`` noised support gradients of the inner loop
  (one Gaussian release at ``sigma / sqrt(k)`` on the support's Poisson
  sample, see :func:`common.privacy.accounting.episode_release`);
* :func:`dp_meta_gradient` -- FOMAML's and Meta-SGD's meta-gradient, the
  noised sum of clipped per-query-record gradients at the adapted weights (one
  Gaussian release at ``sigma`` on the query's own Poisson sample).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from common.algorithms.inner import (
    Batch,
    GradientFn,
    InnerLoop,
    adapt_directions,
    batch_accuracy,
    batch_loss,
    logits,
    loss_gradient,
    lr_part,
    model_part,
)
from common.privacy.clipping import per_example_grads, private_gradient
from common.tree import Tree

CORE_KEYS = ("inputs", "masks", "labels", "weights")

# (params, support, query, loop, gradient) -> (meta-gradient, query loss, query accuracy), one episode.
MetaGradientFn = Callable[[Tree, Batch, Batch, InnerLoop, GradientFn | None],
                          tuple[Tree, torch.Tensor, torch.Tensor]]


def _as_batch_of_one(example: dict) -> dict:
    return {k: (_as_batch_of_one(v) if isinstance(v, dict) else v.unsqueeze(0)) for k, v in example.items()}


def example_loss(model: nn.Module) -> Callable[[Tree, dict], torch.Tensor]:
    """``(params, one record) -> its cross-entropy``: what :func:`per_example_grads` differentiates."""

    def loss_of_one(params: Tree, example: dict) -> torch.Tensor:
        one = _as_batch_of_one(example)
        return F.cross_entropy(logits(model, params, one), one["labels"], reduction="sum")

    return loss_of_one


def dp_gradient(model: nn.Module, *, clip_norm: float, noise_multiplier: float) -> GradientFn:
    """A gradient oracle that returns the DP-SGD gradient of the support loss."""
    loss_of_one = example_loss(model)

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


# ----------------------------------------------------------------- meta-gradient


def released_directions(
    model: nn.Module, params: Tree, support: Batch, *, loop: InnerLoop, gradient: GradientFn | None = None
) -> Tree:
    """``G``: the summed step directions of a first-order inner loop, detached.

    With the DP oracle (:func:`dp_gradient`) every inner gradient is a released
    value (already noised), so ``G`` is post-processing of the support release
    and enters the query loss as a constant. The inner loop runs first-order
    whatever ``loop.first_order`` says.
    """
    loop = replace(loop, first_order=True)
    rates = lr_part(params) or None
    directions = adapt_directions(model, model_part(params), support, loop=loop, learning_rates=rates,
                                  gradient=gradient)
    return {k: v.detach() for k, v in directions.items()}


def adapted_weights(params: Tree, directions: Tree, *, inner_lr: float) -> Tree:
    """``phi(params) = theta - alpha * G``, differentiable in theta and Meta-SGD's rates alpha.

    Without learned rates (FOMAML) ``alpha`` is the constant ``inner_lr``, and
    ``d phi / d theta`` is the identity.
    """
    rates = lr_part(params)
    return {k: params[k] - (rates[k] if rates else inner_lr) * directions[k] for k in directions}


def query_example_grads(
    model: nn.Module, params: Tree, directions: Tree, query: Batch, *, inner_lr: float
) -> Tree:
    """Per query record ``j``: ``d loss_j(phi(params)) / d params`` for every sent parameter.

    Leaves get a leading ``[B]`` axis. For FOMAML this is each record's
    gradient at the adapted weights; for Meta-SGD the learned rates' part is
    ``-grad_phi loss_j * G``.
    """
    loss_of_one = example_loss(model)

    def loss(p: Tree, example: dict) -> torch.Tensor:
        return loss_of_one(adapted_weights(p, directions, inner_lr=inner_lr), example)

    return per_example_grads(loss, dict(params), {k: query[k] for k in CORE_KEYS})


def dp_meta_gradient(model: nn.Module, *, clip_norm: float, noise_multiplier: float) -> MetaGradientFn:
    """The record-level private meta-gradient of one episode (FOMAML, first-order Meta-SGD).

    1. Inner loop: DP-SGD on the support through ``gradient`` (the
       :func:`dp_gradient` oracle), first-order: the noised inner gradients
       are released values and are treated as constants. ``G`` is the sum of
       their step directions (:func:`released_directions`) and the adapted
       weights are ``phi = theta - inner_lr * G`` (FOMAML) or
       ``theta - alpha * G`` (Meta-SGD, whose learned rates ``alpha`` still
       receive their gradient ``-g_query * G``).
    2. Query release: per query record, the gradient of its loss at
       ``phi(params)`` with respect to ALL sent parameters (theta, and alpha
       for Meta-SGD) is clipped as a whole to norm ``C``; the clipped gradients
       are summed, ``sigma * C`` times ``query["dp_noise"]`` (standard normal
       draws from the site's secret stream) is added and the sum is divided by
       the constant ``query["dp_expected"]``. One record of the
       query moves this sum by at most ``C``: a Gaussian mechanism with noise
       multiplier ``sigma`` on the query's Poisson sample.

    Why first order: the second-order MAML term differentiates through the
    support's clipped per-record gradients. Its size is not bounded by the
    clip (one support record changes the Hessian-vector term of every query
    record's meta-gradient at once), so per-record clipping of the query
    gradients bounds nothing about the support records' influence and the
    release could not be calibrated. Second-order MAML is therefore refused
    under record-level DP (``algorithm.first_order: true`` gives FOMAML), and
    Meta-SGD runs first-order.

    Returns ``meta_gradient(params, support, query, loop, gradient) ->
    (grads, query loss, query accuracy)``; it runs under ``vmap`` over
    episodes. With ``sigma = 0``, ``C = inf``, full batches and expected sizes
    equal to the batch sizes it equals the non-private first-order
    meta-gradient.
    """

    def meta_gradient(params: Tree, support: Batch, query: Batch, loop: InnerLoop,
                      gradient: GradientFn | None = None) -> tuple[Tree, torch.Tensor, torch.Tensor]:
        directions = released_directions(model, params, support, loop=loop,
                                         gradient=gradient or loss_gradient(model))
        per_example = query_example_grads(model, params, directions, query, inner_lr=loop.inner_lr)
        grads = private_gradient(
            per_example,
            weights=query["weights"],
            clip_norm=clip_norm,
            noise_multiplier=noise_multiplier,
            standard_noise=query["dp_noise"],
            expected_batch_size=query["dp_expected"],
        )
        adapted = {k: v.detach() for k, v in adapted_weights(params, directions, inner_lr=loop.inner_lr).items()}
        return grads, batch_loss(model, adapted, query).detach(), batch_accuracy(model, adapted, query).detach()

    return meta_gradient
