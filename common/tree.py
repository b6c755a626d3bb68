"""Arithmetic over parameter trees: ``dict[str, Tensor]`` with matching keys.

Every algorithm in :mod:`common.algorithms` and the server's outer step works on
these flat dicts, so that parameters, pseudo-gradients and optimizer moments can
be added, scaled, averaged, saved and sent without a model object.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch

Tree = dict[str, torch.Tensor]


def _check_keys(a: Mapping[str, object], b: Mapping[str, object]) -> None:
    if a.keys() != b.keys():
        missing = sorted(set(a) - set(b))
        extra = sorted(set(b) - set(a))
        raise KeyError(f"parameter trees differ: missing {missing}, unexpected {extra}")


def add(a: Tree, b: Tree) -> Tree:
    _check_keys(a, b)
    return {k: a[k] + b[k] for k in a}


def sub(a: Tree, b: Tree) -> Tree:
    _check_keys(a, b)
    return {k: a[k] - b[k] for k in a}


def scale(a: Tree, factor: float | torch.Tensor) -> Tree:
    return {k: v * factor for k, v in a.items()}


def axpy(alpha: float | torch.Tensor, x: Tree, y: Tree) -> Tree:
    """``y + alpha * x``."""
    _check_keys(x, y)
    return {k: y[k] + alpha * x[k] for k in y}


def zeros_like(a: Tree) -> Tree:
    return {k: torch.zeros_like(v) for k, v in a.items()}


def full_like(a: Tree, value: float) -> Tree:
    return {k: torch.full_like(v, value) for k, v in a.items()}


def weighted_mean(trees: Sequence[Tree], weights: Sequence[float] | None = None) -> Tree:
    """Mean of trees, weighted by ``weights`` (equal weights when None)."""
    if not trees:
        raise ValueError("weighted_mean of no trees: at least one is needed")
    if weights is None:
        weights = [1.0] * len(trees)
    if len(weights) != len(trees):
        raise ValueError(f"{len(trees)} trees but {len(weights)} weights")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"weights must sum to a positive number, got {total}")
    out = zeros_like(trees[0])
    for tree, w in zip(trees, weights):
        _check_keys(out, tree)
        for k in out:
            out[k] = out[k] + tree[k] * (float(w) / total)
    return out


def mean_over_leading(a: Tree) -> Tree:
    """Average a stacked tree (leading axis = episodes) over that axis."""
    return {k: v.mean(dim=0) for k, v in a.items()}


def global_norm(a: Tree) -> torch.Tensor:
    """L2 norm of all leaves flattened together."""
    if not a:
        return torch.tensor(0.0)
    return torch.sqrt(sum((v.double() ** 2).sum() for v in a.values())).to(next(iter(a.values())).dtype)


def batched_global_norm(a: Tree) -> torch.Tensor:
    """L2 norm per leading index: leaves of shape ``[B, ...]`` -> ``[B]``."""
    squares = [v.reshape(v.shape[0], -1).pow(2).sum(dim=1) for v in a.values()]
    return torch.sqrt(torch.stack(squares, dim=0).sum(dim=0))


def is_finite(a: Tree) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in a.values())


def detach(a: Tree) -> Tree:
    return {k: v.detach() for k, v in a.items()}


def clone(a: Tree) -> Tree:
    return {k: v.detach().clone() for k, v in a.items()}


def to(a: Tree, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Tree:
    return {k: v.to(device=device, dtype=dtype if v.is_floating_point() else None) for k, v in a.items()}


def to_numpy(a: Tree) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in a.items()}


def from_numpy(a: Mapping[str, np.ndarray], device: torch.device | str | None = None) -> Tree:
    return {k: torch.as_tensor(np.asarray(v)).to(device) for k, v in a.items()}


def num_bytes(a: Tree) -> int:
    return sum(v.numel() * v.element_size() for v in a.values())


def allclose(a: Tree, b: Tree, *, rtol: float = 1e-5, atol: float = 1e-8) -> bool:
    _check_keys(a, b)
    return all(torch.allclose(a[k], b[k], rtol=rtol, atol=atol) for k in a)


def max_abs_diff(a: Tree, b: Tree) -> float:
    _check_keys(a, b)
    return max(float((a[k] - b[k]).abs().max()) if a[k].numel() else 0.0 for k in a)


def stack(trees: Iterable[Tree]) -> Tree:
    trees = list(trees)
    return {k: torch.stack([t[k] for t in trees]) for k in trees[0]}
