"""Modalities and the batch layout shared by data, models and algorithms.

A *batch* is a plain dict so that ``torch.func.vmap`` maps over it as a pytree::

    {
        "inputs":  {modality: Tensor[B, *spec.shape]},  # float32, or int64 for tokens
        "masks":   {modality: BoolTensor[B]},           # True where the record has it
        "labels":  LongTensor[B],                       # episode labels in [0, ways)
        "weights": FloatTensor[B],                      # 1 for a record, 0 for padding
    }

An *episode* is ``{"support": batch, "query": batch}``; a meta-batch of episodes
has one more leading axis ``E`` on every tensor. Every batch carries every
modality of the schema: a modality a site or record lacks is zeros with its
mask False, so batches from different sites have one structure.
"""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("image", "spectrogram", "series", "tokens")


@dataclass(frozen=True)
class ModalitySpec:
    """One modality: the shape of a single record and how to encode it.

    ``kind`` picks the encoder: ``image`` [C, H, W] and ``spectrogram`` [C, F, T]
    (2-D convolutions), ``series`` [C, L] (1-D convolutions), ``tokens`` [L]
    integer ids below ``vocab_size`` (embedding).
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    vocab_size: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"modality '{self.name}': kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "tokens" and (self.dtype != "int64" or self.vocab_size < 1):
            raise ValueError(f"modality '{self.name}': tokens need dtype int64 and vocab_size >= 1")

    def to_dict(self) -> dict:
        d = {"kind": self.kind, "shape": list(self.shape), "dtype": self.dtype}
        if self.vocab_size:
            d["vocab_size"] = self.vocab_size
        return d

    @classmethod
    def from_dict(cls, name: str, d: dict) -> "ModalitySpec":
        return cls(
            name=name,
            kind=str(d["kind"]),
            shape=tuple(int(s) for s in d["shape"]),
            dtype=str(d.get("dtype", "float32")),
            vocab_size=int(d.get("vocab_size", 0)),
        )


Schema = dict[str, ModalitySpec]
