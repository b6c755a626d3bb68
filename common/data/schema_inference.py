"""The experiment's schema from files: a schema file, or the sites' own manifests.

A *schema file* (``data.schema_file``) is a YAML mapping of modality name to
its spec, the same fields as a manifest's ``modalities``::

    image: {kind: image, shape: [1, 28, 28], dtype: float32}
    audio: {kind: spectrogram, shape: [1, 32, 32], dtype: float32}

Without one, :func:`infer_schema` takes the union of the modalities the sites'
manifests declare. A site may lack modalities others have; two sites that
declare one modality differently are one error that names the sites and the
fields that differ.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import yaml

from common.data.schema import ModalitySpec, Schema
from common.data.site import MANIFEST, SiteDataError, dump_yaml, load_yaml, read_manifest

__all__ = ["infer_schema", "collection_schema", "read_schema_file", "write_schema_file", "schema_difference"]

_SHOWN_SITES = 3
_FIELDS = ("kind", "shape", "dtype", "vocab_size")


def schema_difference(a: ModalitySpec, b: ModalitySpec) -> str:
    """The fields in which two specs of one modality differ, e.g. ``shape [1, 33, 32] vs [1, 32, 32]``."""
    da, db = a.to_dict(), b.to_dict()
    return ", ".join(f"{k} {da.get(k)} vs {db.get(k)}" for k in _FIELDS if da.get(k) != db.get(k))


def _names(sites: list[Path]) -> str:
    shown = ", ".join(f"{s.parent.name}/{s.name}" if s.parent.name else s.name for s in sites[:_SHOWN_SITES])
    more = len(sites) - _SHOWN_SITES
    return shown + (f" and {more} more" if more > 0 else "")


def infer_schema(site_dirs: Sequence[str | os.PathLike], *, skip_unreadable: bool = False) -> Schema:
    """The union of the modalities the sites' manifests declare, sorted by name.

    Raises :class:`SiteDataError` when the sites declare a modality
    differently (naming the sites on each side and the differing fields) or
    when there are no sites. A manifest that cannot be read is an error, or,
    with ``skip_unreadable``, left out with a warning (loading that site then
    fails with the same message at that site alone).
    """
    dirs = [Path(d) for d in site_dirs]
    if not dirs:
        raise SiteDataError("no site folders to infer the schema from. Fix: point at folders that hold a manifest.yaml")
    declared: dict[str, dict[ModalitySpec, list[Path]]] = {}
    for site in dirs:
        try:
            specs = read_manifest(site)["specs"]
        except SiteDataError as err:
            if not skip_unreadable:
                raise
            logging.getLogger("metafed.data").warning("site %s left out of the schema: %s", site, err)
            continue
        for name, spec in specs.items():
            declared.setdefault(name, {}).setdefault(spec, []).append(site)
    conflicts = []
    for name, by_spec in sorted(declared.items()):
        if len(by_spec) > 1:
            groups = sorted(by_spec.items(), key=lambda kv: -len(kv[1]))
            dicts = [spec.to_dict() for spec, _ in groups]
            fields = [k for k in _FIELDS if len({str(d.get(k)) for d in dicts}) > 1]
            sides = "; ".join(
                f"{_names(sites)} declare{'s' if len(sites) == 1 else ''} "
                + ", ".join(f"{k} {d.get(k)}" for k in fields)
                for (_, sites), d in zip(groups, dicts)
            )
            conflicts.append(f"modality {name!r}: {sides}")
    if conflicts:
        raise SiteDataError(
            "the sites disagree on the schema (from their manifest.yaml files): " + " | ".join(conflicts)
            + ". Fix: write every site with the same spec for a modality (re-import with the same sizes), "
            "or rename the modality at the sites that differ",
        )
    if not declared:
        raise SiteDataError(
            f"no readable {MANIFEST} among {_names(dirs)}. Fix: check the sites with `metafed check-site`"
        )
    return {name: next(iter(by_spec)) for name, by_spec in sorted(declared.items())}


def read_schema_file(path: str | os.PathLike) -> Schema:
    """A schema file (modality name -> kind, shape, dtype, vocab_size) as a :data:`Schema`."""
    path = Path(path)
    if not path.is_file():
        raise SiteDataError(f"{path}: no such schema file. Fix: correct data.schema_file, or leave it empty "
                            "to infer the schema from the sites' manifests", path=path)
    try:
        raw = load_yaml(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise SiteDataError(f"{path}: not valid YAML ({e}). Fix: write a mapping of modality name to "
                            "{kind, shape, dtype}", path=path) from None
    if not isinstance(raw, dict) or not raw:
        raise SiteDataError(f"{path}: a schema file is a non-empty mapping of modality name to its spec. Fix: write "
                            "e.g. `image: {kind: image, shape: [1, 28, 28], dtype: float32}`", path=path)
    try:
        return {str(name): ModalitySpec.from_dict(str(name), spec) for name, spec in raw.items()}
    except (KeyError, TypeError, ValueError) as e:
        raise SiteDataError(f"{path}: not a valid modality schema ({e}). Fix: give every modality kind and shape "
                            "(and vocab_size for tokens), as in a manifest's modalities", path=path) from None


def write_schema_file(path: str | os.PathLike, schema: Schema) -> Path:
    """Write ``schema`` as a schema file (what ``data.schema_file`` reads)."""
    path = Path(path)
    path.write_text(dump_yaml({name: spec.to_dict() for name, spec in schema.items()}), encoding="utf-8")
    return path


def collection_schema(root: str | os.PathLike) -> Schema | None:
    """The schema of the sites under ``root/train`` and ``root/test``; ``None`` when there are none.

    ``root/benchmark.yaml`` (written by the benchmark generator and the dataset
    converters) declares it when present; otherwise it is inferred from the
    sites' manifests (:func:`infer_schema`, an unreadable manifest left out).
    """
    from common.data.procedural import BENCHMARK_FILE, load_benchmark_schema
    from common.data.site import list_sites

    root = Path(root)
    if (root / BENCHMARK_FILE).is_file():
        return load_benchmark_schema(root)
    sites = list_sites(root / "train") + list_sites(root / "test")
    return infer_schema(sites, skip_unreadable=True) if sites else None
