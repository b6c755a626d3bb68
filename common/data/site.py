"""The site directory: the one way data enters metafed.

A site is a folder::

    site-0003/
      manifest.yaml        format version, site id, modalities, class names,
                           number of records, provenance
      image.npy            float32 [n, *shape]    one file per modality
      audio.npy
      audio.mask.npy       bool [n], optional: False where a record lacks "audio"
      labels.npy           int64 [n], label i names class_names[i]

:func:`load_site` validates a folder in full before any training and raises
:class:`SiteDataError` (a ``ValueError``) whose message names the offending
file and says how to fix it. Arrays are always read with
``np.load(..., allow_pickle=False)``: a file holding pickled objects is
refused, because unpickling can run arbitrary code.

:func:`write_site` writes the same format (used by the procedural benchmark,
the dataset converters and any site that prepares its own data), checking
its input with the same rules so that an invalid site is never written.
The full format is documented in ``docs/site-format.md``.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from common.data.schema import KINDS, ModalitySpec, Schema

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST",
    "LABELS_FILE",
    "SiteDataError",
    "SiteData",
    "write_site",
    "load_site",
    "list_sites",
    "read_manifest",
    "load_yaml",
    "dump_yaml",
]

FORMAT_VERSION = 1
MANIFEST = "manifest.yaml"
LABELS_FILE = "labels.npy"
MASK_SUFFIX = ".mask.npy"
REQUIRED_FIELDS = ("format_version", "site_id", "modalities", "class_names", "num_records")
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_RESERVED = {"labels", "manifest"}
_MAX_LISTED = 5


class SiteDataError(ValueError):
    """A site directory (or data for one) is invalid.

    The message names the file and says how to fix it; ``path`` holds the
    offending file or folder when there is one.
    """

    def __init__(self, message: str, *, path: str | os.PathLike | None = None) -> None:
        super().__init__(_bounded(message))
        self.path = Path(path) if path is not None else None


MAX_MESSAGE = 500


def _bounded(message: str, limit: int = MAX_MESSAGE) -> str:
    """At most ``limit`` characters: the head (what and where) and the tail (the fix) survive."""
    if len(message) <= limit:
        return message
    tail = limit // 3
    return message[: limit - tail - 5] + " ... " + message[-tail:]


def _err(path: Path | str | None, what: str, fix: str) -> SiteDataError:
    where = f"{path}: " if path is not None else ""
    return SiteDataError(f"{where}{what}. Fix: {fix}", path=path)


def _listed(indices: np.ndarray) -> str:
    idx = [int(i) for i in np.asarray(indices).ravel()[:_MAX_LISTED]]
    more = int(np.asarray(indices).size) - len(idx)
    return ", ".join(map(str, idx)) + (f" and {more} more" if more > 0 else "")


@dataclass(frozen=True)
class SiteData:
    """One site's validated records, held in memory.

    ``arrays[m]`` is ``[num_records, *specs[m].shape]``; ``masks[m]`` is a bool
    ``[num_records]`` (True where the record has modality ``m``; values of
    records without it are zeros); ``labels`` are int64 in
    ``[0, len(class_names))``. Arrays are read-only so that a site cached in a
    client process cannot be modified by accident.
    """

    site_dir: Path | None
    site_id: str
    specs: dict[str, ModalitySpec]
    arrays: dict[str, np.ndarray]
    masks: dict[str, np.ndarray]
    labels: np.ndarray
    class_names: tuple[str, ...]
    provenance: dict = field(default_factory=dict)
    # Record indices of each class, in record order (computed once, used by the episode samplers).
    class_index: tuple[np.ndarray, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        labels = np.asarray(self.labels)
        order = np.argsort(labels, kind="stable")
        counts = np.bincount(labels, minlength=len(self.class_names)) if labels.size else np.zeros(
            len(self.class_names), dtype=np.int64
        )
        bounds = np.concatenate([[0], np.cumsum(counts)])
        index = tuple(order[bounds[k] : bounds[k + 1]] for k in range(len(self.class_names)))
        for arr in index:
            arr.flags.writeable = False
        object.__setattr__(self, "class_index", index)

    @property
    def num_records(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def records_per_class(self) -> np.ndarray:
        """int64 ``[num_classes]``: how many records each class has (indexed by label)."""
        return np.array([len(ix) for ix in self.class_index], dtype=np.int64)


# --------------------------------------------------------------------------- manifest

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_Dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` (with libyaml's parser when available)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a safe loader


MAX_MANIFEST_BYTES = 1 << 20


def _refuse_aliases(text: str, path: Path) -> None:
    """Refuse YAML anchors and aliases before anything is built.

    Aliases nest: nine levels of ``&a [*b, *b, ...]`` expand to gigabytes (a
    "billion laughs"). The event stream names anchors and aliases without
    expanding them, so this costs one pass over the text.
    """
    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _err(
                path,
                "uses YAML anchors or aliases (& and *), which manifests may not",
                "write every value out in full (common.data.write_site writes manifests without them)",
            )


def dump_yaml(doc: Any) -> str:
    """``yaml.safe_dump`` keeping key order (with libyaml's emitter when available)."""
    return yaml.dump(doc, Dumper=_Dumper, sort_keys=False, allow_unicode=True)


def _check_spec(name: str, spec: ModalitySpec, where: Path | str | None) -> None:
    if not _NAME_RE.match(name) or name in _RESERVED:
        raise _err(
            where,
            f"modality name {name!r} is not allowed",
            "use letters, digits and underscores, starting with a letter (it names a file "
            "and model parameters), and not 'labels' or 'manifest'",
        )
    if spec.name != name:
        raise _err(where, f"modality {name!r} has a spec named {spec.name!r}", "make the names agree")
    if not spec.shape or any(int(s) < 1 for s in spec.shape):
        raise _err(where, f"modality {name!r}: shape {list(spec.shape)} must list positive sizes", "fix the shape")
    expected = "int64" if spec.kind == "tokens" else "float32"
    if spec.dtype != expected:
        raise _err(
            where,
            f"modality {name!r} of kind {spec.kind!r} has dtype {spec.dtype!r}",
            f"kind {spec.kind!r} is stored as {expected}: set dtype: {expected} and save the array "
            f"with arr.astype(np.{expected})",
        )


def _spec_from_manifest(name: str, entry: Any, path: Path) -> ModalitySpec:
    if not isinstance(name, str):
        raise _err(path, f"modality key {name!r} is not a string", "name modalities with strings")
    if not isinstance(entry, Mapping):
        raise _err(
            path,
            f"modality {name!r} must be a mapping with kind, shape and dtype, got {entry!r}",
            "write e.g. `image: {kind: image, shape: [1, 28, 28], dtype: float32}`",
        )
    for key in ("kind", "shape"):
        if key not in entry:
            raise _err(path, f"modality {name!r} has no '{key}'", f"add '{key}' to modalities.{name}")
    unknown = sorted(set(entry) - {"kind", "shape", "dtype", "vocab_size"})
    if unknown:
        raise _err(
            path,
            f"modality {name!r} has unknown fields {unknown}",
            "keep only kind, shape, dtype and vocab_size",
        )
    if entry["kind"] not in KINDS:
        raise _err(path, f"modality {name!r} has kind {entry['kind']!r}", f"use one of {list(KINDS)}")
    shape = entry["shape"]
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape):
        raise _err(path, f"modality {name!r}: shape must be a list of integers, got {shape!r}", "write e.g. [1, 28, 28]")
    try:
        spec = ModalitySpec.from_dict(name, dict(entry))
    except (ValueError, TypeError) as e:
        raise _err(path, f"modality {name!r} is invalid ({e})", "correct its entry in the manifest") from None
    _check_spec(name, spec, path)
    return spec


def read_manifest(site_dir: str | os.PathLike) -> dict:
    """Parse and check ``site_dir/manifest.yaml``; returns it with ``specs`` (name -> ModalitySpec) added."""
    site_dir = Path(site_dir)
    path = site_dir / MANIFEST
    if not site_dir.is_dir():
        raise _err(site_dir, "no such site directory", "point at a folder that holds a manifest.yaml")
    if not path.is_file():
        raise _err(
            path,
            "missing manifest",
            "every site folder needs a manifest.yaml (see docs/site-format.md); write the site "
            "with common.data.write_site to get one",
        )
    size = path.stat().st_size
    if size > MAX_MANIFEST_BYTES:
        raise _err(
            path,
            f"is {size} bytes; a manifest is at most {MAX_MANIFEST_BYTES} bytes",
            "keep only the manifest's fields in it (see docs/site-format.md)",
        )
    try:
        text = path.read_text(encoding="utf-8")
        _refuse_aliases(text, path)
        manifest = load_yaml(text)
    except yaml.YAMLError as e:
        raise _err(path, f"is not valid YAML ({e})", "correct the YAML syntax (see docs/site-format.md)") from None
    except UnicodeDecodeError:
        raise _err(path, "is not a UTF-8 text file", "write the manifest as UTF-8 YAML") from None
    if not isinstance(manifest, Mapping):
        raise _err(path, f"must hold a mapping of fields, got {type(manifest).__name__}", "see docs/site-format.md")
    missing = [k for k in REQUIRED_FIELDS if k not in manifest]
    if missing:
        raise _err(
            path,
            f"manifest is missing the required field(s) {', '.join(missing)}",
            f"add them; a manifest needs {', '.join(REQUIRED_FIELDS)} (provenance is optional)",
        )
    version = manifest["format_version"]
    if not isinstance(version, int) or isinstance(version, bool):
        raise _err(path, f"format_version must be an integer, got {version!r}", f"set format_version: {FORMAT_VERSION}")
    if version > FORMAT_VERSION:
        raise _err(
            path,
            f"format_version {version} is newer than this metafed reads ({FORMAT_VERSION})",
            "upgrade metafed or rewrite the site with this version",
        )
    if version < 1:
        raise _err(path, f"format_version {version} is invalid", f"set format_version: {FORMAT_VERSION}")
    if not isinstance(manifest["site_id"], (str, int)) or isinstance(manifest["site_id"], bool) or not str(manifest["site_id"]):
        raise _err(path, f"site_id must be a non-empty string, got {manifest['site_id']!r}", "set site_id: <name>")
    names = manifest["class_names"]
    if not isinstance(names, list) or not names:
        raise _err(path, "class_names must be a non-empty list", "list one name per label: class_names[i] names label i")
    if not all(isinstance(n, (str, int)) and not isinstance(n, bool) for n in names):
        raise _err(path, "class_names must hold strings", "quote each class name")
    names = [str(n) for n in names]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise _err(path, f"class_names repeats {dup[:_MAX_LISTED]}", "give every class a distinct name")
    num = manifest["num_records"]
    if not isinstance(num, int) or isinstance(num, bool) or num < 0:
        raise _err(path, f"num_records must be a non-negative integer, got {num!r}", "set it to len(labels)")
    mods = manifest["modalities"]
    if not isinstance(mods, Mapping) or not mods:
        raise _err(
            path,
            "modalities must be a non-empty mapping of name -> {kind, shape, dtype}",
            "list at least one modality (see docs/site-format.md)",
        )
    provenance = manifest.get("provenance", {})
    if provenance is None:
        provenance = {}
    if not isinstance(provenance, Mapping):
        raise _err(path, "provenance must be a mapping", "write e.g. `provenance: {source: my-hospital-2024}`")
    out = dict(manifest)
    out["site_id"] = str(manifest["site_id"])
    out["class_names"] = names
    out["provenance"] = dict(provenance)
    out["specs"] = {name: _spec_from_manifest(name, entry, path) for name, entry in mods.items()}
    return out


# --------------------------------------------------------------------------- arrays


def _check_npy_size(path: Path) -> None:
    """The size a ``.npy`` header declares (shape x dtype) must be the file's, before numpy allocates it."""
    from numpy.lib import format as npy_format

    try:
        with open(path, "rb") as f:
            if f.read(6) != b"\x93NUMPY":
                return  # not a .npy: np.load's own error says so
            f.seek(0)
            version = npy_format.read_magic(f)
            if version == (1, 0):
                shape, _fortran, dtype = npy_format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, _fortran, dtype = npy_format.read_array_header_2_0(f)
            else:
                return  # other versions: np.load refuses or reads them itself
            data_start = f.tell()
    except (ValueError, OSError, EOFError) as e:
        raise _err(path, f"has an unreadable .npy header ({_short(e)})", "write it with numpy.save") from None
    if dtype.hasobject:
        return  # an object array: np.load(allow_pickle=False) refuses it with its own message
    declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
    held = path.stat().st_size - data_start
    if declared != held:
        raise _err(
            path,
            f"its header declares {dtype}{list(shape)} ({declared} bytes) but the file holds {held} bytes "
            "of data",
            "the file is truncated or its header is wrong: write it again with numpy.save",
        )


def _short(value: Any, limit: int = 120) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_inside(site_dir: Path, path: Path, allow_external_links: bool) -> None:
    """A file of a site must lie inside its folder once links are followed, unless allowed."""
    if allow_external_links:
        return
    real = path.resolve()
    if not real.is_relative_to(site_dir.resolve()):
        raise _err(
            path,
            f"is a link to {_short(real)}, outside the site folder",
            "copy the file into the site folder, or set data.allow_external_links=true if the link is meant",
        )


def _load_npy(path: Path) -> np.ndarray:
    _check_npy_size(path)
    try:
        arr = np.load(path, allow_pickle=False)
    except ValueError as e:
        msg = str(e)
        with open(path, "rb") as f:
            head = f.read(6)
        if "object arrays" in msg.lower() or ("pickle" in msg.lower() and head[:1] == b"\x80"):
            raise _err(
                path,
                "holds pickled Python objects (an object array or a pickle), which metafed never "
                "loads because unpickling can run arbitrary code",
                f"save a plain numeric array instead, e.g. np.save('{path.name}', "
                "np.asarray(values, dtype=np.float32)) (int64 for labels and tokens, bool for masks)",
            ) from None
        if head != b"\x93NUMPY":
            msg = "it does not start with the .npy header"
        raise _err(path, f"is not a readable .npy array ({msg})", "write it with numpy.save") from None
    except (OSError, EOFError) as e:
        raise _err(path, f"is not a readable .npy array ({e})", "write it with numpy.save") from None
    if not isinstance(arr, np.ndarray):
        try:
            arr.close()
        except Exception:  # noqa: BLE001 - best effort close of an NpzFile
            pass
        raise _err(path, "is an .npz archive, not a single .npy array", "save one array per file with numpy.save")
    return arr


def _coerce_dtype(arr: np.ndarray, expected: str, path: Path | str | None, what: str) -> np.ndarray:
    want = np.dtype(expected)
    if arr.dtype == want:
        return arr
    if arr.dtype.newbyteorder("=") == want:  # same type, other byte order
        return arr.astype(want)
    raise _err(
        path,
        f"{what} has dtype {arr.dtype}, expected {expected}",
        f"save it as {expected}, e.g. np.save(path, arr.astype(np.{expected}))",
    )


def _validate(
    *,
    specs: Mapping[str, ModalitySpec],
    arrays: dict[str, np.ndarray],
    masks: dict[str, np.ndarray],
    labels: np.ndarray,
    class_names: Sequence[str],
    num_records: int | None,
    files: Mapping[str, Path | str | None],
    schema: Mapping[str, ModalitySpec] | None,
    min_records_per_class: int,
    where: Path | str | None,
    owned: bool = False,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray]:
    """Every content rule of the format; returns arrays, masks (all modalities) and labels, cleaned.

    ``files[key]`` names where each array came from, for messages (``key`` is a
    modality, ``"labels"`` or ``"<modality>.mask"``).
    """
    if schema is not None:
        for name, spec in specs.items():
            if name not in schema:
                raise _err(
                    files.get(name) or where,
                    f"unknown modality {name!r}: this experiment's modalities are {sorted(schema)}",
                    f"rename it to one of those in the manifest and its file, or remove {name}.npy "
                    "and its manifest entry",
                )
            want = schema[name]
            if (spec.kind, tuple(spec.shape), spec.dtype, spec.vocab_size) != (
                want.kind,
                tuple(want.shape),
                want.dtype,
                want.vocab_size,
            ):
                raise _err(
                    files.get(name) or where,
                    f"modality {name!r} is {spec.to_dict()} but the experiment expects {want.to_dict()}",
                    "convert the site's data to the experiment's spec (kind, shape, dtype, vocab_size)",
                )

    lpath = files.get("labels") or where
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iu":
        raise _err(
            lpath,
            f"the labels array has dtype {labels.dtype}, expected int64",
            "save class indices with np.save(path, labels.astype(np.int64))",
        )
    labels = _coerce_dtype(labels, "int64", lpath, "the labels array")
    if labels.ndim != 1:
        raise _err(lpath, f"labels have shape {list(labels.shape)}, expected [n]", "save a 1-D array of class indices")
    n = labels.shape[0]
    if num_records is not None and n != num_records:
        raise _err(
            lpath,
            f"holds {n} labels but the manifest says num_records: {num_records}",
            "make num_records equal the number of records",
        )
    if n == 0:
        raise _err(where, "empty site: it has 0 records", "give the site at least one record per class (or remove it)")
    k = len(class_names)
    bad = np.flatnonzero((labels < 0) | (labels >= k))
    if bad.size:
        raise _err(
            lpath,
            f"labels out of range at records {_listed(bad)} (values {_listed(labels[bad])}); "
            f"labels must be in [0, {k}) since there are {k} class names",
            "use label i for class_names[i] and list every class in the manifest's class_names",
        )

    out_arrays: dict[str, np.ndarray] = {}
    out_masks: dict[str, np.ndarray] = {}
    for name, spec in specs.items():
        path = files.get(name) or where
        if name not in arrays:
            raise _err(path, f"no array for modality {name!r}", f"provide {name}.npy")
        arr = np.asarray(arrays[name])
        arr = _coerce_dtype(arr, spec.dtype, path, f"modality {name!r}")
        if arr.shape != (n, *spec.shape):
            raise _err(
                path,
                f"modality {name!r} has shape {list(arr.shape)}, expected {[n, *spec.shape]} "
                f"(num_records, *shape from the manifest)",
                "reshape or resize the records to the manifest's shape, or correct the manifest",
            )
        mpath = files.get(f"{name}.mask") or where
        if name in masks and masks[name] is not None:
            mask = np.asarray(masks[name])
            if mask.dtype != np.bool_:
                raise _err(
                    mpath,
                    f"mask of {name!r} has dtype {mask.dtype}, expected bool",
                    "save it with mask.astype(bool) (True where the record has the modality)",
                )
            if mask.shape != (n,):
                raise _err(
                    mpath,
                    f"mask of {name!r} has shape {list(mask.shape)}, expected [{n}] (one flag per record)",
                    "save one bool per record: True where the record has the modality",
                )
        else:
            mask = np.ones(n, dtype=bool)
        if spec.kind == "tokens":
            bad = np.flatnonzero(mask & ((arr < 0) | (arr >= spec.vocab_size)).reshape(n, -1).any(axis=1))
            if bad.size:
                raise _err(
                    path,
                    f"token ids out of range [0, {spec.vocab_size}) in records {_listed(bad)}",
                    "map tokens into the vocabulary or raise vocab_size in the manifest",
                )
        else:
            finite = np.isfinite(arr).reshape(n, -1).all(axis=1)
            bad = np.flatnonzero(mask & ~finite)
            if bad.size:
                raise _err(
                    path,
                    f"NaN or Inf values in modality {name!r} at records {_listed(bad)}",
                    "replace them (e.g. np.nan_to_num) or mark those records as lacking the modality "
                    f"in {name}.mask.npy",
                )
        if not mask.all():
            if not owned or not arr.flags.writeable:
                arr = arr.copy()  # never modify the caller's array
            arr[~mask] = 0  # values of absent records are ignored: keep them zeros
        out_arrays[name] = arr
        out_masks[name] = mask

    if specs:
        present = np.zeros(n, dtype=bool)
        for mask in out_masks.values():
            present |= mask
        bad = np.flatnonzero(~present)
        if bad.size:
            raise _err(
                where,
                f"records {_listed(bad)} have every modality masked out",
                "drop those records, or give each record at least one modality",
            )

    if min_records_per_class > 0:
        counts = np.bincount(labels, minlength=k)
        few = np.flatnonzero(counts < min_records_per_class)
        if few.size:
            detail = ", ".join(f"{class_names[i]!r} ({counts[i]})" for i in few[:_MAX_LISTED])
            more = f" and {few.size - _MAX_LISTED} more" if few.size > _MAX_LISTED else ""
            raise _err(
                lpath,
                f"{few.size} class(es) have fewer than {min_records_per_class} records, the number "
                f"the episodes need (shots + query shots): {detail}{more}",
                "add records to those classes, remove them from the site, or use fewer shots",
            )
    return out_arrays, out_masks, labels


# --------------------------------------------------------------------------- public API


def load_site(
    site_dir: str | os.PathLike,
    *,
    schema: Mapping[str, ModalitySpec] | None = None,
    min_records_per_class: int = 0,
    allow_external_links: bool = False,
) -> SiteData:
    """Read and validate a site directory in full.

    ``schema`` (the experiment's modalities), when given, must contain every
    modality of the site with an identical spec; a site may lack some of the
    schema's modalities (the episode samplers fill them with zeros and mask
    False). ``min_records_per_class`` (shots + query shots) makes a class with
    fewer records an error up front rather than in the middle of training.
    A file that is a link to somewhere outside the site folder is refused
    unless ``allow_external_links``. Raises :class:`SiteDataError` naming the
    file and the fix.
    """
    site_dir = Path(site_dir)
    if (site_dir / MANIFEST).is_file():
        _check_inside(site_dir, site_dir / MANIFEST, allow_external_links)
    manifest = read_manifest(site_dir)
    specs: dict[str, ModalitySpec] = manifest["specs"]
    # Which files must, may and do exist.
    required = {f"{m}.npy": m for m in specs} | {LABELS_FILE: "labels"}
    optional = {f"{m}{MASK_SUFFIX}": f"{m}.mask" for m in specs}
    present = {p.name for p in site_dir.iterdir() if p.name.endswith(".npy") and p.is_file()}
    for fname in sorted(required):
        if fname not in present:
            key = required[fname]
            what = "labels" if key == "labels" else f"modality {key!r} listed in the manifest"
            raise _err(
                site_dir / fname,
                f"missing array file for {what}",
                f"save it with np.save('{fname}', ...) or remove '{key}' from the manifest"
                if key != "labels"
                else "save the int64 labels with np.save('labels.npy', labels)",
            )
    extra = sorted(present - set(required) - set(optional))
    if extra:
        raise _err(
            site_dir / extra[0],
            f"unexpected file {extra[0]}: it matches no modality in the manifest "
            f"(modalities: {sorted(specs)})",
            "add the modality to manifest.yaml, or move the file out of the site folder",
        )
    files: dict[str, Path] = {key: site_dir / fname for fname, key in required.items()}
    files |= {key: site_dir / fname for fname, key in optional.items() if fname in present}
    for path in files.values():
        _check_inside(site_dir, path, allow_external_links)
    labels = _load_npy(files["labels"])
    arrays = {m: _load_npy(files[m]) for m in specs}
    masks = {m: _load_npy(files[f"{m}.mask"]) for m in specs if f"{m}.mask" in files}
    arrays, masks, labels = _validate(
        specs=specs,
        arrays=arrays,
        masks=masks,
        labels=labels,
        class_names=manifest["class_names"],
        num_records=manifest["num_records"],
        files=files,
        schema=schema,
        min_records_per_class=min_records_per_class,
        where=site_dir,
        owned=True,
    )
    for arr in (*arrays.values(), *masks.values(), labels):
        arr.flags.writeable = False
    return SiteData(
        site_dir=site_dir,
        site_id=manifest["site_id"],
        specs=dict(specs),
        arrays=arrays,
        masks=masks,
        labels=labels,
        class_names=tuple(manifest["class_names"]),
        provenance=manifest["provenance"],
    )


def _plain(value: Any) -> Any:
    """YAML-safe copy of provenance (numpy scalars and tuples become plain Python)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


def write_site(
    site_dir: str | os.PathLike,
    *,
    arrays: Mapping[str, np.ndarray],
    labels: np.ndarray,
    class_names: Sequence[str],
    masks: Mapping[str, np.ndarray] | None = None,
    specs: Mapping[str, ModalitySpec],
    site_id: str,
    provenance: Mapping[str, Any],
    overwrite: bool = False,
) -> Path:
    """Validate records and write them as a site directory; returns its path.

    Floating arrays are stored as float32 and integer ones as int64 (per the
    spec). The folder is written into a temporary sibling and renamed into
    place, so a reader never sees half a site. An existing non-empty
    ``site_dir`` is left alone unless ``overwrite=True``. ``provenance`` is a
    free-form mapping saying where the data came from (a generator and its
    seed, or a source dataset); it is stored in the manifest.
    """
    site_dir = Path(site_dir)
    if not site_id or not isinstance(site_id, str):
        raise _err(site_dir, f"site_id must be a non-empty string, got {site_id!r}", "pass site_id='<name>'")
    names = [str(c) for c in class_names]
    if not names:
        raise _err(site_dir, "class_names is empty", "pass one name per label")
    if len(set(names)) != len(names):
        raise _err(site_dir, "class_names repeats a name", "give every class a distinct name")
    if not specs:
        raise _err(site_dir, "no modality given", "pass specs and arrays for at least one modality")
    for name, spec in specs.items():
        _check_spec(name, spec, site_dir)
    if set(arrays) != set(specs):
        raise _err(
            site_dir,
            f"arrays has modalities {sorted(arrays)} but specs has {sorted(specs)}",
            "pass one array per spec",
        )
    masks = dict(masks or {})
    unknown = sorted(set(masks) - set(specs))
    if unknown:
        raise _err(site_dir, f"masks for unknown modalities {unknown}", "pass masks only for modalities in specs")
    cast: dict[str, np.ndarray] = {}
    for name, spec in specs.items():
        arr = np.asarray(arrays[name])
        if spec.kind == "tokens" and arr.dtype.kind in "iu":
            arr = arr.astype(np.int64, copy=False)
        elif spec.kind != "tokens" and arr.dtype.kind in "fiu":
            arr = arr.astype(np.float32, copy=False)
        cast[name] = arr
    labels = np.asarray(labels)
    if labels.dtype.kind in "iu":
        labels = labels.astype(np.int64, copy=False)
    cast_masks = {m: np.asarray(v) for m, v in masks.items() if v is not None}
    cast, full_masks, labels = _validate(
        specs=specs,
        arrays=cast,
        masks=cast_masks,
        labels=labels,
        class_names=names,
        num_records=None,
        files={},
        schema=None,
        min_records_per_class=0,
        where=site_dir,
    )
    if site_dir.exists():
        if not site_dir.is_dir():
            raise _err(site_dir, "exists and is not a folder", "choose another path")
        if any(site_dir.iterdir()) and not overwrite:
            raise _err(
                site_dir,
                "already holds files; refusing to overwrite a site",
                "pass overwrite=True to replace it, or choose another folder",
            )
    manifest = {
        "format_version": FORMAT_VERSION,
        "site_id": site_id,
        "num_records": int(labels.shape[0]),
        "modalities": {name: spec.to_dict() for name, spec in specs.items()},
        "class_names": names,
        "provenance": _plain(dict(provenance)),
    }
    site_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{site_dir.name}.tmp-", dir=site_dir.parent))
    try:
        for name, arr in cast.items():
            np.save(tmp / f"{name}.npy", np.ascontiguousarray(arr), allow_pickle=False)
            if name in cast_masks:
                np.save(tmp / f"{name}{MASK_SUFFIX}", full_masks[name], allow_pickle=False)
        np.save(tmp / LABELS_FILE, labels, allow_pickle=False)
        (tmp / MANIFEST).write_text(dump_yaml(manifest), encoding="utf-8")
        os.chmod(tmp, 0o755)
        if site_dir.exists():
            if any(site_dir.iterdir()):  # overwrite=True: swap, then drop the old one
                old = Path(tempfile.mkdtemp(prefix=f".{site_dir.name}.old-", dir=site_dir.parent))
                old.rmdir()
                os.rename(site_dir, old)
                os.rename(tmp, site_dir)
                shutil.rmtree(old, ignore_errors=True)
                return site_dir
            site_dir.rmdir()
        os.rename(tmp, site_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return site_dir


def list_sites(root: str | os.PathLike) -> list[Path]:
    """Sorted sub-folders of ``root`` that hold a ``manifest.yaml`` (none if ``root`` does not exist)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST).is_file())
