"""Masked fusion of per-modality embeddings into class logits.

Every fusion module takes the stacked modality embeddings ``E`` of shape
``[B, M, D]`` (modalities in the model's fixed order) and the presence masks
``mask`` of shape ``[B, M]`` (bool, True where the record has the modality),
and returns logits ``[B, ways]``.

Missing modalities are handled with ``torch.where`` only (no boolean
indexing, no ``.item()``, no Python branch on tensor values), so the modules
run unchanged under ``torch.func.vmap`` and ``torch.func.grad`` and give exact
per-example gradients. The value of a masked-out embedding never reaches the
logits, and a record with no modality at all gets finite logits: the head
applied to a zero feature vector (its bias, for a linear head).

* ``early``: concatenate the embeddings (a missing one contributes zeros),
  then one classification head.
* ``late``: one head per modality; the logits of the modalities a record has
  are averaged.
* ``attention``: a learned score per modality embedding, ``v^T tanh(W e_m + b)
  + c + beta_m`` with a learned per-modality bias ``beta_m``; softmax over the
  modalities present; the weighted sum of embeddings goes to the head. This is
  the attention-based fusion of FedMultimodal (Feng et al., "FedMultimodal: A
  Benchmark for Multimodal Federated Learning", KDD 2023), with the missing
  modalities excluded from the softmax.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["FUSIONS", "ClassifierHead", "EarlyFusion", "LateFusion", "AttentionFusion", "build_fusion"]

FUSIONS = ("early", "late", "attention")


class ClassifierHead(nn.Module):
    """Linear ``in_features -> ways``, or ``Linear -> ReLU -> Linear`` when ``hidden > 0``."""

    def __init__(self, *, in_features: int, ways: int, hidden: int = 0) -> None:
        super().__init__()
        if ways < 1:
            raise ValueError(f"ways must be at least 1, got {ways}")
        if hidden > 0:
            self.net = nn.Sequential(
                nn.Linear(in_features, hidden), nn.ReLU(inplace=False), nn.Linear(hidden, ways)
            )
        else:
            self.net = nn.Sequential(nn.Linear(in_features, ways))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _zero_missing(embeddings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``E`` with the embeddings of missing modalities replaced by zeros (``[B, M, D]``)."""
    return torch.where(mask.unsqueeze(-1), embeddings, torch.zeros_like(embeddings))


class EarlyFusion(nn.Module):
    """Concatenation of the (zero-filled) modality embeddings, then one head."""

    head_names = ("head.net.0",)

    def __init__(self, *, modalities: tuple[str, ...], embed_dim: int, ways: int, head_hidden: int = 0) -> None:
        super().__init__()
        self.head = ClassifierHead(in_features=len(modalities) * embed_dim, ways=ways, hidden=head_hidden)

    def head_inputs(self, embeddings: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What each linear head sees, ``[B, H, F]``, and whether the record has it, ``[B, H]``."""
        fused = _zero_missing(embeddings, mask).flatten(start_dim=1)  # [B, M * D]
        return fused.unsqueeze(1), mask.any(dim=1, keepdim=True)

    def forward(self, embeddings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_inputs(embeddings, mask)[0][:, 0])


class LateFusion(nn.Module):
    """A head per modality; each record averages the logits of the modalities it has.

    A record with none averages every head applied to a zero embedding (the
    mean of the heads' biases, for linear heads).
    """

    def __init__(self, *, modalities: tuple[str, ...], embed_dim: int, ways: int, head_hidden: int = 0) -> None:
        super().__init__()
        self.modalities = tuple(modalities)
        self.heads = nn.ModuleDict(
            {m: ClassifierHead(in_features=embed_dim, ways=ways, hidden=head_hidden) for m in self.modalities}
        )
        self.head_names = tuple(f"heads.{m}.net.0" for m in self.modalities)

    def head_inputs(self, embeddings: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What each linear head sees, ``[B, H, F]``, and whether the record has it, ``[B, H]``."""
        return _zero_missing(embeddings, mask), mask

    def forward(self, embeddings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        embeddings = _zero_missing(embeddings, mask)
        logits = torch.stack(
            [self.heads[m](embeddings[:, i]) for i, m in enumerate(self.modalities)], dim=1
        )  # [B, M, ways]
        present = mask.to(logits.dtype)
        count = present.sum(dim=1, keepdim=True)  # [B, 1]
        uniform = torch.full_like(present, 1.0 / len(self.modalities))
        weights = torch.where(count > 0, present / count.clamp(min=1.0), uniform)  # [B, M]
        return (weights.unsqueeze(-1) * logits).sum(dim=1)


class AttentionFusion(nn.Module):
    """Softmax attention over the modalities present, then one head (FedMultimodal, KDD 2023).

    The per-modality bias ``beta_m`` is an ``nn.Embedding(M, 1)`` looked up at
    the modality indices, so that every trainable layer is one that Opacus
    computes per-example gradients for. It starts at zero.
    """

    def __init__(self, *, modalities: tuple[str, ...], embed_dim: int, ways: int, head_hidden: int = 0) -> None:
        super().__init__()
        self.num_modalities = len(modalities)
        self.score_hidden = nn.Linear(embed_dim, embed_dim)
        self.score_act = nn.Tanh()
        self.score_out = nn.Linear(embed_dim, 1)
        self.modality_bias = nn.Embedding(self.num_modalities, 1)
        self.modality_bias.zero_init = True  # read by initial_parameters
        self.head = ClassifierHead(in_features=embed_dim, ways=ways, hidden=head_hidden)

    head_names = ("head.net.0",)

    def head_inputs(self, embeddings: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What each linear head sees, ``[B, H, F]``, and whether the record has it, ``[B, H]``."""
        attn = self.weights(embeddings, mask)
        fused = (attn.unsqueeze(-1) * _zero_missing(embeddings, mask)).sum(dim=1)  # [B, D]
        return fused.unsqueeze(1), mask.any(dim=1, keepdim=True)

    def weights(self, embeddings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Attention weights ``[B, M]``: a softmax over present modalities, zero elsewhere
        (all zero for a record with no modality)."""
        embeddings = _zero_missing(embeddings, mask)
        batch = embeddings.shape[0]
        index = torch.arange(self.num_modalities, device=embeddings.device).expand(batch, self.num_modalities)
        scores = self.score_out(self.score_act(self.score_hidden(embeddings))).squeeze(-1)
        scores = scores + self.modality_bias(index).squeeze(-1).to(scores.dtype)  # [B, M]
        # Softmax over the present modalities only; a record with none gets finite
        # (uniform) scores here and all-zero weights below, never NaN.
        anything = mask.any(dim=1, keepdim=True)
        scores = torch.where(mask, scores, torch.full_like(scores, float("-inf")))
        scores = torch.where(anything, scores, torch.zeros_like(scores))
        attn = torch.softmax(scores, dim=1)
        return torch.where(mask, attn, torch.zeros_like(attn))

    def forward(self, embeddings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_inputs(embeddings, mask)[0][:, 0])


_FUSIONS: dict[str, type[nn.Module]] = {
    "early": EarlyFusion,
    "late": LateFusion,
    "attention": AttentionFusion,
}


def build_fusion(
    *, fusion: str, modalities: tuple[str, ...], embed_dim: int, ways: int, head_hidden: int = 0
) -> nn.Module:
    """The fusion module named ``fusion`` (one of :data:`FUSIONS`), ending in the classifier."""
    if fusion not in _FUSIONS:
        raise ValueError(f"model.fusion must be one of {', '.join(FUSIONS)}; got {fusion!r}")
    if not modalities:
        raise ValueError("a model needs at least one modality")
    return _FUSIONS[fusion](modalities=tuple(modalities), embed_dim=embed_dim, ways=ways, head_hidden=head_hidden)
