"""Per-example clipping and Gaussian noise, as pure functions over parameter trees.

Record-level DP (DP-SGD inside a site's inner loop) and client-level DP
(DP-FedAvg on the server, McMahan et al., ICLR 2018) both reduce to the same
arithmetic: bound each contribution's L2 norm, sum, add Gaussian noise scaled to
that bound, divide by the *expected* number of contributions.

The record-level functions (:func:`per_example_grads`, :func:`clip_per_example`,
:func:`private_gradient`) are pure and ``torch.func.vmap``-compatible: no Python
control flow on tensor values, no ``.item()``, and the noise comes in as an
argument (``standard_noise``, N(0, 1) draws made by the caller from a seeded
``torch.Generator`` with :func:`draw_standard_noise`). A batch of episodes can
therefore run its DP inner loops at once under ``vmap``.

Their arithmetic is exactly Opacus's ``DPOptimizer``:

1. per-example norm over all parameters flattened together,
2. factor ``min(1, C / (||g_i|| + 1e-6))``,
3. sum of the clipped gradients,
4. plus noise ``N(0, (sigma * C)^2)`` on every coordinate,
5. divided by the expected batch size (not the realised one: with Poisson
   sampling the batch size itself would otherwise leak).

The client-level functions (:func:`clip_update`, :func:`noisy_mean_of_clipped`,
:func:`reject_non_finite`) run on the server, once per round, outside ``vmap``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from common.privacy.randomness import KeyedStream

Tree = dict[str, torch.Tensor]

# Opacus adds this to the per-example norm before dividing (DPOptimizer.clip_and_accumulate).
NORM_EPS = 1e-6

__all__ = [
    "NORM_EPS",
    "per_example_grads",
    "clip_per_example",
    "private_gradient",
    "draw_standard_noise",
    "clip_update",
    "noisy_mean_of_clipped",
    "reject_non_finite",
]


# --------------------------------------------------------------------------- record level


def per_example_grads(
    loss_of_one: Callable[[Tree, Any], torch.Tensor], params: Tree, batch: Any
) -> Tree:
    """Gradient of each example's loss: leaves get a leading ``[B]`` axis.

    ``loss_of_one(params, example)`` returns one example's scalar loss, where
    ``example`` is ``batch`` with the leading axis removed from every tensor (the
    model is called through ``torch.func.functional_call`` inside it; a batch
    dimension of one can be restored with ``unsqueeze(0)``). Every tensor in
    ``batch`` (nested dicts included) must have the batch axis first.

    This is ``vmap(grad(loss_of_one), in_dims=(None, 0))``; it nests under an
    outer ``vmap`` over episodes.
    """
    return torch.func.vmap(torch.func.grad(loss_of_one), in_dims=(None, 0))(params, batch)


def _per_example_norms(per_example: Mapping[str, torch.Tensor]) -> torch.Tensor:
    if not per_example:
        raise ValueError("per-example gradient tree is empty: pass at least one parameter")
    # Same order of operations as Opacus: a norm per parameter, then the norm of those.
    per_param = [g.flatten(start_dim=1).norm(2, dim=-1) for g in per_example.values()]
    return torch.stack(per_param, dim=1).norm(2, dim=1)


def _clip_factor(norms: torch.Tensor, clip_norm: float | torch.Tensor) -> torch.Tensor:
    # C = inf gives inf / norm = inf, clamped to exactly 1: no clipping.
    return (clip_norm / (norms + NORM_EPS)).clamp(max=1.0)


def clip_per_example(
    per_example: Mapping[str, torch.Tensor], *, clip_norm: float | torch.Tensor
) -> tuple[Tree, torch.Tensor]:
    """Clip each example's gradient to L2 norm ``clip_norm``, all parameters together.

    Each example ``i`` is scaled by ``min(1, C / (||g_i|| + 1e-6))`` where
    ``||g_i||`` is the norm of all its parameter gradients flattened together
    (Opacus's flat clipping). ``clip_norm=math.inf`` leaves gradients unchanged.

    Returns the clipped tree (same shapes, leading ``[B]`` axis) and the
    unclipped norms ``[B]``.
    """
    norms = _per_example_norms(per_example)
    factor = _clip_factor(norms, clip_norm)
    clipped = {
        k: g * factor.to(g.dtype).reshape(factor.shape + (1,) * (g.dim() - 1))
        for k, g in per_example.items()
    }
    return clipped, norms


def _noise_std(noise_multiplier: float | torch.Tensor, clip_norm: float | torch.Tensor):
    """``sigma * C``, with ``0 * inf = 0`` (no noise, no clipping: the plain gradient)."""
    if isinstance(noise_multiplier, torch.Tensor) or isinstance(clip_norm, torch.Tensor):
        sigma = torch.as_tensor(noise_multiplier)
        product = sigma * clip_norm
        return torch.where(sigma == 0, torch.zeros_like(product), product)
    if noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    if noise_multiplier == 0:
        return 0.0
    if not math.isfinite(clip_norm):
        raise ValueError(
            f"noise_multiplier={noise_multiplier} with clip_norm={clip_norm}: noise is "
            "calibrated to the clipping norm, so set a finite clip_norm (or noise_multiplier=0)"
        )
    return float(noise_multiplier) * float(clip_norm)


def private_gradient(
    per_example: Mapping[str, torch.Tensor],
    *,
    weights: torch.Tensor,
    clip_norm: float | torch.Tensor,
    noise_multiplier: float | torch.Tensor,
    standard_noise: Mapping[str, torch.Tensor],
    expected_batch_size: float | torch.Tensor,
) -> Tree:
    """One DP-SGD gradient: clip, drop padding, sum, add noise, divide by the expected batch.

    ``grad = (sum_i [w_i > 0] * clip_C(g_i) + sigma * C * xi) / expected_batch_size``

    Args:
        per_example: per-example gradients, leaves ``[B, *shape]``
            (from :func:`per_example_grads`).
        weights: ``[B]``; 0 marks padding (Poisson-sampled batches are padded to
            a fixed size). Any positive weight is a real record and contributes
            its clipped gradient once: weights are a mask here, because scaling a
            record by more than 1 would break the sensitivity bound ``C``.
            Padding is removed with ``where``, so even a NaN gradient on a padded
            row contributes nothing.
        clip_norm: ``C``; ``inf`` disables clipping (only with noise_multiplier 0).
        noise_multiplier: ``sigma``; the noise std is ``sigma * C``.
        standard_noise: N(0, 1) draws with the parameters' shapes
            (:func:`draw_standard_noise`); drawn by the caller so that this
            function stays pure and vmappable.
        expected_batch_size: the expected number of records ``q * n`` (with
            ``sigma = 0, C = inf`` and the full batch, the plain mean gradient).

    This is Opacus ``DPOptimizer``'s ``clip_and_accumulate``, ``add_noise`` and
    ``scale_grad`` with ``loss_reduction="mean"``.
    """
    if per_example.keys() != standard_noise.keys():
        raise KeyError(
            "standard_noise must have the parameters' keys: missing "
            f"{sorted(set(per_example) - set(standard_noise))}, unexpected "
            f"{sorted(set(standard_noise) - set(per_example))}"
        )
    if not isinstance(expected_batch_size, torch.Tensor) and not expected_batch_size > 0:
        raise ValueError(
            f"expected_batch_size must be > 0 (the expected number of records, q * n); "
            f"got {expected_batch_size}"
        )
    norms = _per_example_norms(per_example)
    real = weights > 0
    factor = torch.where(real, _clip_factor(norms, clip_norm), torch.zeros_like(norms))
    std = _noise_std(noise_multiplier, clip_norm)
    out: Tree = {}
    for k, g in per_example.items():
        mask = real.reshape(real.shape + (1,) * (g.dim() - 1))
        g = torch.where(mask, g, torch.zeros_like(g))
        summed = torch.einsum("i,i...->...", factor.to(g.dtype), g)
        noisy = summed + std * standard_noise[k].to(g.dtype)
        out[k] = noisy / expected_batch_size
    return out


def draw_standard_noise(
    params_like: Mapping[str, torch.Tensor],
    *,
    generator: torch.Generator | KeyedStream,
    leading_shape: tuple[int, ...] | torch.Size = (),
) -> Tree:
    """N(0, 1) draws shaped like each parameter, with ``leading_shape`` in front.

    Leaves are drawn in sorted key order from ``generator`` (on the generator's
    device, then moved to the parameter's), so a seed gives the same noise
    whatever order the tree was built in. Use ``leading_shape=(E,)`` for a batch
    of ``E`` episodes, ``(E, k)`` for ``k`` inner steps each.

    A :class:`~common.privacy.randomness.KeyedStream` is the source a private
    release needs (its draws cannot be rebuilt without its key); a seeded
    ``torch.Generator`` is for tests and oracles.
    """
    if generator is None:
        raise ValueError("draw_standard_noise needs a generator (a KeyedStream, or a seeded torch.Generator)")
    leading = tuple(int(s) for s in leading_shape)
    drawn: Tree = {}
    for k in sorted(params_like):
        v = params_like[k]
        dtype = v.dtype if v.is_floating_point() else torch.get_default_dtype()
        if isinstance(generator, KeyedStream):
            z = generator.standard_normal(leading + tuple(v.shape), dtype=dtype)
        else:
            z = torch.randn(leading + tuple(v.shape), generator=generator, dtype=dtype, device=generator.device)
        drawn[k] = z.to(v.device)
    return {k: drawn[k] for k in params_like}


# --------------------------------------------------------------------------- client level


def _tree_norm(tree: Mapping[str, torch.Tensor]) -> float:
    if not tree:
        return 0.0
    return math.sqrt(sum(float(v.detach().double().pow(2).sum()) for v in tree.values()))


def clip_update(delta: Mapping[str, torch.Tensor], *, clip_norm: float) -> tuple[Tree, float]:
    """Scale a site's update to L2 norm at most ``clip_norm`` (all parameters together).

    ``delta * min(1, S / ||delta||)``, computed as ``S / max(||delta||, S)`` so a
    zero update is returned unchanged (no division by zero). ``clip_norm=inf``
    returns the update unchanged. Returns the clipped update and the norm before
    clipping. Non-finite updates are refused: drop them with
    :func:`reject_non_finite` first.
    """
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0 (or inf for no clipping), got {clip_norm}")
    norm = _tree_norm(delta)
    if not math.isfinite(norm):
        raise ValueError(
            "update has non-finite values (NaN or Inf); clipping cannot bound it. "
            "Drop such replies with reject_non_finite() before clipping."
        )
    factor = 1.0 if math.isinf(clip_norm) or norm <= clip_norm else clip_norm / norm
    return {k: v * factor for k, v in delta.items()}, norm


def noisy_mean_of_clipped(
    deltas: Sequence[Mapping[str, torch.Tensor]],
    *,
    clip_norm: float,
    noise_multiplier: float,
    expected_clients: float,
    generator: torch.Generator | KeyedStream,
    template: Mapping[str, torch.Tensor] | None = None,
) -> Tree:
    """DP-FedAvg's noisy average: ``(sum_i clip_S(delta_i) + N(0, (z S)^2)) / expected_clients``.

    ``expected_clients`` is the expected number of sampled sites ``q_c * N``
    (Poisson sampling at rate ``q_c``), NOT the number that replied: noise
    calibrated for the expected count but divided among fewer replies would be
    too small relative to each site's contribution, and dividing by the realised
    count leaks it. With Poisson sampling a round can sample no site at all;
    then pass ``template`` (a tree with the parameters' shapes) and the release
    is noise alone.

    Reject non-finite replies first (:func:`reject_non_finite`).
    """
    if not expected_clients > 0:
        raise ValueError(
            f"expected_clients must be > 0 (the expected number of sampled sites, q_c * N); "
            f"got {expected_clients}"
        )
    if noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    if not deltas and template is None:
        raise ValueError(
            "no updates to average: pass template= (a tree with the parameters' shapes) so "
            "the round still releases noise with the right shapes"
        )
    like = deltas[0] if deltas else template
    total: Tree = {k: torch.zeros_like(v) for k, v in like.items()}
    for delta in deltas:
        if delta.keys() != total.keys():
            raise KeyError(
                f"updates have different parameters: missing {sorted(set(total) - set(delta))}, "
                f"unexpected {sorted(set(delta) - set(total))}"
            )
        clipped, _ = clip_update(delta, clip_norm=clip_norm)
        total = {k: total[k] + clipped[k] for k in total}
    std = _noise_std(noise_multiplier, clip_norm)
    noise = draw_standard_noise(total, generator=generator)
    return {k: (total[k] + std * noise[k]) / expected_clients for k in total}


def reject_non_finite(
    deltas: Sequence[Mapping[str, torch.Tensor]],
) -> tuple[list[Mapping[str, torch.Tensor]], list[int]]:
    """Split updates into finite ones and the indices of those with NaN or Inf.

    Must run before clipping: NaN passes a ``min(1, C / norm)`` clip unchanged
    and Inf becomes NaN, so one bad reply would poison the aggregate.
    """
    kept: list[Mapping[str, torch.Tensor]] = []
    rejected: list[int] = []
    for i, delta in enumerate(deltas):
        if all(bool(torch.isfinite(v).all()) for v in delta.values()):
            kept.append(delta)
        else:
            rejected.append(i)
    return kept, rejected
