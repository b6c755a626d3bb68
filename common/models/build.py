"""The multimodal few-shot classifier, built from a :class:`ModelConfig` and a schema.

``build_model`` gives a module whose forward is ``model(inputs, masks) ->
logits [B, ways]``, with ``inputs[m]`` of shape ``[B, *spec.shape]`` and
``masks[m]`` a bool ``[B]`` for every modality ``m`` of the schema (the batch
layout of :mod:`common.data.schema`). The engine calls it only through
``torch.func.functional_call(model, params, (inputs, masks))``, under
``vmap`` over episodes and under ``vmap(grad(...))`` over single records, so
the forward holds no BatchNorm, no in-place activation, no ``.item()`` and no
Python branch on tensor values.

With ``ModelConfig.embedding_norm`` each modality's embedding is normalized
per record over its features (a LayerNorm with learned scale and shift), so
that no modality dominates the fusion by the size of its features alone;
nearest-class-mean heads (``algorithm.head_init: prototypes``) then compare
distances of one scale across modalities, as cosine-style few-shot
classifiers do (Chen et al., "A Closer Look at Few-shot Classification", ICLR 2019).

``initial_parameters`` draws a fresh initialization from an explicit
``torch.Generator`` and never touches torch's global RNG.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from common.config import ModelConfig
from common.data.schema import ModalitySpec
from common.models.encoders import build_encoder
from common.models.fusion import build_fusion

__all__ = ["MultimodalModel", "build_model", "initial_parameters", "count_parameters", "param_bytes"]


class MultimodalModel(nn.Module):
    """Per-modality encoders, then masked fusion and a classification head.

    ``modalities`` is the schema's modality names in sorted order: it fixes
    the parameter names, the order of concatenation (early fusion) and the
    per-modality attention biases, so that two sites that list their
    modalities in different orders build the same model.
    """

    def __init__(
        self,
        *,
        config: ModelConfig,
        schema: Mapping[str, ModalitySpec],
        ways: int,
        head_hidden: int = 0,
        downsample: str | None = None,
    ) -> None:
        super().__init__()
        if not schema:
            raise ValueError("the schema names no modality: a model needs at least one")
        if ways < 1:
            raise ValueError(f"ways must be at least 1, got {ways}")
        for name in schema:
            if not name or "." in name or not name.isidentifier():
                raise ValueError(
                    f"modality name {name!r} cannot name parameters: use letters, digits and underscores"
                )
        self.modalities: tuple[str, ...] = tuple(sorted(schema))
        self.specs: dict[str, ModalitySpec] = {m: schema[m] for m in self.modalities}
        self.ways = ways
        self.fusion_name = config.fusion
        self.encoders = nn.ModuleDict(
            {
                m: build_encoder(
                    spec=self.specs[m],
                    hidden=config.hidden,
                    embed_dim=config.embed_dim,
                    groups=config.groups,
                    downsample=downsample or config.downsample,
                )
                for m in self.modalities
            }
        )
        # GroupNorm with one group over a [B, D] embedding is a LayerNorm of its
        # D features, in a layer Opacus computes per-example gradients for.
        self.embedding_norms = (
            nn.ModuleDict({m: nn.GroupNorm(1, config.embed_dim) for m in self.modalities})
            if config.embedding_norm else None
        )
        self.fusion = build_fusion(
            fusion=config.fusion,
            modalities=self.modalities,
            embed_dim=config.embed_dim,
            ways=ways,
            head_hidden=head_hidden,
        )

    def embed(
        self, inputs: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stacked modality embeddings ``[B, M, D]`` and presence masks ``[B, M]`` (bool).

        A missing modality's input is replaced by zeros before it is encoded,
        so whatever it holds (even NaN or out-of-range token ids) cannot reach
        the logits or the gradients.
        """
        embeddings, present = [], []
        for name in self.modalities:  # a fixed Python loop over the schema, not over data
            x = inputs[name]
            mask = masks[name].to(torch.bool)
            shape = (mask.shape[0],) + (1,) * (x.dim() - 1)
            x = torch.where(mask.reshape(shape), x, torch.zeros_like(x))
            embedding = self.encoders[name](x)
            if self.embedding_norms is not None:
                embedding = self.embedding_norms[name](embedding)
            embeddings.append(embedding)
            present.append(mask)
        return torch.stack(embeddings, dim=1), torch.stack(present, dim=1)

    def forward(
        self, inputs: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor], *, head_inputs: bool = False,
        embeddings: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits ``[B, ways]``; with ``head_inputs`` what the fusion's linear heads see instead
        (``[B, H, F]`` and presence ``[B, H]``; see ``fusion.head_names``), for prototype heads;
        with ``embeddings`` the modality embeddings and presence of :meth:`embed` (cross-modal alignment)."""
        if embeddings:
            return self.embed(inputs, masks)
        stacked, present = self.embed(inputs, masks)
        if head_inputs:
            return self.fusion.head_inputs(stacked, present)
        return self.fusion(stacked, present)


def build_model(
    *,
    config: ModelConfig,
    schema: Mapping[str, ModalitySpec],
    ways: int,
    head_hidden: int = 0,
    downsample: str | None = None,
) -> MultimodalModel:
    """The classifier for ``schema`` with ``ways`` outputs.

    Encoders follow ``spec.kind`` (see :mod:`common.models.encoders`), fusion
    follows ``config.fusion`` (see :mod:`common.models.fusion`);
    ``head_hidden > 0`` puts a hidden ReLU layer of that width in the head;
    ``downsample`` is ``"stride"`` (stride-2 convolutions) or ``"pool"``
    (2x2 max pooling) for the convolutional encoders; ``config.downsample``
    when not given.
    """
    return MultimodalModel(
        config=config, schema=schema, ways=ways, head_hidden=head_hidden, downsample=downsample
    )


def _uniform(shape: torch.Size, bound: float, generator: torch.Generator) -> torch.Tensor:
    return (torch.rand(shape, generator=generator, dtype=torch.float32) * 2.0 - 1.0) * bound


def _fan_in(weight: torch.Tensor) -> int:
    return weight.shape[1] * math.prod(weight.shape[2:]) if weight.dim() > 1 else weight.shape[0]


@torch.no_grad()
def initial_parameters(model: nn.Module, *, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A fresh initialization of ``model``'s parameters, drawn only from ``generator``.

    Same rules as PyTorch's defaults, so the scale matches a freshly built
    module: convolution and linear weights are kaiming-uniform with
    ``a = sqrt(5)`` (uniform on ``+-1/sqrt(fan_in)``) and their biases uniform
    on ``+-1/sqrt(fan_in)``; GroupNorm weights are 1 and biases 0; embeddings
    are standard normal, except the attention fusion's per-modality bias
    (zero). Values are drawn in float32 in ``model.named_parameters()`` order
    and cast to each parameter's dtype and device, so a float64 copy of the
    model starts from the same point. Returns detached tensors keyed like
    ``model.named_parameters()``; the model itself is not modified and
    torch's global RNG is not used.
    """
    modules = dict(model.named_modules())
    params: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        owner_name, _, leaf = name.rpartition(".")
        owner = modules[owner_name]
        if isinstance(owner, (nn.GroupNorm, nn.LayerNorm)):
            value = torch.ones(param.shape) if leaf == "weight" else torch.zeros(param.shape)
        elif isinstance(owner, nn.Embedding):
            if getattr(owner, "zero_init", False):
                value = torch.zeros(param.shape)
            else:
                value = torch.randn(param.shape, generator=generator, dtype=torch.float32)
        elif isinstance(owner, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            fan_in = _fan_in(owner.weight)
            bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
            value = _uniform(param.shape, bound, generator)
        elif param.dim() > 1:
            fan_in = _fan_in(param)
            value = _uniform(param.shape, 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0, generator)
        else:
            value = torch.zeros(param.shape)
        params[name] = value.to(dtype=param.dtype, device=param.device)
    return params


def count_parameters(model_or_params: nn.Module | Mapping[str, torch.Tensor]) -> int:
    """Number of scalar parameters of a module (trainable ones) or of a parameter dict."""
    if isinstance(model_or_params, nn.Module):
        return sum(p.numel() for p in model_or_params.parameters() if p.requires_grad)
    return sum(t.numel() for t in model_or_params.values())


def param_bytes(model_or_params: nn.Module | Mapping[str, torch.Tensor]) -> int:
    """Bytes the parameters take (what one copy of the weights costs to send or store)."""
    if isinstance(model_or_params, nn.Module):
        tensors = [p for p in model_or_params.parameters() if p.requires_grad]
    else:
        tensors = list(model_or_params.values())
    return sum(t.numel() * t.element_size() for t in tensors)
