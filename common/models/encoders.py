"""Per-modality encoders: one record of a modality -> an embedding of width ``embed_dim``.

Every encoder takes a batch ``[B, *spec.shape]`` and returns ``[B, embed_dim]``.
They are built only from layers that both ``torch.func`` (``functional_call``,
``vmap`` over episodes, ``vmap(grad(...))`` over single examples) and Opacus's
per-example gradient hooks support: ``Conv1d``/``Conv2d``, ``GroupNorm``,
``Linear``, ``Embedding``, out-of-place ``ReLU`` and max pooling. There is no
BatchNorm (its batch statistics couple the records of a batch, which breaks
per-example gradients and differential privacy): normalisation is GroupNorm
(Wu & He, "Group Normalization", ECCV 2018). The forward passes hold no
``.item()`` and no Python branch on tensor values.

The convolutional encoders are made of halving blocks [conv3x3, GroupNorm,
ReLU] after the 4-block network of MAML and Reptile (Finn, Abbeel & Levine,
"Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks", ICML
2017). Finn et al. halve with stride-2 convolutions on 28x28 Omniglot and
with 2x2 max pooling on 84x84 MiniImagenet; ``downsample`` picks one of the
two. ``"stride"`` (the default) does about 4x fewer multiply-adds, which is
what keeps a meta-batch fast on a CPU; ``"pool"`` is the max-pool variant.
Either way a block maps a side ``s`` to ``ceil(s / 2)`` (pooling uses
``ceil_mode``), so small inputs never shrink to nothing (28 -> 14 -> 7 -> 4
-> 2).

* ``image`` [C, H, W]: 4 halving blocks, flattened, then a linear map.
* ``spectrogram`` [C, F, T]: 3 halving 2-D blocks, a mean over the time axis
  (so the embedding does not depend on where in time a sound happens), the
  remaining frequency bands flattened, then a linear map.
* ``series`` [C, L]: 4 halving 1-D blocks (conv1d k=3), flattened, then a
  linear map.
* ``tokens`` [L] int64 ids: an embedding table, one [conv1d k=3, GroupNorm,
  ReLU] block over the sequence, a mean over positions, then a linear map.

Each encoder ends with a ReLU so the fusion layer sees non-negative features.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from common.data.schema import ModalitySpec

__all__ = [
    "DOWNSAMPLING",
    "ImageEncoder",
    "SpectrogramEncoder",
    "SeriesEncoder",
    "TokenEncoder",
    "build_encoder",
]


def _check_groups(*, channels: int, groups: int, what: str) -> None:
    if groups < 1 or channels % groups:
        raise ValueError(
            f"{what}: GroupNorm groups={groups} must be >= 1 and divide the {channels} channels; "
            f"pick model.groups among the divisors of model.hidden"
        )


def _pooled(size: int, times: int) -> int:
    """Side length after ``times`` halving blocks: a stride-2 conv3x3 with padding 1, or a
    kernel-2 stride-2 max pool with ``ceil_mode=True``, both map ``s`` to ``ceil(s / 2)``."""
    for _ in range(times):
        size = math.ceil(size / 2)
    return size


DOWNSAMPLING = ("stride", "pool")


def _check_downsample(downsample: str) -> None:
    if downsample not in DOWNSAMPLING:
        raise ValueError(f"downsample must be one of {', '.join(DOWNSAMPLING)}; got {downsample!r}")


def _block2d(in_ch: int, out_ch: int, groups: int, downsample: str) -> nn.Sequential:
    """[conv3x3, GroupNorm, ReLU] halving each side (``s -> ceil(s / 2)``), by a stride-2
    convolution or by a 2x2 max pool after a stride-1 one."""
    if downsample == "stride":
        return nn.Sequential(
            nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=2, padding=1),
            nn.GroupNorm(groups, out_ch),
            nn.ReLU(inplace=False),
        )
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1),
        nn.GroupNorm(groups, out_ch),
        nn.ReLU(inplace=False),
        nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True),
    )


def _block1d(in_ch: int, out_ch: int, groups: int, downsample: str) -> nn.Sequential:
    """The 1-D analogue of :func:`_block2d` (kernel 3, ``L -> ceil(L / 2)``)."""
    if downsample == "stride":
        return nn.Sequential(
            nn.Conv1d(in_ch, out_ch, kernel_size=3, stride=2, padding=1),
            nn.GroupNorm(groups, out_ch),
            nn.ReLU(inplace=False),
        )
    return nn.Sequential(
        nn.Conv1d(in_ch, out_ch, kernel_size=3, padding=1),
        nn.GroupNorm(groups, out_ch),
        nn.ReLU(inplace=False),
        nn.MaxPool1d(kernel_size=2, stride=2, ceil_mode=True),
    )


def _projection(in_features: int, embed_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_features, embed_dim), nn.ReLU(inplace=False))


def _shape_error(spec: ModalitySpec, expected: str) -> ValueError:
    return ValueError(
        f"modality '{spec.name}' of kind {spec.kind!r} needs shape {expected}, got {list(spec.shape)}"
    )


def _stack2d(*, spec: ModalitySpec, layout: str, hidden: int, groups: int, downsample: str,
             num_blocks: int) -> nn.Sequential:
    """Checks a [C, *, *] spec and builds ``num_blocks`` 2-D conv blocks for it."""
    _check_downsample(downsample)
    if len(spec.shape) != 3 or min(spec.shape) < 1:
        raise _shape_error(spec, layout)
    _check_groups(channels=hidden, groups=groups, what=f"modality '{spec.name}'")
    return nn.Sequential(
        *[_block2d(spec.shape[0] if i == 0 else hidden, hidden, groups, downsample) for i in range(num_blocks)]
    )


class ImageEncoder(nn.Module):
    """4 x [conv3x3, GroupNorm, ReLU, halve] + linear: Finn et al. 2017's network.

    GroupNorm replaces MAML's BatchNorm (Wu & He 2018) so that records stay
    independent, as per-example gradients need.
    """

    num_blocks = 4

    def __init__(
        self, *, spec: ModalitySpec, hidden: int, embed_dim: int, groups: int, downsample: str = "stride"
    ) -> None:
        super().__init__()
        self.features = _stack2d(spec=spec, layout="[C, H, W]", hidden=hidden, groups=groups,
                                 downsample=downsample, num_blocks=self.num_blocks)
        _channels, height, width = spec.shape
        flat = hidden * _pooled(height, self.num_blocks) * _pooled(width, self.num_blocks)
        self.project = _projection(flat, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x.to(self.features[0][0].weight.dtype))
        return self.project(x.flatten(start_dim=1))


class SpectrogramEncoder(nn.Module):
    """3 x [conv3x3, GroupNorm, ReLU, halve], mean over time, flatten bands, linear.

    A [C, F, T] spectrogram is treated as an image whose last axis is time;
    after the convolutions the time axis is averaged away and the pooled
    frequency bands are kept, as is common for audio-event classifiers.
    """

    num_blocks = 3

    def __init__(
        self, *, spec: ModalitySpec, hidden: int, embed_dim: int, groups: int, downsample: str = "stride"
    ) -> None:
        super().__init__()
        self.features = _stack2d(spec=spec, layout="[C, F, T]", hidden=hidden, groups=groups,
                                 downsample=downsample, num_blocks=self.num_blocks)
        _channels, freqs, _time = spec.shape
        self.project = _projection(hidden * _pooled(freqs, self.num_blocks), embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x.to(self.features[0][0].weight.dtype)).mean(dim=-1)  # [B, hidden, F']
        return self.project(x.flatten(start_dim=1))


class SeriesEncoder(nn.Module):
    """4 x [conv1d k=3, GroupNorm, ReLU, halve], flatten, linear: the 1-D analogue
    of Finn et al. 2017's network, for multichannel time series [C, L]."""

    num_blocks = 4

    def __init__(
        self, *, spec: ModalitySpec, hidden: int, embed_dim: int, groups: int, downsample: str = "stride"
    ) -> None:
        super().__init__()
        _check_downsample(downsample)
        if len(spec.shape) != 2 or min(spec.shape) < 1:
            raise _shape_error(spec, "[C, L]")
        _check_groups(channels=hidden, groups=groups, what=f"modality '{spec.name}'")
        channels, length = spec.shape
        self.features = nn.Sequential(
            *[_block1d(channels if i == 0 else hidden, hidden, groups, downsample) for i in range(self.num_blocks)]
        )
        self.project = _projection(hidden * _pooled(length, self.num_blocks), embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x.to(self.features[0][0].weight.dtype))
        return self.project(x.flatten(start_dim=1))


class TokenEncoder(nn.Module):
    """Embedding table, one [conv1d k=3, GroupNorm, ReLU] block, mean over positions, linear.

    Ids must lie in ``[0, vocab_size)``. The mean over positions makes the
    embedding independent of the sequence length the schema fixes.
    """

    def __init__(
        self, *, spec: ModalitySpec, hidden: int, embed_dim: int, groups: int, downsample: str = "stride"
    ) -> None:
        super().__init__()
        _check_downsample(downsample)  # accepted for a uniform signature; no downsampling here
        if len(spec.shape) != 1 or spec.shape[0] < 1:
            raise _shape_error(spec, "[L]")
        if spec.vocab_size < 1:
            raise ValueError(f"modality '{spec.name}': tokens need vocab_size >= 1")
        _check_groups(channels=hidden, groups=groups, what=f"modality '{spec.name}'")
        self.embed = nn.Embedding(spec.vocab_size, hidden)
        self.conv = nn.Conv1d(hidden, hidden, kernel_size=3, padding=1)
        self.norm = nn.GroupNorm(groups, hidden)
        self.act = nn.ReLU(inplace=False)
        self.project = _projection(hidden, embed_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids).transpose(1, 2)  # [B, hidden, L]
        x = self.act(self.norm(self.conv(x))).mean(dim=-1)
        return self.project(x)


_ENCODERS: dict[str, type[nn.Module]] = {
    "image": ImageEncoder,
    "spectrogram": SpectrogramEncoder,
    "series": SeriesEncoder,
    "tokens": TokenEncoder,
}


def build_encoder(
    *, spec: ModalitySpec, hidden: int, embed_dim: int, groups: int, downsample: str = "stride"
) -> nn.Module:
    """The encoder for ``spec.kind``, mapping ``[B, *spec.shape]`` to ``[B, embed_dim]``.

    ``downsample`` picks how the convolutional blocks halve their input:
    ``"stride"`` (stride-2 convolutions, Finn et al. 2017's Omniglot network;
    about 4x fewer multiply-adds) or ``"pool"`` (stride-1 convolutions then
    2x2 max pooling, their MiniImagenet network).
    """
    try:
        cls = _ENCODERS[spec.kind]
    except KeyError:
        raise ValueError(
            f"modality '{spec.name}': no encoder for kind {spec.kind!r}; kinds: {sorted(_ENCODERS)}"
        ) from None
    return cls(spec=spec, hidden=hidden, embed_dim=embed_dim, groups=groups, downsample=downsample)
