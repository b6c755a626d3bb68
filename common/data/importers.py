"""Importers: the layouts people already have, written as validated site directories.

* **Class folders** (the ImageFolder convention of torchvision): ``SRC/<class>/<file>``.
  PNG and JPEG files are images, WAV files are audio. Files of one class folder
  that share a name stem (``rec01.png`` and ``rec01.wav``) are one record with
  both modalities; a record without one of them has it masked out. With
  ``sites_from="subfolders"`` the layout is ``SRC/<site>/<class>/<file>``, one
  site per sub-folder.
* **Arrays**: one ``.npy`` per modality (``[n, *shape]``), a labels array
  (``[n]``, integers or strings) and optionally a site array (``[n]``): one
  site per value of it.

Every site goes through :func:`common.data.site.write_site`, so nothing invalid
is written. Audio becomes a log-magnitude spectrogram with ``torch.stft`` at
the settings of :class:`SpectrogramSettings` (the defaults give the built-in
``audio`` spec, ``[1, 33, 32]``).
"""

from __future__ import annotations

import os
import re
import wave
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from common.data.schema import KINDS, ModalitySpec
from common.data.site import SiteDataError, write_site

__all__ = [
    "IMAGE_SUFFIXES",
    "AUDIO_SUFFIXES",
    "SpectrogramSettings",
    "ImageSettings",
    "read_image",
    "read_wav",
    "log_spectrogram",
    "import_class_folders",
    "import_arrays",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
AUDIO_SUFFIXES = (".wav",)

# progress(done, total, site): called after each record (class folders) or site (arrays).
Progress = Callable[[int, int, str], None]


def _err(path: Path | str | None, what: str, fix: str) -> SiteDataError:
    where = f"{path}: " if path is not None else ""
    return SiteDataError(f"{where}{what}. Fix: {fix}", path=path)


def site_folder_name(name: str) -> str:
    """A folder-safe site name: letters, digits, '-', '_' and '.' kept, the rest '_'."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("._")
    return safe or "site"


# --------------------------------------------------------------------------- images


@dataclass(frozen=True)
class ImageSettings:
    """How image files become ``[C, H, W]`` float32 records in [0, 1].

    ``size`` (height, width) resizes every image with Pillow's Lanczos filter;
    ``None`` keeps the files' size (they must then all have one size).
    ``channels`` 1 converts to grayscale (Pillow's ``L``), 3 to RGB.
    """

    size: tuple[int, int] | None = (28, 28)
    channels: int = 1

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"image channels must be 1 (grayscale) or 3 (RGB), got {self.channels}")
        if self.size is not None and (len(self.size) != 2 or min(self.size) < 1):
            raise ValueError(f"image size must be (height, width) of positive sizes, got {self.size}")


def read_image(path: str | os.PathLike, *, settings: ImageSettings) -> np.ndarray:
    """One image file as float32 ``[channels, H, W]`` in [0, 1] (pixel / 255)."""
    from PIL import Image

    path = Path(path)
    try:
        with Image.open(path) as im:
            im = im.convert("L" if settings.channels == 1 else "RGB")
            if settings.size is not None:
                height, width = settings.size
                im = im.resize((width, height), Image.Resampling.LANCZOS)
            x = np.asarray(im, dtype=np.float32) / 255.0
    except (OSError, ValueError) as e:
        raise _err(path, f"not a readable image ({e})", "remove or replace the file") from None
    return x[None] if x.ndim == 2 else np.ascontiguousarray(x.transpose(2, 0, 1))


# --------------------------------------------------------------------------- audio


@dataclass(frozen=True)
class SpectrogramSettings:
    """How a WAV file becomes a ``[1, n_fft // 2 + 1, frames]`` log-magnitude spectrogram.

    The samples are read with the standard library's ``wave`` (8-, 16-, 24- or
    32-bit PCM), scaled to [-1, 1] and averaged over channels. A file at another
    rate is resampled to ``sample_rate`` through the FFT (band-limited).
    ``clip_seconds`` > 0 keeps the first that many seconds, zero-padded when
    shorter. The spectrogram is ``torch.stft`` with a Hann window of ``n_fft``
    samples, ``hop`` samples apart, ``center=False``; a clip shorter than
    ``n_fft + hop * (frames - 1)`` samples is zero-padded to that length. The
    magnitudes are averaged over time into ``frames`` equal bins
    (adaptive average pooling) and stored as ``log(|S| + 0.05)``, the
    built-in benchmark's transform. The defaults (8 kHz, 64, 32, 32) give the
    built-in ``audio`` shape ``[1, 33, 32]``, and a 1,056-sample clip exactly
    its 32 frames.
    """

    sample_rate: int = 8000
    n_fft: int = 64
    hop: int = 32
    frames: int = 32
    clip_seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.sample_rate < 1 or self.n_fft < 2 or self.hop < 1 or self.frames < 1:
            raise ValueError(
                "spectrogram settings need sample_rate >= 1, n_fft >= 2, hop >= 1 and frames >= 1; got "
                f"{self.sample_rate}, {self.n_fft}, {self.hop}, {self.frames}"
            )
        if not (self.clip_seconds >= 0 and np.isfinite(self.clip_seconds)):
            raise ValueError(f"clip_seconds must be >= 0 (0: the whole clip), got {self.clip_seconds}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return (1, self.n_fft // 2 + 1, self.frames)


_PCM = {1: np.uint8, 2: np.int16, 4: np.int32}


def read_wav(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """A WAV file's samples as mono float32 in [-1, 1], and its sample rate (stdlib ``wave``)."""
    path = Path(path)
    try:
        with wave.open(str(path), "rb") as w:
            channels, width, rate, count = w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
            raw = w.readframes(count)
    except (wave.Error, EOFError, OSError) as e:
        raise _err(path, f"not a readable PCM WAV file ({e})", "convert it to 8/16/24/32-bit PCM WAV") from None
    if width == 3:
        b = np.frombuffer(raw[: len(raw) // 3 * 3], dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        x = (b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)).astype(np.int32)
        x = np.where(x >= 1 << 23, x - (1 << 24), x).astype(np.float32) / float(1 << 23)
    elif width in _PCM:
        x = np.frombuffer(raw[: len(raw) // width * width], dtype=_PCM[width]).astype(np.float32)
        x = (x - 128.0) / 128.0 if width == 1 else x / float(1 << (8 * width - 1))
    else:
        raise _err(path, f"has {8 * width}-bit samples", "convert it to 8/16/24/32-bit PCM WAV")
    n = x.size // channels
    if n == 0:
        raise _err(path, "holds no samples", "remove the empty file")
    return x[: n * channels].reshape(n, channels).mean(axis=1), int(rate)


def _resample(x: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Band-limited resampling through the FFT (the spectrum cut or zero-padded)."""
    if rate == target:
        return x
    m = max(1, int(round(x.size * target / rate)))
    spectrum = np.fft.rfft(x)
    keep = min(spectrum.size, m // 2 + 1)
    out = np.zeros(m // 2 + 1, dtype=spectrum.dtype)
    out[:keep] = spectrum[:keep]
    return (np.fft.irfft(out, m) * (m / x.size)).astype(np.float32)


def log_spectrogram(samples: np.ndarray, *, rate: int, settings: SpectrogramSettings) -> np.ndarray:
    """``[1, n_fft // 2 + 1, frames]`` float32 log-magnitude spectrogram of mono samples (see the settings)."""
    import torch

    x = _resample(np.asarray(samples, dtype=np.float32), rate, settings.sample_rate)
    if settings.clip_seconds > 0:
        length = max(1, int(round(settings.clip_seconds * settings.sample_rate)))
        x = np.pad(x[:length], (0, max(0, length - x.size)))
    need = settings.n_fft + settings.hop * (settings.frames - 1)
    if x.size < need:
        x = np.pad(x, (0, need - x.size))
    spec = torch.stft(
        torch.from_numpy(np.ascontiguousarray(x)),
        settings.n_fft,
        hop_length=settings.hop,
        window=torch.hann_window(settings.n_fft),
        center=False,
        return_complex=True,
    ).abs()  # [F, T >= frames]
    pooled = torch.nn.functional.adaptive_avg_pool1d(spec[None], settings.frames)[0]
    return torch.log(pooled + 0.05)[None].numpy().astype(np.float32)


# --------------------------------------------------------------------------- class folders


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _class_records(site_dir: Path) -> tuple[list[str], list[tuple[int, Path | None, Path | None]]]:
    """Class names and (label, image file, WAV file) per record, sorted by class and stem."""
    classes = sorted(p for p in site_dir.iterdir() if p.is_dir() and _visible(p))
    if not classes:
        raise _err(
            site_dir,
            "holds no class folders",
            "lay the files out as <site>/<class>/<file> (one folder per class); for "
            "<root>/<site>/<class>/<file> pass sites_from='subfolders' (--sites-from subfolders)",
        )
    records: list[tuple[int, Path | None, Path | None]] = []
    names: list[str] = []
    for folder in classes:
        by_stem: dict[str, dict[str, Path]] = {}
        for f in sorted(p for p in folder.iterdir() if p.is_file() and _visible(p)):
            suffix = f.suffix.lower()
            kind = "image" if suffix in IMAGE_SUFFIXES else "audio" if suffix in AUDIO_SUFFIXES else None
            if kind is None:
                continue
            slot = by_stem.setdefault(f.stem, {})
            if kind in slot:
                raise _err(
                    f,
                    f"two {kind} files share the stem {f.stem!r} ({slot[kind].name} and {f.name}), so they "
                    "would be one record",
                    "rename one of them (files that share a stem are one record)",
                )
            slot[kind] = f
        if not by_stem:
            raise _err(
                folder,
                "class folder holds no PNG, JPEG or WAV file",
                "add the class's files or move the folder out of the site",
            )
        label = len(names)
        names.append(folder.name)
        records.extend((label, s.get("image"), s.get("audio")) for _, s in sorted(by_stem.items()))
    return names, records


def _import_class_site(
    site_dir: Path,
    out_dir: Path,
    *,
    image: ImageSettings,
    spectrogram: SpectrogramSettings,
    image_name: str,
    audio_name: str,
    overwrite: bool,
    progress: Progress | None,
) -> Path:
    names, records = _class_records(site_dir)
    has_image = any(r[1] is not None for r in records)
    has_audio = any(r[2] is not None for r in records)
    if image_name == audio_name and has_image and has_audio:
        raise _err(site_dir, f"images and audio are both named {image_name!r}", "give the two modalities distinct names")
    images: list[np.ndarray] = []
    audio: list[np.ndarray] = []
    image_mask, audio_mask = [], []
    shapes: dict[tuple, Path] = {}
    for i, (_, image_file, wav_file) in enumerate(records):
        if has_image:
            if image_file is not None:
                x = read_image(image_file, settings=image)
                shapes.setdefault(x.shape, image_file)
                if len(shapes) > 1:
                    (a, fa), (b, fb) = list(shapes.items())[:2]
                    raise _err(
                        image_file,
                        f"images differ in size ({fa.name}: {list(a)}, {fb.name}: {list(b)}) and no resize was asked",
                        "pass an image size (--image-size H W) to resize every image",
                    )
                images.append(x)
            else:
                images.append(None)  # filled with zeros below
            image_mask.append(image_file is not None)
        if has_audio:
            if wav_file is not None:
                samples, rate = read_wav(wav_file)
                audio.append(log_spectrogram(samples, rate=rate, settings=spectrogram))
            else:
                audio.append(None)
            audio_mask.append(wav_file is not None)
        if progress is not None:
            progress(i + 1, len(records), site_dir.name)
    arrays, masks, specs = {}, {}, {}
    if has_image:
        shape = next(iter(shapes))
        zeros_image = np.zeros(shape, dtype=np.float32)
        arrays[image_name] = np.stack([x if x is not None else zeros_image for x in images])
        specs[image_name] = ModalitySpec(image_name, "image", tuple(shape))
        if not all(image_mask):
            masks[image_name] = np.asarray(image_mask, dtype=bool)
    if has_audio:
        zeros_audio = np.zeros(spectrogram.shape, dtype=np.float32)
        arrays[audio_name] = np.stack([x if x is not None else zeros_audio for x in audio])
        specs[audio_name] = ModalitySpec(audio_name, "spectrogram", spectrogram.shape)
        if not all(audio_mask):
            masks[audio_name] = np.asarray(audio_mask, dtype=bool)
    provenance: dict = {"source": str(site_dir.resolve()), "importer": "class folders"}
    if has_image:
        provenance["image"] = {"size": list(image.size) if image.size else None, "channels": image.channels,
                               "scale": "pixel / 255", "resize": "Pillow Lanczos"}
    if has_audio:
        provenance["audio"] = {**asdict(spectrogram), "transform": "log(|torch.stft| + 0.05), Hann window, "
                               "center=False, time averaged into frames"}
    return write_site(
        out_dir / site_folder_name(site_dir.name),
        arrays=arrays,
        masks=masks,
        labels=np.asarray([r[0] for r in records], dtype=np.int64),
        class_names=names,
        specs=specs,
        site_id=site_dir.name,
        provenance=provenance,
        overwrite=overwrite,
    )


def import_class_folders(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    sites_from: str = "folder",
    image: ImageSettings = ImageSettings(),
    spectrogram: SpectrogramSettings = SpectrogramSettings(),
    image_name: str = "image",
    audio_name: str = "audio",
    overwrite: bool = False,
    progress: Progress | None = None,
) -> list[Path]:
    """Class folders of images and/or WAV files to site directories under ``out``; returns them.

    ``sites_from="folder"``: ``src`` is one site, ``src/<class>/<file>``, written
    to ``out/<src name>``. ``sites_from="subfolders"``: every sub-folder of
    ``src`` is a site, ``src/<site>/<class>/<file>``. Class names are the
    folder names, sorted; records are sorted by file stem. Images follow
    ``image`` (:class:`ImageSettings`), WAV files ``spectrogram``
    (:class:`SpectrogramSettings`); their modalities are named ``image_name``
    and ``audio_name``. Files of other types and hidden files are ignored.
    """
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise _err(src, "no such folder", "point at a folder of class folders (<class>/<file>)")
    if sites_from not in ("folder", "subfolders"):
        raise ValueError(f"sites_from must be 'folder' or 'subfolders', got {sites_from!r}")
    site_dirs = [src] if sites_from == "folder" else sorted(p for p in src.iterdir() if p.is_dir() and _visible(p))
    if not site_dirs:
        raise _err(src, "holds no site folders", "lay the files out as <root>/<site>/<class>/<file>")
    names = [site_folder_name(d.name) for d in site_dirs]
    if len(set(names)) != len(names):
        raise _err(src, "two site folders map to one site name", "rename the site folders so they differ in letters or digits")
    for name in names:
        target = out / name
        if target.exists() and any(target.iterdir()) and not overwrite:
            raise _err(target, "already holds files; refusing to overwrite a site", "choose another --out, or pass --overwrite")
    return [
        _import_class_site(d, out, image=image, spectrogram=spectrogram, image_name=image_name,
                           audio_name=audio_name, overwrite=overwrite, progress=progress)
        for d in site_dirs
    ]


# --------------------------------------------------------------------------- arrays


def _load(path: Path, what: str) -> np.ndarray:
    if not path.is_file():
        raise _err(path, f"no such file ({what})", "check the path")
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as e:
        raise _err(path, f"cannot be read without unpickling ({e})", "save it with numpy.save from a plain numeric or string array") from None
    except OSError as e:
        raise _err(path, f"is not a .npy file ({e})", "save it with numpy.save") from None


def _guess_kind(arr: np.ndarray) -> str:
    if arr.dtype.kind in "iu" and arr.ndim == 2:
        return "tokens"
    return {4: "image", 3: "series"}.get(arr.ndim, "")


def _as_records(arr: np.ndarray, kind: str, name: str, path: Path) -> np.ndarray:
    """``[n, *shape]`` for ``kind``: a channel axis is added to [n, H, W] images and [n, L] series."""
    want = {"image": 4, "spectrogram": 4, "series": 3, "tokens": 2}[kind]
    if arr.ndim == want - 1 and kind != "tokens":
        arr = arr[:, None]
    if arr.ndim != want:
        raise _err(
            path,
            f"modality {name!r} of kind {kind!r} has shape {list(arr.shape)}; expected "
            f"{ {'image': '[n, C, H, W]', 'spectrogram': '[n, C, F, T]', 'series': '[n, C, L]', 'tokens': '[n, L]'}[kind]}",
            "reshape the array, or give the modality's kind (--kind NAME=KIND)",
        )
    return arr


def import_arrays(
    arrays: Mapping[str, str | os.PathLike],
    labels: str | os.PathLike,
    out: str | os.PathLike,
    *,
    kinds: Mapping[str, str] | None = None,
    masks: Mapping[str, str | os.PathLike] | None = None,
    sites: str | os.PathLike | None = None,
    site_id: str = "",
    vocab_sizes: Mapping[str, int] | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> list[Path]:
    """Per-modality ``.npy`` arrays and a labels array to site directories under ``out``; returns them.

    ``arrays`` maps a modality name to an ``[n, *shape]`` file. Its kind comes
    from ``kinds`` or from the array: ``[n, C, H, W]`` is an image, ``[n, C, L]``
    a series, integer ``[n, L]`` tokens (``vocab_size`` the largest id + 1
    unless ``vocab_sizes`` says). An image or spectrogram given as ``[n, H, W]``
    and a series as ``[n, L]`` get a channel axis. ``labels`` is ``[n]``
    integers or strings; a site's class names are its distinct labels, sorted.
    ``masks`` maps a modality to a bool ``[n]`` file (False: the record lacks
    it). ``sites`` is an ``[n]`` array: one site per distinct value, written to
    ``out/<value>``; without it, one site ``out/<site_id>`` (default: the
    labels file's folder name).
    """
    out = Path(out)
    kinds = dict(kinds or {})
    vocab_sizes = dict(vocab_sizes or {})
    if not arrays:
        raise _err(None, "no modality array given", "pass one .npy per modality (--array NAME=FILE)")
    unknown = sorted((set(kinds) | set(masks or {}) | set(vocab_sizes)) - set(arrays))
    if unknown:
        raise _err(None, f"kinds, masks or vocabulary sizes given for {unknown}, which have no array",
                   "name the same modalities as --array")
    labels_path = Path(labels)
    y = _load(labels_path, "labels")
    if y.ndim != 1 or y.dtype.kind not in "iuU":
        raise _err(labels_path, f"labels have shape {list(y.shape)} and dtype {y.dtype}",
                   "save a 1-D array of integer or string labels, one per record")
    n = y.shape[0]
    data: dict[str, np.ndarray] = {}
    specs: dict[str, ModalitySpec] = {}
    for name, file in arrays.items():
        path = Path(file)
        arr = _load(path, f"modality {name!r}")
        if arr.ndim < 1 or arr.shape[0] != n:
            raise _err(path, f"holds {arr.shape[0] if arr.ndim else 0} records but {labels_path.name} has {n} labels",
                       "give every array one row per record, in the same order")
        kind = kinds.get(name) or _guess_kind(arr)
        if kind not in KINDS:
            raise _err(path, f"cannot tell the kind of modality {name!r} from its shape {list(arr.shape)}",
                       f"give it: --kind {name}=KIND with KIND one of {', '.join(KINDS)}")
        arr = _as_records(arr, kind, name, path)
        vocab = 0
        if kind == "tokens":
            if arr.dtype.kind not in "iu":
                raise _err(path, f"tokens of {name!r} have dtype {arr.dtype}", "save token ids as integers")
            vocab = int(vocab_sizes.get(name) or (int(arr.max()) + 1 if arr.size else 1))
        specs[name] = ModalitySpec(name, kind, tuple(int(s) for s in arr.shape[1:]),
                                   "int64" if kind == "tokens" else "float32", vocab)
        data[name] = arr
    mask_arrays: dict[str, np.ndarray] = {}
    for name, file in (masks or {}).items():
        m = _load(Path(file), f"mask of {name!r}")
        if m.shape != (n,) or m.dtype != np.bool_:
            raise _err(file, f"the mask of {name!r} has shape {list(m.shape)} and dtype {m.dtype}",
                       f"save a bool array of {n} flags (True where the record has {name!r})")
        mask_arrays[name] = m
    if sites is not None:
        site_col = _load(Path(sites), "sites")
        if site_col.shape != (n,) or site_col.dtype.kind not in "iuU":
            raise _err(sites, f"the site array has shape {list(site_col.shape)} and dtype {site_col.dtype}",
                       f"save {n} integer or string site ids, one per record")
        groups = [(str(v), np.flatnonzero(site_col == v)) for v in np.unique(site_col)]
    else:
        groups = [(site_id or labels_path.resolve().parent.name, np.arange(n))]
    names = [site_folder_name(g) for g, _ in groups]
    if len(set(names)) != len(names):
        raise _err(sites, "two site ids map to one folder name", "use site ids that differ in letters or digits")
    for name in names:
        target = out / name
        if target.exists() and any(target.iterdir()) and not overwrite:
            raise _err(target, "already holds files; refusing to overwrite a site", "choose another --out, or pass --overwrite")
    written = []
    for i, ((sid, rows), folder) in enumerate(zip(groups, names)):
        classes, site_labels = np.unique(y[rows], return_inverse=True)
        written.append(write_site(
            out / folder,
            arrays={m: a[rows] for m, a in data.items()},
            masks={m: a[rows] for m, a in mask_arrays.items()},
            labels=site_labels.astype(np.int64),
            class_names=[str(c) for c in classes],
            specs=specs,
            site_id=sid,
            provenance={"source": {m: str(Path(f).resolve()) for m, f in arrays.items()},
                        "labels": str(labels_path.resolve()), "importer": "arrays",
                        **({"sites": str(Path(sites).resolve()), "site_value": sid} if sites is not None else {})},
            overwrite=overwrite,
        ))
        if progress is not None:
            progress(i + 1, len(groups), sid)
    return written
