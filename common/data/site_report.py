"""What a site holds, checked without training: the facts behind ``metafed check-site``.

:func:`check_site` loads a site in full with :func:`common.data.site.load_site`
(every check of docs/site-format.md) and describes it: records, classes,
records per class, each modality's shape, dtype and missing rate, and which
episode sizes the site can serve. An episode of ``ways`` classes takes
``shots + query_shots`` records from each, so the sizes are the pairs (records
per class r, most ways at r) at which the number of classes that have r
records changes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.data.schema import ModalitySpec
from common.data.site import SiteDataError, load_site, read_manifest

__all__ = ["ModalityReport", "SiteReport", "check_site", "episode_sizes"]


@dataclass(frozen=True)
class ModalityReport:
    name: str
    kind: str
    shape: tuple[int, ...]
    dtype: str
    missing_rate: float  # fraction of records without the modality


@dataclass(frozen=True)
class SiteReport:
    """One site's description, or the first problem found in it (``problem``, with the file and the fix)."""

    path: Path
    site_id: str = ""
    num_records: int = 0
    class_names: tuple[str, ...] = ()
    records_per_class: tuple[int, ...] = ()
    modalities: tuple[ModalityReport, ...] = ()
    episode_sizes: tuple[tuple[int, int], ...] = ()
    problems: tuple[str, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return not self.problems


def episode_sizes(records_per_class: np.ndarray) -> tuple[tuple[int, int], ...]:
    """``(r, w)`` pairs: with up to ``r`` records per class (shots + query shots), at most ``w`` ways.

    One pair per distinct class size of at least 2 (an episode needs a support
    and a query record of a class), largest ways first.
    """
    counts = np.asarray(records_per_class, dtype=np.int64)
    sizes = sorted({int(c) for c in counts if c >= 2})
    return tuple((r, int((counts >= r).sum())) for r in sizes)


def check_site(
    site_dir: str | os.PathLike,
    *,
    schema: Mapping[str, ModalitySpec] | None = None,
    ways: int = 0,
    records_per_episode_class: int = 0,
    allow_external_links: bool = False,
) -> SiteReport:
    """Load and describe one site; a problem is reported, never raised.

    ``schema``: the experiment's modalities (a site may not declare others or
    declare one differently). ``ways`` and ``records_per_episode_class``
    (shots + query shots), when > 0, are the episodes asked of the site: too
    few classes with that many records is a problem.
    """
    path = Path(site_dir)
    try:
        site = load_site(path, schema=schema, allow_external_links=allow_external_links)
    except SiteDataError as err:
        site_id = ""
        try:
            site_id = read_manifest(path)["site_id"]
        except SiteDataError:
            pass
        return SiteReport(path=path, site_id=site_id, problems=(str(err),))
    counts = site.records_per_class()
    modalities = tuple(
        ModalityReport(name, spec.kind, tuple(spec.shape), spec.dtype,
                       float(1.0 - site.masks[name].mean()) if site.num_records else 0.0)
        for name, spec in site.specs.items()
    )
    problems = []
    empty = [site.class_names[i] for i in np.flatnonzero(counts == 0)]
    if empty:
        problems.append(
            f"{path / 'labels.npy'}: class(es) {empty[:5]} have no record. Fix: remove them from class_names "
            "in manifest.yaml and renumber the labels, or add their records"
        )
    if not episode_sizes(counts):
        problems.append(
            f"{path / 'labels.npy'}: no class has 2 records, so no episode (a support and a query record "
            "per class) can be drawn. Fix: add records to the classes"
        )
    if records_per_episode_class > 0 and ways > 0:
        eligible = int((counts >= records_per_episode_class).sum())
        if eligible < ways:
            problems.append(
                f"{path / 'labels.npy'}: only {eligible} class(es) have the {records_per_episode_class} records "
                f"(shots + query_shots) that a {ways}-way episode takes from each. Fix: add records to the "
                f"classes, or lower episodes.ways, episodes.shots or episodes.query_shots"
            )
    return SiteReport(
        path=path,
        site_id=site.site_id,
        num_records=site.num_records,
        class_names=site.class_names,
        records_per_class=tuple(int(c) for c in counts),
        modalities=modalities,
        episode_sizes=episode_sizes(counts),
        problems=tuple(problems),
    )
