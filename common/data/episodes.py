"""Few-shot episodes drawn from one site, batched per the layout of :mod:`common.data.schema`.

``sample_episodes`` draws standard N-way K-shot episodes (support and query
disjoint, labels relabelled ``0..ways-1`` in a random class order).
``sample_poisson_episodes`` draws episodes whose support set (and, as an
option, query set) is a Poisson sample of the site's records, the sampling
that record-level differential privacy accounting (amplification by
subsampling) assumes.

Both return a meta-batch: every tensor has a leading episode axis ``E``, and
every modality of the experiment's schema is present (zeros with mask False
where the site or the record lacks it), so episodes from different sites have
one structure and stack or ``vmap`` without special cases. All randomness
comes from the ``torch.Generator`` passed in.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from common.data.schema import ModalitySpec
from common.data.site import SiteData, SiteDataError

__all__ = ["sample_episodes", "sample_poisson_episodes", "eligible_classes"]


def eligible_classes(site: SiteData, *, min_records: int) -> np.ndarray:
    """Labels of the classes with at least ``min_records`` records (sorted)."""
    return np.flatnonzero(site.records_per_class() >= min_records)


def _check_schema(site: SiteData, schema: Mapping[str, ModalitySpec]) -> None:
    if not schema:
        raise SiteDataError("the schema names no modality: pass the experiment's schema")
    for name, spec in site.specs.items():
        if name in schema:
            want = schema[name]
            if (spec.kind, tuple(spec.shape), spec.dtype, spec.vocab_size) != (
                want.kind,
                tuple(want.shape),
                want.dtype,
                want.vocab_size,
            ):
                raise SiteDataError(
                    f"site {site.site_id!r}: modality {name!r} is {spec.to_dict()} but the schema "
                    f"expects {want.to_dict()}. Fix: convert the site's data to the schema's spec",
                    path=site.site_dir,
                )
    if not any(name in schema for name in site.specs):
        raise SiteDataError(
            f"site {site.site_id!r} has none of the schema's modalities (site: {sorted(site.specs)}, "
            f"schema: {sorted(schema)}). Fix: give the site at least one of the schema's modalities",
            path=site.site_dir,
        )


def _padded_class_index(site: SiteData, classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``[len(classes), max_count]`` record indices (padded with 0) and the counts."""
    counts = np.array([len(site.class_index[c]) for c in classes], dtype=np.int64)
    width = max(1, int(counts.max()) if counts.size else 1)
    table = np.zeros((len(classes), width), dtype=np.int64)
    for row, c in enumerate(classes):
        ix = site.class_index[c]
        table[row, : len(ix)] = ix
    return table, counts


def _gather(
    site: SiteData,
    schema: Mapping[str, ModalitySpec],
    index: np.ndarray,
    valid: np.ndarray,
    labels: np.ndarray,
    *,
    device: torch.device | str | None,
    dtype: torch.dtype,
) -> dict:
    """Batch of records ``index`` ([E, B]); entries where ``valid`` is False are padding."""
    inputs: dict[str, torch.Tensor] = {}
    masks: dict[str, torch.Tensor] = {}
    for name, spec in schema.items():
        if name in site.arrays:
            values = site.arrays[name][index]
            present = site.masks[name][index] & valid
            if not valid.all():
                values[~valid] = 0
        else:
            np_dtype = np.int64 if spec.kind == "tokens" else np.float32
            values = np.zeros((*index.shape, *spec.shape), dtype=np_dtype)
            present = np.zeros(index.shape, dtype=bool)
        t = torch.from_numpy(values)
        t = t.to(device=device) if spec.kind == "tokens" else t.to(device=device, dtype=dtype)
        inputs[name] = t
        masks[name] = torch.from_numpy(present).to(device=device)
    return {
        "inputs": inputs,
        "masks": masks,
        "labels": torch.from_numpy(np.where(valid, labels, 0).astype(np.int64)).to(device=device),
        "weights": torch.from_numpy(valid).to(device=device, dtype=dtype),
    }


def _uniform(source, shape: tuple[int, ...]) -> np.ndarray:
    """Float64 uniforms in [0, 1) from a ``torch.Generator`` or a keyed stream (``.uniform``)."""
    if isinstance(source, torch.Generator):
        return torch.rand(shape, generator=source, dtype=torch.float64).numpy()
    return source.uniform(shape).numpy()


def _randperm_rows(keys_shape: tuple[int, ...], counts: np.ndarray, generator) -> np.ndarray:
    """Per row, a uniformly random order of the positions ``0..count-1`` (invalid positions last)."""
    keys = _uniform(generator, keys_shape)
    width = keys_shape[-1]
    keys[np.arange(width) >= counts[..., None]] = 2.0  # past the end: sort last
    return np.argsort(keys, axis=-1, kind="stable")


def sample_episodes(
    site: SiteData,
    *,
    schema: Mapping[str, ModalitySpec],
    ways: int,
    shots: int,
    query_shots: int,
    num_episodes: int,
    generator: torch.Generator,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict:
    """Draw ``num_episodes`` N-way K-shot episodes from one site.

    Each episode picks ``ways`` distinct classes among those with at least
    ``shots + query_shots`` records, in a random order that defines the
    episode labels ``0..ways-1``, then ``shots`` support and ``query_shots``
    query records per class, drawn without replacement (support and query are
    disjoint). Returns ``{"support": batch, "query": batch}`` where every
    tensor has a leading axis ``E = num_episodes``: inputs ``[E, ways*shots,
    *shape]``, masks and labels ``[E, ways*shots]``, weights all ones (the
    query likewise with ``ways*query_shots``). Records are ordered class by
    class. Modalities of ``schema`` that the site lacks are zeros with mask
    False; modalities the site has but the schema does not are left out.

    Raises :class:`SiteDataError` when fewer than ``ways`` classes have enough
    records.
    """
    if ways < 1 or shots < 0 or query_shots < 0 or num_episodes < 1 or shots + query_shots < 1:
        raise ValueError(
            f"need ways >= 1, shots >= 0, query_shots >= 0 (not both 0) and num_episodes >= 1; got "
            f"ways={ways}, shots={shots}, query_shots={query_shots}, num_episodes={num_episodes}"
        )
    _check_schema(site, schema)
    need = shots + query_shots
    eligible = eligible_classes(site, min_records=need)
    if len(eligible) < ways:
        raise SiteDataError(
            f"site {site.site_id!r}: only {len(eligible)} of its {site.num_classes} classes have at "
            f"least shots + query_shots = {shots} + {query_shots} = {need} records, but an episode "
            f"needs {ways} such classes. Fix: lower ways, shots or query_shots, or add records "
            f"(records per class: {site.records_per_class().tolist()})",
            path=site.site_dir,
        )
    e = num_episodes
    # Classes: the first `ways` of a random permutation of the eligible ones, per episode.
    class_keys = torch.rand((e, len(eligible)), generator=generator, dtype=torch.float64).numpy()
    chosen = eligible[np.argsort(class_keys, axis=1, kind="stable")[:, :ways]]  # [E, ways]
    table, counts = _padded_class_index(site, eligible)
    row_of = np.full(site.num_classes, -1, dtype=np.int64)
    row_of[eligible] = np.arange(len(eligible))
    rows = row_of[chosen]  # [E, ways]
    order = _randperm_rows((e, ways, table.shape[1]), counts[rows], generator)[..., :need]
    records = table[rows[..., None], order]  # [E, ways, need]
    episode_labels = np.broadcast_to(np.arange(ways)[None, :, None], (e, ways, need))

    def part(sl: slice, k: int) -> dict:
        idx = records[..., sl].reshape(e, ways * k)
        lab = episode_labels[..., sl].reshape(e, ways * k)
        return _gather(site, schema, idx, np.ones_like(idx, dtype=bool), lab, device=device, dtype=dtype)

    return {"support": part(slice(0, shots), shots), "query": part(slice(shots, need), query_shots)}


def sample_poisson_episodes(
    site: SiteData,
    *,
    schema: Mapping[str, ModalitySpec],
    ways: int,
    sample_rate: float,
    query_shots: int,
    num_episodes: int,
    generator: torch.Generator,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    query_sample_rate: float | None = None,
    coins=None,
) -> tuple[dict, dict]:
    """Episodes whose support set is a Poisson sample of the site's records (for record-level DP).

    Per episode: (1) pick ``ways`` classes uniformly without replacement from
    the site's class list (all ``class_names``, whatever their record counts:
    the choice does not look at the records); (2) take ``min(query_shots,
    n_c)`` query records uniformly from each chosen class ``c`` (missing ones
    are padding with weight 0); (3) put every remaining record of the chosen
    classes in the support independently with probability ``sample_rate``.
    The support is padded to a common length ``max(1, largest support)``
    across the meta-batch: padding has weight 0, mask False, label 0 and zero
    inputs. An empty support (all weights 0) is possible and representable.

    Why this is Poisson sampling at rate at most ``sample_rate``: the class
    choice (1) is independent of the data. Given it and the query (2), each
    candidate record enters the support by its own coin flip, independent of
    every other record, so the support is exactly a Poisson subsample at rate
    ``q = sample_rate`` of the candidate pool; a record's marginal chance of
    being in a support is ``(ways/K) * (1 - query_shots/n_c) * q <= q``. For
    add/remove neighbours D' = D + {x}: conditioned on x not being drawn into
    the query, the query of D' has exactly D's query distribution and x is one
    more candidate; conditioned on x being drawn into the query, the query of
    D' is D's query with one record y returned to the pool. Either way the
    support of D' is a Poisson-q sample of D's pool plus one record, under a
    coupling of the pools that does not depend on the coins, so by joint
    convexity of the privacy divergences the textbook amplification bound for
    Poisson subsampling at rate ``q`` holds for any computation on the support
    (e.g. DP-SGD steps adapting on it). Each episode is an independent such
    sample; the accountant composes the ``num_episodes`` samples. The query is
    not covered: an algorithm that trains on query records must privatize
    them separately (Reptile trains on the support only).

    With ``query_sample_rate`` set (algorithms whose update releases a
    query-set gradient: FOMAML, Meta-SGD), the query is a Poisson sample too
    and ``query_shots`` is not used: after (1), every record of the chosen
    classes joins the support by one coin (rate ``sample_rate``) and the query
    by another, independent coin (rate ``query_sample_rate``). The two samples
    are independent, so a record may land in both; each is exactly a Poisson
    subsample of the chosen classes' records (a pool fixed by the
    data-independent class choice), so amplification holds for each release
    separately and the accountant composes the two. The query is padded like
    the support (to ``max(1, largest query)``, weight 0).

    Randomness: ``generator`` picks the classes (1) only; everything that
    looks at records (the query's order (2) and every coin (3)) comes from
    ``coins``, a :class:`~common.privacy.randomness.KeyedStream` (or anything
    with ``uniform(shape)``). Under record-level DP ``coins`` must be a secret
    of the site's: whoever can rebuild the coins knows which records are in
    each sample, and amplification by subsampling is void. With ``coins=None``
    everything is drawn from ``generator`` (reproducible, not secret).

    Returns ``(batch, info)``: ``batch`` is ``{"support", "query"}`` as in
    :func:`sample_episodes` (support ``[E, L]``, query ``[E, ways*query_shots]``,
    or ``[E, L_q]`` when the query is Poisson-sampled); ``info`` holds
    ``expected_support_size`` (``sample_rate`` times the number of candidates,
    per episode, dtype ``dtype``) and ``support_size`` (actual sizes, int64),
    both ``[E]``, and with a Poisson query also ``expected_query_size`` and
    ``query_size``. These sizes count the site's records: they are for
    inspection, never a DP normalizer (the divisor must not depend on the data,
    see :meth:`common.task.Task.record_dp_divisors`).
    """
    if not 0.0 <= sample_rate <= 1.0:
        raise ValueError(f"sample_rate must be in [0, 1], got {sample_rate}")
    if query_sample_rate is not None and not 0.0 <= query_sample_rate <= 1.0:
        raise ValueError(f"query_sample_rate must be in [0, 1] (or None), got {query_sample_rate}")
    if ways < 1 or query_shots < 0 or num_episodes < 1:
        raise ValueError(
            f"need ways >= 1, query_shots >= 0 and num_episodes >= 1; got ways={ways}, "
            f"query_shots={query_shots}, num_episodes={num_episodes}"
        )
    _check_schema(site, schema)
    k = site.num_classes
    if k < ways:
        raise SiteDataError(
            f"site {site.site_id!r} lists {k} classes but an episode needs ways={ways}. "
            "Fix: lower ways or give the site more classes",
            path=site.site_dir,
        )
    e = num_episodes
    all_classes = np.arange(k)
    class_keys = torch.rand((e, k), generator=generator, dtype=torch.float64).numpy()
    chosen = np.argsort(class_keys, axis=1, kind="stable")[:, :ways]  # [E, ways], data-independent
    table, counts = _padded_class_index(site, all_classes)
    width = table.shape[1]
    n_c = counts[chosen]  # [E, ways]
    coins = generator if coins is None else coins
    order = _randperm_rows((e, ways, width), n_c, coins)
    records = table[chosen[..., None], order]  # [E, ways, width], valid where position < n_c
    pos = np.arange(width)
    flat_records = records.reshape(e, ways * width)
    flat_labels = np.broadcast_to(np.arange(ways)[None, :, None], (e, ways, width)).reshape(e, ways * width)

    def poisson_part(candidate: np.ndarray, rate: float) -> tuple[dict, np.ndarray, np.ndarray]:
        """Every candidate record with its own coin at ``rate``; padded batch, sizes, candidate counts."""
        flips = _uniform(coins, (e, ways, width)) < rate
        included = (candidate & flips).reshape(e, ways * width)
        sizes = included.sum(axis=1)
        length = max(1, int(sizes.max()))
        first = np.argsort(~included, axis=1, kind="stable")[:, :length]  # included records first, in order
        idx = np.take_along_axis(flat_records, first, axis=1)
        valid = np.arange(length)[None, :] < sizes[:, None]
        labels = np.take_along_axis(flat_labels, first, axis=1)
        batch = _gather(site, schema, idx, valid, labels, device=device, dtype=dtype)
        return batch, sizes, candidate.reshape(e, -1).sum(axis=1)

    if query_sample_rate is not None:
        # Support and query: independent Poisson samples of all records of the chosen classes.
        candidate = np.broadcast_to(pos[None, None, :] < n_c[..., None], (e, ways, width))
        support, sizes, candidates = poisson_part(candidate, sample_rate)
        query, q_sizes, q_candidates = poisson_part(candidate, query_sample_rate)
        info = {
            "expected_support_size": torch.as_tensor(sample_rate * candidates, dtype=dtype, device=device),
            "support_size": torch.as_tensor(sizes, dtype=torch.int64, device=device),
            "expected_query_size": torch.as_tensor(query_sample_rate * q_candidates, dtype=dtype, device=device),
            "query_size": torch.as_tensor(q_sizes, dtype=torch.int64, device=device),
        }
        return {"support": support, "query": query}, info

    # Query: the first query_shots positions of each class's random order.
    q_idx = records[..., :query_shots] if query_shots <= width else np.pad(
        records, ((0, 0), (0, 0), (0, query_shots - width))
    )
    q_valid = np.arange(query_shots)[None, None, :] < n_c[..., None]
    q_labels = np.broadcast_to(np.arange(ways)[None, :, None], q_valid.shape)
    query = _gather(
        site,
        schema,
        q_idx.reshape(e, ways * query_shots),
        q_valid.reshape(e, ways * query_shots),
        q_labels.reshape(e, ways * query_shots),
        device=device,
        dtype=dtype,
    )
    # Support: every remaining record of the chosen classes, each with its own coin.
    candidate = (pos[None, None, :] >= query_shots) & (pos[None, None, :] < n_c[..., None])
    support, sizes, candidates = poisson_part(candidate, sample_rate)
    info = {
        "expected_support_size": torch.as_tensor(sample_rate * candidates, dtype=dtype, device=device),
        "support_size": torch.as_tensor(sizes, dtype=torch.int64, device=device),
    }
    return {"support": support, "query": query}, info
