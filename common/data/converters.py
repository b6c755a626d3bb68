"""Converters from public datasets already on disk to site directories (no download code).

* Omniglot (Lake, Salakhutdinov & Tenenbaum, "Human-level concept learning
  through probabilistic program induction", Science 2015): each alphabet is a
  site and each character a class. ``images_background`` alphabets become
  meta-train sites, ``images_evaluation`` alphabets held-out sites.
* LEAF FEMNIST (Caldas et al., "LEAF: A Benchmark for Federated Settings",
  2018): each writer is a site; writers are split into disjoint train and
  test sets.

Both write ``out/train/<site>``, ``out/test/<site>`` and ``out/benchmark.yaml``
(the schema and where the data came from), the layout the procedural
benchmark uses, so an experiment points ``data.root`` at ``out`` and sets
``data.generate=false``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from common.data.procedural import BenchmarkPaths, benchmark_paths, write_benchmark_file
from common.data.schema import ModalitySpec
from common.data.site import SiteDataError, write_site

__all__ = ["convert_omniglot", "convert_femnist", "FEMNIST_CLASSES"]

OMNIGLOT_SPLITS = (("images_background", "train"), ("images_evaluation", "test"))
# LEAF FEMNIST labels: 0-9 digits, 10-35 upper case, 36-61 lower case.
FEMNIST_CLASSES = tuple("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


def _site_name(name: str) -> str:
    """A folder-safe site name: letters, digits, '-', '_' and '.' kept, the rest '_'."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    return safe or "site"


def _prepare_out(out: Path) -> None:
    for split in ("train", "test"):
        d = out / split
        if d.exists() and any(d.iterdir()):
            raise SiteDataError(
                f"{d}: already holds files; refusing to overwrite converted sites. Fix: choose an "
                "empty output folder or delete this one",
                path=d,
            )
    if (out / "benchmark.yaml").exists():
        raise SiteDataError(
            f"{out / 'benchmark.yaml'}: the output folder already holds a benchmark. Fix: choose an "
            "empty output folder",
            path=out / "benchmark.yaml",
        )
    out.mkdir(parents=True, exist_ok=True)


def _load_glyph(path: Path, image_size: int) -> np.ndarray:
    try:
        with Image.open(path) as im:
            gray = im.convert("L").resize((image_size, image_size), Image.Resampling.LANCZOS)
    except (OSError, ValueError) as e:
        raise SiteDataError(f"{path}: not a readable image ({e}). Fix: remove or replace the file", path=path) from None
    x = np.asarray(gray, dtype=np.float32) / 255.0
    return np.clip(1.0 - x, 0.0, 1.0)  # strokes bright on a dark background


def convert_omniglot(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    image_size: int = 28,
) -> BenchmarkPaths:
    """Convert Omniglot's ``images_background/`` and ``images_evaluation/`` folders to sites.

    ``src`` holds one or both folders, each ``Alphabet/characterXX/*.png``
    (105x105 black-on-white drawings). Each alphabet becomes a site whose
    classes are its characters (class names ``Alphabet/characterXX``); images
    are resized to ``image_size`` with Pillow's Lanczos filter and inverted so
    strokes are bright, stored as float32 in [0, 1] with shape
    ``[1, image_size, image_size]`` under the modality ``image``. Background
    alphabets go to ``out/train``, evaluation alphabets to ``out/test``.
    """
    src, out = Path(src), Path(out)
    found = [(src / folder, split) for folder, split in OMNIGLOT_SPLITS if (src / folder).is_dir()]
    if not found:
        raise SiteDataError(
            f"{src}: holds neither images_background/ nor images_evaluation/. Fix: point src at "
            "the folder where Omniglot's zip files were extracted",
            path=src,
        )
    _prepare_out(out)
    spec = ModalitySpec("image", "image", (1, image_size, image_size))
    written = 0
    for folder, split in found:
        for alphabet in sorted(p for p in folder.iterdir() if p.is_dir()):
            characters = sorted(p for p in alphabet.iterdir() if p.is_dir())
            images, labels, names = [], [], []
            for character in characters:
                files = sorted(character.glob("*.png"))
                if not files:
                    continue
                label = len(names)
                names.append(f"{alphabet.name}/{character.name}")
                for f in files:
                    images.append(_load_glyph(f, image_size))
                    labels.append(label)
            if not images:
                continue
            write_site(
                out / split / _site_name(alphabet.name),
                arrays={"image": np.stack(images)[:, None]},
                labels=np.asarray(labels, dtype=np.int64),
                class_names=names,
                specs={"image": spec},
                site_id=alphabet.name,
                provenance={
                    "source": "Omniglot (Lake et al. 2015)",
                    "split": folder.name,
                    "alphabet": alphabet.name,
                    "path": str(alphabet.resolve()),
                    "image_size": image_size,
                },
            )
            written += 1
    if not written:
        raise SiteDataError(
            f"{src}: found no Alphabet/character*/*.png images. Fix: extract Omniglot's "
            "images_background.zip and images_evaluation.zip there",
            path=src,
        )
    write_benchmark_file(
        out,
        generator="omniglot",
        schema={"image": spec},
        source="Omniglot (Lake et al. 2015)",
        src=str(src.resolve()),
    )
    return benchmark_paths(out)


def _femnist_files(src: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    if isinstance(src, (str, os.PathLike)):
        p = Path(src)
        if p.is_dir():
            files = sorted(p.rglob("*.json"))
            if not files:
                raise SiteDataError(
                    f"{p}: no .json files found. Fix: point at LEAF's femnist data folder "
                    "(data/all_data, or data/train and data/test)",
                    path=p,
                )
            return files
        srcs: Iterable = [p]
    else:
        srcs = src
    files = [Path(f) for f in srcs]
    for f in files:
        if not f.is_file():
            raise SiteDataError(f"{f}: no such file. Fix: pass LEAF FEMNIST .json files", path=f)
    if not files:
        raise SiteDataError("no FEMNIST files given. Fix: pass a folder or a list of LEAF .json files")
    return files


def _read_femnist(files: list[Path]) -> dict[str, tuple[list, list]]:
    """writer -> (x rows, y labels), merged across files (LEAF splits a writer's samples)."""
    writers: dict[str, tuple[list, list]] = {}
    for f in files:
        try:
            doc = json.loads(f.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SiteDataError(f"{f}: not valid JSON ({e}). Fix: re-extract the LEAF data", path=f) from None
        if not isinstance(doc, dict) or not isinstance(doc.get("user_data"), dict):
            raise SiteDataError(
                f"{f}: not a LEAF file (expected keys users, num_samples, user_data). Fix: pass "
                "LEAF FEMNIST .json files",
                path=f,
            )
        for user, data in doc["user_data"].items():
            if not isinstance(data, dict) or "x" not in data or "y" not in data or len(data["x"]) != len(data["y"]):
                raise SiteDataError(
                    f"{f}: user_data[{user!r}] needs lists 'x' and 'y' of equal length. Fix: re-extract the LEAF data",
                    path=f,
                )
            xs, ys = writers.setdefault(str(user), ([], []))
            xs.extend(data["x"])
            ys.extend(data["y"])
    return writers


def convert_femnist(
    src_dir_or_files: str | os.PathLike | Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
    min_records: int = 20,
    min_records_per_class: int = 2,
    invert: bool | None = None,
) -> BenchmarkPaths:
    """Convert LEAF FEMNIST JSON files to one site per writer.

    Each file is ``{"users": [...], "num_samples": [...], "user_data": {user:
    {"x": [[784 floats]], "y": [int]}}}``; a writer's samples are merged across
    files (LEAF's own train/test files split each writer). Per writer, classes
    with fewer than ``min_records_per_class`` samples are dropped (a few-shot
    episode needs support and query records of a class) and writers left with
    fewer than ``min_records`` samples are skipped. Images are stored as
    float32 ``[1, 28, 28]`` under ``image``, strokes bright (LEAF stores dark
    ink on a light background: ``invert=None`` detects this from the image
    borders). Writers are shuffled with ``seed`` and ``test_fraction`` of them
    become held-out sites (``out/test``), disjoint from ``out/train``.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    files = _femnist_files(src_dir_or_files)
    out = Path(out)
    writers = _read_femnist(files)
    spec = ModalitySpec("image", "image", (1, 28, 28))
    sites: list[tuple[str, np.ndarray, np.ndarray, list[str]]] = []
    for user in sorted(writers):
        xs, ys = writers[user]
        try:
            x = np.asarray(xs, dtype=np.float32)
            y = np.asarray(ys, dtype=np.int64)
        except (ValueError, TypeError) as e:
            raise SiteDataError(
                f"writer {user!r}: x must be lists of 784 numbers and y integers ({e}). Fix: re-extract the LEAF data"
            ) from None
        if x.ndim != 2 or x.shape[1] != 784:
            raise SiteDataError(
                f"writer {user!r}: images have shape {list(x.shape)[1:]}, expected 784 values (28x28). "
                "Fix: pass LEAF FEMNIST files"
            )
        if y.size and (y.min() < 0 or y.max() >= len(FEMNIST_CLASSES)):
            raise SiteDataError(f"writer {user!r}: labels outside 0..61. Fix: pass LEAF FEMNIST files")
        counts = np.bincount(y, minlength=len(FEMNIST_CLASSES))
        keep_classes = np.flatnonzero(counts >= max(1, min_records_per_class))
        keep = np.isin(y, keep_classes)
        if keep.sum() < max(1, min_records):
            continue
        remap = np.full(len(FEMNIST_CLASSES), -1, dtype=np.int64)
        remap[keep_classes] = np.arange(len(keep_classes))
        images = x[keep].reshape(-1, 1, 28, 28)
        flip = invert
        if flip is None:
            border = np.concatenate([images[:, 0, 0, :], images[:, 0, -1, :], images[:, 0, :, 0], images[:, 0, :, -1]], axis=1)
            flip = float(np.median(border)) > 0.5
        if flip:
            images = 1.0 - images
        sites.append((user, images, remap[y[keep]], [FEMNIST_CLASSES[c] for c in keep_classes]))
    if not sites:
        raise SiteDataError(
            f"no writer has at least {min_records} samples in classes with at least "
            f"{min_records_per_class} samples. Fix: lower min_records or min_records_per_class"
        )
    _prepare_out(out)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(sites))
    n_test = int(round(test_fraction * len(sites)))
    if test_fraction > 0 and n_test == 0 and len(sites) > 1:
        n_test = 1
    test_ids = set(order[:n_test].tolist())
    used: set[str] = set()
    for i, (user, images, labels, names) in enumerate(sites):
        split = "test" if i in test_ids else "train"
        name = _site_name(user)
        while name in used:
            name += "_"
        used.add(name)
        write_site(
            out / split / name,
            arrays={"image": images},
            labels=labels,
            class_names=names,
            specs={"image": spec},
            site_id=user,
            provenance={
                "source": "LEAF FEMNIST (Caldas et al. 2018)",
                "writer": user,
                "split_seed": seed,
                "test_fraction": test_fraction,
                "files": [str(f) for f in files][:20],
            },
        )
    write_benchmark_file(
        out,
        generator="femnist",
        schema={"image": spec},
        source="LEAF FEMNIST (Caldas et al. 2018)",
        split_seed=seed,
        test_fraction=test_fraction,
    )
    return benchmark_paths(out)
