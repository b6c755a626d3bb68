"""FedAvg: the baseline with no meta-objective.

McMahan, Moore, Ramage, Hampson, Aguera y Arcas, "Communication-Efficient
Learning of Deep Networks from Decentralized Data", AISTATS 2017. A site runs
plain local SGD through its episodes in one trajectory (no reset to theta
between episodes, no query/support distinction) and replies with the final
weights. At meta-test it is fine-tuned with the same ``adapt`` as every other
algorithm, which is the "FedAvg + fine-tuning" baseline of FedMeta (Chen et
al. 2018, arXiv 1802.07876).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from common.algorithms.base import Algorithm, ClientHParams, ClientResult, plain_init
from common.algorithms.inner import (
    GradientFn,
    adapt,
    batch_accuracy,
    batch_loss,
    index_episode,
    merge_support_query,
    num_episodes,
)
from common.tree import Tree


def client_update(
    *,
    model: nn.Module,
    params: Tree,
    episodes: dict,
    hparams: ClientHParams,
    gradient: GradientFn | None = None,
) -> ClientResult:
    # Sequential by nature (one trajectory), so a loop over episodes. The
    # baseline trains its own shared head: a head rebuilt from each episode's
    # prototypes would be a meta-learning objective (it adapts like the others at test).
    loop = dataclasses.replace(hparams.loop, head_init="shared")
    current = dict(params)
    losses = []
    with torch.no_grad():
        for i in range(num_episodes(episodes)):
            episode = index_episode(episodes, i)
            batch = merge_support_query(episode) if hparams.train_on_query else episode["support"]
            losses.append(batch_loss(model, current, batch))
            current = adapt(model, current, batch, loop=loop, gradient=gradient)
        last = index_episode(episodes, num_episodes(episodes) - 1)
        metrics = {
            "train_loss": torch.stack(losses).mean(),
            "query_accuracy": batch_accuracy(model, current, last["query"]),
        }
    return ClientResult(params=current, metrics=metrics)


ALGORITHM = Algorithm(
    name="fedavg",
    paper="McMahan et al., AISTATS 2017",
    init=plain_init,
    client_update=client_update,
    uses_query_gradient=False,
)
