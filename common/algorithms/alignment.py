"""Cross-modal alignment: InfoNCE between two modalities' embeddings of the same record.

An auxiliary loss for any algorithm (``algorithm.align_weight > 0``): for each
ordered pair of modalities ``(a, b)`` and each record ``i`` that has both, the
embedding of ``i`` in ``a`` must pick out its own embedding in ``b`` among
those of the batch's other records that have ``b``:

    l_i^{a->b} = -log( exp(s(z_i^a, z_i^b) / T) / sum_j exp(s(z_i^a, z_j^b) / T) )

with ``s`` the cosine similarity and ``T`` the temperature
(``algorithm.align_temperature``). This is InfoNCE (van den Oord, Li &
Vinyals, "Representation Learning with Contrastive Predictive Coding", arXiv
1807.03748), symmetric over the two directions as in CLIP (Radford et al.,
"Learning Transferable Visual Models From Natural Language Supervision", ICML
2021); for modalities of one record it is the contrastive alignment of
modalities of the multimodal federated literature (e.g. Yu et al., "Multimodal
Federated Learning via Contrastive Representation Ensemble", ICLR 2023). The
loss is the mean of ``l_i^{a->b}`` over every ordered pair and every record
that takes part.

Masking: a record takes part in the pair ``(a, b)`` only if it has both
modalities and is not padding; only such records are candidates ``j``; a pair
with fewer than two such records (nothing to contrast) contributes nothing.
Labels are not used. The embeddings are the encoders' outputs (after
``model.embedding_norm``), before any fusion, read with
``model(inputs, masks, embeddings=True)``.

The loss couples every record of the batch with every other, so record-level
DP refuses it (see :func:`common.config.validate`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from common.tree import Tree


def modality_embeddings(model: nn.Module, params: Mapping[str, torch.Tensor], batch: dict):
    """Per-modality embeddings ``[B, M, D]`` and presence ``[B, M]`` (bool) of ``batch``."""
    return functional_call(model, dict(params), (batch["inputs"], batch["masks"]), {"embeddings": True})


def info_nce(embeddings: torch.Tensor, present: torch.Tensor, weights: torch.Tensor, *,
             temperature: float) -> torch.Tensor:
    """The masked symmetric InfoNCE of the module docstring, from ``[B, M, D]`` embeddings.

    ``present`` ``[B, M]`` says which modalities each record has and
    ``weights`` ``[B]`` which records are real (> 0). Branch-free (``torch.where``
    only), so it runs under ``vmap`` and ``grad``.
    """
    z = F.normalize(embeddings, dim=-1)
    real = weights > 0
    num_modalities = z.shape[1]
    total = z.new_zeros(())
    count = z.new_zeros(())
    eye = torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
    for a in range(num_modalities):  # a fixed loop over the schema, not over data
        for b in range(num_modalities):
            if a == b:
                continue
            valid = present[:, a] & present[:, b] & real  # [B]
            similarity = z[:, a] @ z[:, b].T / temperature  # [B anchors, B candidates]
            similarity = torch.where(valid[None, :], similarity, torch.full_like(similarity, float("-inf")))
            similarity = torch.where(valid[:, None], similarity, torch.zeros_like(similarity))
            log_prob = torch.where(eye, torch.log_softmax(similarity, dim=1), torch.zeros_like(similarity)).sum(1)
            use = (valid & (valid.sum() >= 2)).to(z.dtype)
            total = total - (log_prob * use).sum()
            count = count + use.sum()
    return total / count.clamp(min=1.0)


def alignment_loss(model: nn.Module, params: Mapping[str, torch.Tensor], batch: dict, *,
                   temperature: float) -> torch.Tensor:
    """The InfoNCE alignment loss of ``batch`` under ``params``."""
    embeddings, present = modality_embeddings(model, params, batch)
    return info_nce(embeddings, present, batch["weights"], temperature=temperature)


def with_alignment(model: nn.Module, gradient, *, weight: float, temperature: float):
    """A gradient oracle that adds ``weight`` times the alignment loss's gradient on the same batch.

    ``gradient`` is any oracle ``(params, batch, step) -> tree`` (the exact
    classification gradient, Reptile's alternating one, the prototypical
    loss's); the alignment term is taken on the batch the inner loop adapts on.
    """

    def aligned(params: Tree, batch: dict, step: int) -> Tree:
        base = gradient(params, batch, step)
        extra = torch.func.grad(lambda p: alignment_loss(model, p, batch, temperature=temperature))(params)
        return {k: base[k] + weight * extra[k] for k in base}

    return aligned
