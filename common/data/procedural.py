"""A procedural multimodal few-shot benchmark: the default data, generated with no download.

Every class has a latent prototype per modality:

* ``image`` [1, 28, 28]: a glyph of 2 to 4 random strokes (lines, circular
  arcs, cubic Bezier curves), rendered anti-aliased from a distance field,
  in the spirit of Omniglot's hand-drawn characters (Lake et al., "Human-level
  concept learning through probabilistic program induction", Science 2015).
* ``audio`` [1, 33, 32]: a log-magnitude spectrogram (``torch.stft``, Hann
  window of 64 samples, hop 32) of a synthesized waveform: 2 to 4 tones or
  chirps with class-specific pitches, harmonics and timing.
* ``series`` [3, 64]: a sensor-like 3-channel signal, per channel a
  class-specific mixture of bumps, oscillation bursts, steps and waves.
* ``tokens`` [16] (optional, vocabulary 64): a class-specific id sequence.

Each record varies so that one example does not pin its class: affine and
elastic jitter and stroke width for glyphs, pitch, timing, duration and
loudness jitter for sounds, time warp, amplitude and drift for series,
shifts and substitutions for tokens, plus additive noise everywhere.

Each site has its own style (a fixed affine, blur and contrast for images,
gain, spectral tilt and a hum for audio, per-channel gain and offset for
series, a vocabulary remapping for tokens) and its own noise level per
modality; at some sites a modality is degraded to near uselessness (never all
of a site's modalities), so fusing the modalities beats the best single one.

With ``DataConfig.interference > 0`` every record also gets a smooth,
class-independent interference term of its own (an illumination ramp, a
colouring of the spectrum, baseline wander; see :func:`_interference`), drawn
from a stream of its own so that the records are otherwise unchanged: raw-input
1-NN falls toward chance while the signal a model can learn stays.

Missing data follows FedMultimodal (Feng et al., "FedMultimodal: A Benchmark
For Multimodal Federated Learning", KDD 2023): a site lacks each modality with
probability ``site_missing_rate`` and a record lacks each of its site's
modalities with probability ``record_missing_rate``, never all of them.

Meta-train and meta-test sites use disjoint classes (the first 80% of the
classes train, the rest are held out). Everything is a deterministic function
of ``DataConfig.seed``; each site draws from its own seeded
``numpy.random.Generator`` streams, so a site does not change when more sites
are generated. Rendering is batched (one pass of torch ops per site and
modality), so the default 100 + 20 sites take seconds; ``workers=N`` writes
the sites in N forked processes (``metafed make-data --workers``), and a
site's files are the same byte for byte whichever process writes it.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from common.config import ConfigError, DataConfig
from common.data.schema import ModalitySpec, Schema
from common.data.site import SiteDataError, dump_yaml, list_sites, load_yaml, write_site

__all__ = [
    "PROCEDURAL_SCHEMA",
    "available_cores",
    "BENCHMARK_FILE",
    "BenchmarkPaths",
    "generate_benchmark",
    "ensure_benchmark",
    "load_benchmark_schema",
    "benchmark_paths",
    "write_benchmark_file",
]

GENERATOR_NAME = "metafed.procedural"
GENERATOR_VERSION = 1
BENCHMARK_FILE = "benchmark.yaml"
# progress(done, total, what): called in the calling process as sites are written.
Progress = Callable[[int, int, str], None]
TRAIN_CLASS_FRACTION = 0.8

IMAGE_SIZE = 28
N_FFT, HOP = 64, 32
AUDIO_FRAMES = 32
AUDIO_SAMPLES = N_FFT + HOP * (AUDIO_FRAMES - 1)  # 1056: exactly AUDIO_FRAMES frames, no padding
SERIES_CHANNELS, SERIES_LENGTH = 3, 64
TOKEN_LENGTH, TOKEN_VOCAB = 16, 64

PROCEDURAL_SCHEMA: dict[str, ModalitySpec] = {
    "image": ModalitySpec("image", "image", (1, IMAGE_SIZE, IMAGE_SIZE)),
    "audio": ModalitySpec("audio", "spectrogram", (1, N_FFT // 2 + 1, AUDIO_FRAMES)),
    "series": ModalitySpec("series", "series", (SERIES_CHANNELS, SERIES_LENGTH)),
    "tokens": ModalitySpec("tokens", "tokens", (TOKEN_LENGTH,), "int64", TOKEN_VOCAB),
}

# Stream tags for numpy SeedSequence entropy: [seed, tag, ...].
_CLASS_STREAM, _SITE_STREAM, _RECORD_STREAM, _INTERFERENCE_STREAM = 11, 12, 13, 14
_MODALITY_CODE = {"image": 1, "audio": 2, "series": 3, "tokens": 4}
_SPLIT_CODE = {"train": 0, "test": 1}

# Per-site chance that a modality is degraded (very noisy) there.
DEGRADE_RATE = 0.4

SETTINGS_FIELDS = (
    "num_train_sites",
    "num_test_sites",
    "num_classes",
    "classes_per_site",
    "records_per_class",
    "modalities",
    "site_missing_rate",
    "record_missing_rate",
    "seed",
)


@dataclass(frozen=True)
class BenchmarkPaths:
    """Where a benchmark lives: its root, its site folders (sorted) and its modality schema."""

    root: Path
    train_sites: tuple[Path, ...]
    test_sites: tuple[Path, ...]
    schema: dict[str, ModalitySpec]


# --------------------------------------------------------------------------- class prototypes


def _class_rng(seed: int, modality: str) -> np.random.Generator:
    return np.random.default_rng([seed, _CLASS_STREAM, _MODALITY_CODE[modality]])


def _pixel_grid(size: int) -> torch.Tensor:
    """Pixel centres in [-1, 1] (``align_corners=False`` convention), ``[size*size, 2]`` as (x, y)."""
    c = (torch.arange(size, dtype=torch.float32) * 2 + 1) / size - 1
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1)


def _glyph_prototypes(seed: int, num_classes: int) -> tuple[torch.Tensor, np.ndarray]:
    """Distance fields ``[C, 1, R, R]`` of every class glyph and each class's base stroke width."""
    rng = _class_rng(seed, "image")
    c, s, p = num_classes, 4, 40
    n_strokes = rng.integers(2, 5, size=c)
    kind = rng.integers(0, 3, size=(c, s))
    t = np.linspace(0.0, 1.0, p)[None, None, :, None]
    # Lines.
    a = rng.uniform(-0.7, 0.7, (c, s, 1, 2))
    b = rng.uniform(-0.7, 0.7, (c, s, 1, 2))
    line = a + t * (b - a)
    # Circular arcs.
    centre = rng.uniform(-0.3, 0.3, (c, s, 1, 2))
    radius = rng.uniform(0.2, 0.55, (c, s, 1))
    start = rng.uniform(0, 2 * np.pi, (c, s, 1))
    sweep = rng.uniform(0.5 * np.pi, 1.6 * np.pi, (c, s, 1)) * rng.choice([-1.0, 1.0], (c, s, 1))
    ang = start + sweep * t[..., 0]
    arc = centre + radius[..., None] * np.stack([np.cos(ang), np.sin(ang)], axis=-1)
    # Cubic Bezier curves.
    cp = rng.uniform(-0.75, 0.75, (c, s, 4, 1, 2))
    u = t
    bez = (1 - u) ** 3 * cp[:, :, 0] + 3 * (1 - u) ** 2 * u * cp[:, :, 1] + 3 * (1 - u) * u**2 * cp[:, :, 2] + u**3 * cp[:, :, 3]
    pts = np.where(kind[..., None, None] == 0, line, np.where(kind[..., None, None] == 1, arc, bez))
    pts = np.clip(pts, -0.85, 0.85)
    valid = np.arange(s)[None, :] < n_strokes[:, None]
    pts = np.where(valid[..., None, None], pts, 1e3)  # absent strokes: far away
    width = rng.uniform(0.06, 0.1, size=c)
    pts_t = torch.from_numpy(pts.reshape(c, s * p, 2).astype(np.float32))
    grid = _pixel_grid(IMAGE_SIZE)
    fields = torch.empty(c, IMAGE_SIZE * IMAGE_SIZE)
    for lo in range(0, c, 128):
        chunk = pts_t[lo : lo + 128]
        fields[lo : lo + 128] = torch.cdist(grid.expand(len(chunk), -1, -1), chunk).amin(dim=2)
    return fields.reshape(c, 1, IMAGE_SIZE, IMAGE_SIZE), width


def _audio_prototypes(seed: int, num_classes: int) -> dict[str, np.ndarray]:
    """Per class up to 4 sound events: onset, duration, start/end pitch, harmonics, loudness."""
    rng = _class_rng(seed, "audio")
    c, e = num_classes, 4
    n_events = rng.integers(2, 5, size=c)
    f0 = np.exp(rng.uniform(np.log(0.03), np.log(0.32), (c, e)))  # cycles per sample
    chirp = np.where(rng.random((c, e)) < 0.5, np.exp(rng.uniform(-0.7, 0.7, (c, e))), 1.0)
    return {
        "valid": np.arange(e)[None, :] < n_events[:, None],
        "onset": rng.uniform(0.0, 0.7, (c, e)),
        "duration": rng.uniform(0.15, 0.45, (c, e)),
        "f0": f0,
        "f1": np.clip(f0 * chirp, 0.02, 0.42),
        "harmonics": rng.integers(1, 4, size=(c, e)),
        "amp": rng.uniform(0.5, 1.0, (c, e)),
    }


def _series_prototypes(seed: int, num_classes: int) -> dict[str, np.ndarray]:
    """Per class and channel up to 3 shapes: bump, oscillation burst, step or wave."""
    rng = _class_rng(seed, "series")
    c, ch, k = num_classes, SERIES_CHANNELS, 3
    n_comp = rng.integers(2, 4, size=(c, ch))
    return {
        "valid": np.arange(k)[None, None, :] < n_comp[..., None],
        "kind": rng.integers(0, 4, size=(c, ch, k)),
        "pos": rng.uniform(0.1, 0.9, (c, ch, k)),
        "width": rng.uniform(0.04, 0.18, (c, ch, k)),
        "amp": rng.uniform(0.5, 1.5, (c, ch, k)) * rng.choice([-1.0, 1.0], (c, ch, k)),
        "freq": rng.uniform(2.0, 9.0, (c, ch, k)),
        "phase": rng.uniform(0, 2 * np.pi, (c, ch, k)),
    }


def _token_prototypes(seed: int, num_classes: int) -> np.ndarray:
    rng = _class_rng(seed, "tokens")
    return rng.integers(0, TOKEN_VOCAB, size=(num_classes, TOKEN_LENGTH))


@dataclass(frozen=True)
class _Prototypes:
    modalities: tuple[str, ...]
    glyph: torch.Tensor | None
    glyph_width: np.ndarray | None
    audio: dict | None
    series: dict | None
    tokens: np.ndarray | None


def _prototypes(seed: int, num_classes: int, modalities: tuple[str, ...]) -> _Prototypes:
    glyph, width = _glyph_prototypes(seed, num_classes) if "image" in modalities else (None, None)
    return _Prototypes(
        modalities=modalities,
        glyph=glyph,
        glyph_width=width,
        audio=_audio_prototypes(seed, num_classes) if "audio" in modalities else None,
        series=_series_prototypes(seed, num_classes) if "series" in modalities else None,
        tokens=_token_prototypes(seed, num_classes) if "tokens" in modalities else None,
    )


# --------------------------------------------------------------------------- per-record rendering


def _noise_level(rng: np.random.Generator, degraded: bool, clean: tuple[float, float], bad: tuple[float, float]) -> float:
    lo, hi = bad if degraded else clean
    return float(rng.uniform(lo, hi))


def _render_images(
    protos: _Prototypes, cls: np.ndarray, rng: np.random.Generator, site_rng: np.random.Generator, degraded: bool
) -> tuple[np.ndarray, dict]:
    n = len(cls)
    # Site style: a fixed affine, blur, contrast and noise level.
    s_rot = site_rng.uniform(-0.35, 0.35)
    s_shear = site_rng.uniform(-0.2, 0.2)
    s_scale = site_rng.uniform(0.9, 1.1)
    s_blur = site_rng.uniform(0.0, 1.0)
    s_gain = site_rng.uniform(0.6, 1.0)
    s_offset = site_rng.uniform(0.0, 0.25)
    sigma = _noise_level(site_rng, degraded, (0.05, 0.2), (0.7, 1.0))
    # Per-record jitter.
    rot = s_rot + rng.normal(0.0, 0.22, n)
    scale = s_scale * np.exp(rng.normal(0.0, 0.12, (n, 2)))
    shear = s_shear + rng.normal(0.0, 0.12, n)
    shift = rng.normal(0.0, 0.12, (n, 2))
    cos, sin = np.cos(rot), np.sin(rot)
    rotm = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)  # [n, 2, 2]
    shm = np.zeros((n, 2, 2))
    shm[:, 0, 0] = shm[:, 1, 1] = 1.0
    shm[:, 0, 1] = shear
    lin = rotm @ shm / scale[:, None, :]  # output -> input coordinates
    theta = np.concatenate([lin, shift[..., None]], axis=2).astype(np.float32)
    grid = F.affine_grid(torch.from_numpy(theta), [n, 1, IMAGE_SIZE, IMAGE_SIZE], align_corners=False)
    coarse = torch.from_numpy(rng.normal(0.0, 0.09, (n, 2, 4, 4)).astype(np.float32))
    elastic = F.interpolate(coarse, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bicubic", align_corners=True)
    grid = grid + elastic.permute(0, 2, 3, 1)
    field = F.grid_sample(protos.glyph[torch.from_numpy(cls)], grid, mode="bilinear", padding_mode="border", align_corners=False)
    width = protos.glyph_width[cls] * np.exp(rng.normal(0.0, 0.25, n))
    width_t = torch.from_numpy(width.astype(np.float32)).view(n, 1, 1, 1)
    ink = torch.sigmoid((width_t - field) / 0.03)
    if s_blur > 0.05:
        r = torch.arange(-2, 3, dtype=torch.float32)
        k1 = torch.exp(-0.5 * (r / s_blur) ** 2)
        k1 = k1 / k1.sum()
        ink = F.conv2d(ink, (k1[:, None] * k1[None, :]).view(1, 1, 5, 5), padding=2)
    img = s_offset + s_gain * ink
    img = img + torch.from_numpy(rng.normal(0.0, sigma, img.shape).astype(np.float32))
    img = img.clamp(0.0, 1.0)
    style = {"rotation": s_rot, "shear": s_shear, "scale": s_scale, "blur": s_blur, "gain": s_gain, "offset": s_offset, "noise": sigma}
    return img.numpy(), style


def _render_audio(
    protos: _Prototypes, cls: np.ndarray, rng: np.random.Generator, site_rng: np.random.Generator, degraded: bool
) -> tuple[np.ndarray, dict]:
    a = protos.audio
    n, e, length = len(cls), a["f0"].shape[1], AUDIO_SAMPLES
    s_gain = float(np.exp(site_rng.normal(0.0, 0.4)))
    s_tilt = site_rng.uniform(-1.0, 1.0)
    s_hum_f = site_rng.uniform(0.02, 0.45)
    s_hum_a = site_rng.uniform(0.0, 0.4)
    sigma = _noise_level(site_rng, degraded, (0.05, 0.25), (1.2, 2.0))
    # Per-record jitter of pitch, timing, duration and loudness; some events drop out.
    pitch = np.exp(rng.normal(0.0, 0.12, (n, 1)) + rng.normal(0.0, 0.05, (n, e)))
    f0 = np.clip(a["f0"][cls] * pitch, 0.01, 0.45)
    f1 = np.clip(a["f1"][cls] * pitch, 0.01, 0.45)
    onset = (a["onset"][cls] + rng.normal(0.0, 0.15, (n, 1)) + rng.normal(0.0, 0.06, (n, e))) * length
    duration = a["duration"][cls] * np.exp(rng.normal(0.0, 0.3, (n, e))) * length
    amp = a["amp"][cls] * np.exp(rng.normal(0.0, 0.35, (n, e)))
    valid = a["valid"][cls] & (rng.random((n, e)) > 0.12)
    valid[np.arange(n), np.argmax(a["valid"][cls], axis=1)] |= ~valid.any(axis=1)  # keep one event
    amp = np.where(valid, amp, 0.0)
    t = torch.arange(length, dtype=torch.float32).view(1, 1, length)
    tt = lambda x: torch.from_numpy(np.asarray(x, dtype=np.float32)).unsqueeze(-1)  # noqa: E731
    on, du = tt(onset), tt(duration)
    progress = ((t - on) / du).clamp(0.0, 1.0)
    freq = tt(f0) + (tt(f1) - tt(f0)) * progress  # [n, e, L]
    phase = 2 * math.pi * torch.cumsum(freq, dim=2) + tt(rng.uniform(0, 2 * np.pi, (n, e)))
    envelope = ((t - on) / 16.0).clamp(0.0, 1.0) * ((on + du - t) / 16.0).clamp(0.0, 1.0)  # 2 ms ramps
    top = np.maximum(f0, f1)
    wave = torch.zeros(n, length)
    harmonics = a["harmonics"][cls]
    for h in (1, 2, 3):
        weight = np.where((harmonics >= h) & (h * top < 0.48), amp * 0.6 ** (h - 1), 0.0)
        wave += (tt(weight) * envelope * torch.sin(h * phase)).sum(dim=1)
    wave = wave + s_hum_a * torch.sin(2 * math.pi * s_hum_f * t[0, 0] + float(site_rng.uniform(0, 2 * np.pi)))
    wave = s_gain * (wave + torch.from_numpy(rng.normal(0.0, sigma, (n, length)).astype(np.float32)))
    spec = torch.stft(wave, N_FFT, hop_length=HOP, window=torch.hann_window(N_FFT), center=False, return_complex=True)
    logmag = torch.log(spec.abs() + 0.05)
    logmag = logmag + s_tilt * torch.linspace(-1.0, 1.0, N_FFT // 2 + 1).view(1, -1, 1)
    logmag = (logmag - 0.5) / 2.0  # roughly zero-mean, unit-scale values
    style = {"gain": s_gain, "tilt": s_tilt, "hum_freq": s_hum_f, "hum_amp": s_hum_a, "noise": sigma}
    return logmag.unsqueeze(1).numpy(), style


def _render_series(
    protos: _Prototypes, cls: np.ndarray, rng: np.random.Generator, site_rng: np.random.Generator, degraded: bool
) -> tuple[np.ndarray, dict]:
    sp = protos.series
    n, ch, k = len(cls), SERIES_CHANNELS, sp["pos"].shape[2]
    s_gain = site_rng.uniform(0.6, 1.4, ch) * np.where(site_rng.random(ch) < 0.2, -1.0, 1.0)
    s_offset = site_rng.normal(0.0, 0.5, ch)
    sigma = _noise_level(site_rng, degraded, (0.1, 0.3), (1.5, 2.5))
    u = np.linspace(0.0, 1.0, SERIES_LENGTH)
    # Per-record time warp (scale about the centre and shift), then per-shape jitter.
    warp = (u[None, :] - 0.5) * np.exp(rng.normal(0.0, 0.15, (n, 1))) + 0.5 + rng.normal(0.0, 0.1, (n, 1))
    x = warp[:, None, None, :]  # [n, 1, 1, L]
    pos = (sp["pos"][cls] + rng.normal(0.0, 0.06, (n, ch, k)))[..., None]
    width = (sp["width"][cls] * np.exp(rng.normal(0.0, 0.3, (n, ch, k))))[..., None]
    amp = (sp["amp"][cls] * np.exp(rng.normal(0.0, 0.4, (n, ch, k))))[..., None]
    freq = (sp["freq"][cls] * np.exp(rng.normal(0.0, 0.1, (n, ch, k))))[..., None]
    phase = (sp["phase"][cls] + rng.normal(0.0, 0.6, (n, ch, k)))[..., None]
    kind = sp["kind"][cls][..., None]
    bump = np.exp(-0.5 * ((x - pos) / width) ** 2)
    burst = np.exp(-0.5 * ((x - pos) / (1.5 * width)) ** 2) * np.sin(2 * np.pi * freq * (x - pos) + phase)
    step = 1.0 / (1.0 + np.exp(-(x - pos) / (0.3 * width))) - 0.5
    wave = 0.5 * np.sin(2 * np.pi * freq * x + phase)
    shape = np.where(kind == 0, bump, np.where(kind == 1, burst, np.where(kind == 2, step, wave)))
    signal = (np.where(sp["valid"][cls][..., None], amp * shape, 0.0)).sum(axis=2)  # [n, ch, L]
    drift = np.cumsum(rng.normal(0.0, 0.07, (n, ch, SERIES_LENGTH)), axis=2)
    # A distractor bump per channel at a random place (sensor artefact).
    d_pos, d_w = rng.uniform(0.0, 1.0, (n, ch, 1)), rng.uniform(0.03, 0.12, (n, ch, 1))
    signal = signal + rng.normal(0.0, 0.7, (n, ch, 1)) * np.exp(-0.5 * ((u - d_pos) / d_w) ** 2)
    signal = signal + drift + rng.normal(0.0, sigma, signal.shape)
    signal = s_gain[None, :, None] * signal + s_offset[None, :, None]
    style = {"gain": s_gain.tolist(), "offset": s_offset.tolist(), "noise": sigma}
    return signal.astype(np.float32), style


def _render_tokens(
    protos: _Prototypes, cls: np.ndarray, rng: np.random.Generator, site_rng: np.random.Generator, degraded: bool
) -> tuple[np.ndarray, dict]:
    n = len(cls)
    # Site style: a vocabulary remapping of a quarter of the ids ("dialect").
    vocab = np.arange(TOKEN_VOCAB)
    moved = site_rng.choice(TOKEN_VOCAB, TOKEN_VOCAB // 4, replace=False)
    vocab[moved] = moved[site_rng.permutation(len(moved))]
    sub_rate = _noise_level(site_rng, degraded, (0.15, 0.3), (0.65, 0.8))
    seq = protos.tokens[cls]
    shift = rng.integers(-1, 2, n)
    cols = (np.arange(TOKEN_LENGTH)[None, :] - shift[:, None]) % TOKEN_LENGTH
    seq = np.take_along_axis(seq, cols, axis=1)
    replace = rng.random(seq.shape) < sub_rate
    seq = np.where(replace, rng.integers(0, TOKEN_VOCAB, seq.shape), seq)
    style = {"remapped_ids": int(len(moved)), "substitution_rate": sub_rate}
    return vocab[seq].astype(np.int64), style


def _interference(modality: str, shape: tuple[int, ...], rng: np.random.Generator, strength: float) -> np.ndarray:
    """Per-record low-frequency interference, added to the rendered records (``[n, *record shape]``).

    Class-independent and smooth, so a model can learn to ignore it, but large
    next to the signal, so raw-input distances (even per-record standardized
    ones, which remove only an offset and a gain) are dominated by it:

    * image: an illumination ramp, ``a x + b y + c (x^2 + y^2 - 2/3)`` over the
      canvas in [-1, 1]^2, coefficients N(0, 0.5 strength);
    * audio: a colouring of the (normalized) log spectrum, ``a f + b (f^2 - 1/3)
      + c sin(3 f)`` over frequency f in [-1, 1], coefficients N(0, 0.5 strength);
    * series: baseline wander, two sinusoids per channel of 0.3 to 1.2 cycles
      per record, amplitudes N(0, strength);
    * tokens: none (ids have no baseline).
    """
    n = shape[0]
    if modality == "image":
        size = shape[-1]
        x = np.linspace(-1.0, 1.0, size)[None, :]
        y = x.T
        c = rng.normal(0.0, 0.5 * strength, (n, 3, 1, 1))
        return c[:, :1] * x + c[:, 1:2] * y + c[:, 2:] * (x**2 + y**2 - 2.0 / 3.0)  # [n, 1, H, W]
    if modality == "audio":
        f = np.linspace(-1.0, 1.0, shape[2])[:, None]  # [F, 1]
        c = rng.normal(0.0, 0.5 * strength, (n, 3, 1, 1))
        colour = c[:, 0] * f + c[:, 1] * (f**2 - 1.0 / 3.0) + c[:, 2] * np.sin(3.0 * f)  # [n, F, 1]
        return np.broadcast_to(colour[:, None], shape).copy()
    if modality == "series":
        u = np.linspace(0.0, 1.0, shape[2])
        freq = rng.uniform(0.3, 1.2, (n, shape[1], 2, 1))
        phase = rng.uniform(0.0, 2 * np.pi, (n, shape[1], 2, 1))
        amp = rng.normal(0.0, strength, (n, shape[1], 2, 1))
        return (amp * np.sin(2 * np.pi * freq * u + phase)).sum(axis=2)
    return np.zeros(shape)


_RENDER = {"image": _render_images, "audio": _render_audio, "series": _render_series, "tokens": _render_tokens}


# --------------------------------------------------------------------------- sites


def _class_split(num_classes: int) -> tuple[range, range]:
    n_train = int(round(TRAIN_CLASS_FRACTION * num_classes))
    return range(0, n_train), range(n_train, num_classes)


def _missing_pattern(
    site_rng: np.random.Generator, modalities: tuple[str, ...], n: int, site_rate: float, record_rate: float
) -> tuple[list[str], dict[str, np.ndarray]]:
    """FedMultimodal-style missingness: which modalities the site has, and per-record masks."""
    m = len(modalities)
    has = site_rng.random(m) >= site_rate
    if not has.any():
        has[site_rng.integers(m)] = True
    present = [mod for mod, h in zip(modalities, has) if h]
    masks = site_rng.random((n, len(present))) >= record_rate
    empty = ~masks.any(axis=1)
    masks[np.flatnonzero(empty), site_rng.integers(len(present), size=int(empty.sum()))] = True
    return present, {mod: masks[:, j] for j, mod in enumerate(present)}


def _site_records(
    protos: _Prototypes, config: DataConfig, split: str, index: int, pool: range
) -> dict:
    """Everything one site holds, deterministically from (seed, split, index)."""
    site_rng = np.random.default_rng([config.seed, _SITE_STREAM, _SPLIT_CODE[split], index])
    classes = np.sort(site_rng.choice(np.asarray(pool), config.classes_per_site, replace=False))
    n = config.classes_per_site * config.records_per_class
    labels = np.repeat(np.arange(config.classes_per_site), config.records_per_class)
    labels = labels[site_rng.permutation(n)]
    cls = classes[labels]
    present, masks = _missing_pattern(
        site_rng, protos.modalities, n, config.site_missing_rate, config.record_missing_rate
    )
    # Degraded modalities (never every one the site has).
    degraded = {mod: bool(site_rng.random() < DEGRADE_RATE) for mod in present}
    if all(degraded.values()):
        degraded[present[int(site_rng.integers(len(present)))]] = False
    arrays, styles = {}, {}
    for mod in present:
        style_rng = np.random.default_rng([config.seed, _SITE_STREAM, _SPLIT_CODE[split], index, _MODALITY_CODE[mod]])
        rec_rng = np.random.default_rng([config.seed, _RECORD_STREAM, _SPLIT_CODE[split], index, _MODALITY_CODE[mod]])
        arr, style = _RENDER[mod](protos, cls, rec_rng, style_rng, degraded[mod])
        if config.interference and PROCEDURAL_SCHEMA[mod].kind != "tokens":
            # Its own stream: the records are otherwise exactly those without it.
            noise_rng = np.random.default_rng(
                [config.seed, _INTERFERENCE_STREAM, _SPLIT_CODE[split], index, _MODALITY_CODE[mod]]
            )
            arr = (arr + _interference(mod, arr.shape, noise_rng, config.interference)).astype(arr.dtype)
        arrays[mod] = arr
        styles[mod] = {"degraded": degraded[mod], **style}
    return {
        "classes": classes,
        "labels": labels,
        "arrays": arrays,
        "masks": {m: v for m, v in masks.items() if not v.all()},
        "styles": styles,
    }


def _write_one_site(protos: _Prototypes, config: DataConfig, out: Path, split: str, index: int) -> None:
    """Render site ``index`` of ``split`` and write it to ``out/split/site-XXXX``."""
    pool = _class_split(config.num_classes)[_SPLIT_CODE[split]]
    rec = _site_records(protos, config, split, index, pool)
    write_site(
        out / split / f"site-{index:04d}",
        arrays=rec["arrays"],
        labels=rec["labels"],
        class_names=[f"class-{c:04d}" for c in rec["classes"]],
        masks=rec["masks"],
        specs={m: PROCEDURAL_SCHEMA[m] for m in rec["arrays"]},
        site_id=f"{split}-{index:04d}",
        provenance={
            "generator": GENERATOR_NAME,
            "generator_version": GENERATOR_VERSION,
            "seed": config.seed,
            "split": split,
            "site_index": index,
            "class_ids": rec["classes"],
            "style": rec["styles"],
        },
    )


# What a worker process renders from, set once by :func:`_start_worker`.
_WORKER: dict = {}
# Sites per task sent to a worker: large enough that the messages cost nothing
# next to rendering (about 15 ms a site), small enough for a smooth progress bar
# and an even finish across workers.
SITES_PER_TASK = 8


def _start_worker(protos: _Prototypes, config: DataConfig, out: Path) -> None:
    torch.set_num_threads(1)
    _WORKER.update(protos=protos, config=config, out=out)


def _worker_sites(jobs: list[tuple[str, int]]) -> int:
    for split, index in jobs:
        _write_one_site(_WORKER["protos"], _WORKER["config"], _WORKER["out"], split, index)
    return len(jobs)


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _write_sites(
    protos: _Prototypes,
    config: DataConfig,
    out: Path,
    jobs: list[tuple[str, int]],
    *,
    workers: int,
    progress: Progress | None,
) -> None:
    """Write every ``(split, index)`` site of ``jobs`` under ``out``, in this process or in ``workers`` processes.

    Each site is a function of ``(config.seed, split, index)`` alone (its own
    seeded streams), so which process renders it, and in which order, does
    not change a byte of it.
    """
    total = len(jobs)
    tasks = [jobs[lo : lo + SITES_PER_TASK] for lo in range(0, total, SITES_PER_TASK)]
    workers = max(1, min(workers, len(tasks)))
    if workers == 1:
        for done, (split, index) in enumerate(jobs, start=1):
            _write_one_site(protos, config, out, split, index)
            if progress is not None:
                progress(done, total, "sites")
        return
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    # Forked workers inherit the prototypes and the imported modules: nothing is
    # pickled or imported again, and the main module is not re-run (a spawned or
    # fork-server worker would re-run an unguarded script). They run only
    # single-threaded numpy and CPU torch code.
    context = multiprocessing.get_context("fork")
    executor = ProcessPoolExecutor(
        max_workers=workers, mp_context=context, initializer=_start_worker, initargs=(protos, config, out)
    )
    try:
        pending = {executor.submit(_worker_sites, task) for task in tasks}
        done = 0
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                done += future.result()  # a worker's error is raised here; the rest is cancelled
            if progress is not None:
                progress(done, total, "sites")
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def _settings(config: DataConfig) -> dict:
    d = {f: getattr(config, f) for f in SETTINGS_FIELDS}
    d["modalities"] = list(config.modalities)
    d["site_missing_rate"] = float(d["site_missing_rate"])
    d["record_missing_rate"] = float(d["record_missing_rate"])
    # Recorded only when used, so benchmarks generated before the setting existed still match.
    if config.interference:
        d["interference"] = float(config.interference)
    return d


def _check_config(config: DataConfig) -> None:
    unknown = [m for m in config.modalities if m not in PROCEDURAL_SCHEMA]
    if unknown or not config.modalities:
        raise ConfigError(
            f"data.modalities={list(config.modalities)}: the procedural benchmark has "
            f"{list(PROCEDURAL_SCHEMA)}; pick one or more of those"
        )
    if len(set(config.modalities)) != len(config.modalities):
        raise ConfigError(f"data.modalities={list(config.modalities)} repeats a modality")
    if config.num_train_sites < 0 or config.num_test_sites < 0 or config.num_train_sites + config.num_test_sites < 1:
        raise ConfigError("data.num_train_sites and data.num_test_sites must be >= 0, and not both 0")
    if config.classes_per_site < 1 or config.records_per_class < 1:
        raise ConfigError("data.classes_per_site and data.records_per_class must be at least 1")
    train, test = _class_split(config.num_classes)
    for split, pool, count in (("train", train, config.num_train_sites), ("test", test, config.num_test_sites)):
        if count and len(pool) < config.classes_per_site:
            raise ConfigError(
                f"data.classes_per_site={config.classes_per_site} exceeds the {len(pool)} {split} classes "
                f"({'80' if split == 'train' else '20'}% of data.num_classes={config.num_classes}): "
                "raise data.num_classes or lower data.classes_per_site"
            )
    for key in ("site_missing_rate", "record_missing_rate"):
        value = getattr(config, key)
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"data.{key} must be in [0, 1); got {value}")
    if not (math.isfinite(config.interference) and config.interference >= 0.0):
        raise ConfigError(f"data.interference must be a finite number >= 0 (0: none, 1: the reference strength); "
                          f"got {config.interference}")


def write_benchmark_file(root: str | os.PathLike, *, generator: str, schema: Schema, **fields) -> Path:
    """Write ``root/benchmark.yaml`` (the generator or converter, the schema, and any ``fields``)."""
    path = Path(root) / BENCHMARK_FILE
    doc = {"format_version": 1, "generator": generator, **fields, "schema": {m: s.to_dict() for m, s in schema.items()}}
    path.write_text(dump_yaml(doc))
    return path


def _read_benchmark_file(root: Path) -> dict:
    path = root / BENCHMARK_FILE
    try:
        doc = load_yaml(path.read_text())
    except yaml.YAMLError as e:
        raise SiteDataError(f"{path}: is not valid YAML ({e}). Fix: correct it or delete the folder", path=path) from None
    if not isinstance(doc, dict) or "schema" not in doc or not isinstance(doc["schema"], dict):
        raise SiteDataError(
            f"{path}: is not a benchmark description (no schema mapping). Fix: regenerate the "
            "benchmark into an empty folder",
            path=path,
        )
    return doc


def benchmark_paths(root: str | os.PathLike) -> BenchmarkPaths:
    """The sites under ``root/train`` and ``root/test`` and the benchmark's schema."""
    root = Path(root)
    return BenchmarkPaths(
        root=root,
        train_sites=tuple(list_sites(root / "train")),
        test_sites=tuple(list_sites(root / "test")),
        schema=load_benchmark_schema(root),
    )


def load_benchmark_schema(root: str | os.PathLike) -> Schema:
    """The modality schema of the benchmark at ``root``.

    Read from ``root/benchmark.yaml`` when there is one; otherwise the union
    of the modalities declared by the site manifests under ``root/train`` and
    ``root/test`` (two sites declaring one modality differently is an error).
    """
    root = Path(root)
    if (root / BENCHMARK_FILE).is_file():
        doc = _read_benchmark_file(root)
        try:
            return {name: ModalitySpec.from_dict(name, spec) for name, spec in doc["schema"].items()}
        except (KeyError, TypeError, ValueError) as e:
            raise SiteDataError(
                f"{root / BENCHMARK_FILE}: invalid schema ({e}). Fix: regenerate the benchmark", path=root / BENCHMARK_FILE
            ) from None
    sites = list_sites(root / "train") + list_sites(root / "test")
    if not sites:
        raise SiteDataError(
            f"{root}: no benchmark.yaml and no site folders under train/ or test/. Fix: generate the "
            "procedural benchmark there, convert a dataset into it, or point at a folder of sites",
            path=root,
        )
    from common.data.schema_inference import infer_schema

    # One bad site must not stop the others: it is left out here, and loading
    # it for a round fails with its own message at that site.
    return infer_schema(sites, skip_unreadable=True)


def _check_existing(root: Path, config: DataConfig) -> BenchmarkPaths:
    doc = _read_benchmark_file(root)
    if doc.get("generator") != GENERATOR_NAME:
        raise SiteDataError(
            f"{root / BENCHMARK_FILE}: {root} holds a {doc.get('generator')!r} benchmark, not the "
            "procedural one. Fix: set data.generate=false to use it as it is, or choose another data.root",
            path=root / BENCHMARK_FILE,
        )
    want = _settings(config)
    have = doc.get("settings", {})
    if doc.get("generator_version") != GENERATOR_VERSION or have != want:
        diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
        detail = ", ".join(f"{k}: {have.get(k)!r} there, {want.get(k)!r} asked" for k in diff)
        if doc.get("generator_version") != GENERATOR_VERSION:
            detail = (detail + "; " if detail else "") + (
                f"generator version {doc.get('generator_version')!r} there, {GENERATOR_VERSION} here"
            )
        raise SiteDataError(
            f"{root / BENCHMARK_FILE}: {root} holds a procedural benchmark generated with other "
            f"settings ({detail}); it is never overwritten. Fix: choose another data.root, use the "
            "settings recorded there, or delete the folder to regenerate it",
            path=root / BENCHMARK_FILE,
        )
    return benchmark_paths(root)


def generate_benchmark(
    root: str | os.PathLike, *, config: DataConfig, workers: int = 1, progress: Progress | None = None
) -> BenchmarkPaths:
    """Write the procedural benchmark for ``config`` under ``root`` (or reuse it if already there).

    Layout: ``root/train/site-XXXX`` (meta-train sites), ``root/test/site-XXXX``
    (held-out sites with held-out classes) and ``root/benchmark.yaml`` recording
    the settings and the schema. If ``root/benchmark.yaml`` exists with the same
    settings the benchmark is reused as is; with other settings, or if ``root``
    holds other files, :class:`SiteDataError` is raised and nothing is touched.
    The benchmark is written into a temporary sibling folder and renamed into
    place, so concurrent callers and interrupted runs never leave half a
    benchmark at ``root``.

    ``workers`` > 1 renders the sites in that many processes (the files are
    the same byte for byte); ``progress(done, total, "sites")`` is called as
    sites are written.
    """
    root = Path(root)
    _check_config(config)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers must be a whole number >= 1 (processes writing sites); got {workers!r}")
    if (root / BENCHMARK_FILE).is_file():
        return _check_existing(root, config)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise SiteDataError(
            f"{root}: exists and holds files but no {BENCHMARK_FILE}; refusing to write the benchmark "
            "over them. Fix: choose an empty or new data.root, or point data.root at a folder of "
            "sites with data.generate=false",
            path=root,
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    threads = torch.get_num_threads()
    # Per-site tensors are small: intra-op threads only add contention (several times slower
    # on a busy machine), so generation runs single-threaded and restores the setting after.
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        schema = {m: PROCEDURAL_SCHEMA[m] for m in config.modalities}
        protos = _prototypes(config.seed, config.num_classes, tuple(config.modalities))
        train_pool, test_pool = _class_split(config.num_classes)
        jobs = []
        for split, count, pool in (
            ("train", config.num_train_sites, train_pool),
            ("test", config.num_test_sites, test_pool),
        ):
            (tmp / split).mkdir()
            jobs += [(split, i) for i in range(count)]
        _write_sites(protos, config, tmp, jobs, workers=workers, progress=progress)
        write_benchmark_file(
            tmp,
            generator=GENERATOR_NAME,
            schema=schema,
            generator_version=GENERATOR_VERSION,
            settings=_settings(config),
            classes={"train": [train_pool.start, train_pool.stop], "test": [test_pool.start, test_pool.stop]},
            generation_seconds=round(time.perf_counter() - start, 3),
        )
        os.chmod(tmp, 0o755)
        try:
            if root.is_dir():
                root.rmdir()  # empty (checked above)
            os.rename(tmp, root)
        except OSError:
            # Another process finished first: use its benchmark if it matches.
            if (root / BENCHMARK_FILE).is_file():
                shutil.rmtree(tmp, ignore_errors=True)
                return _check_existing(root, config)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(threads)
    return benchmark_paths(root)


def ensure_benchmark(
    config: DataConfig, *, workers: int = 1, progress: Progress | None = None
) -> BenchmarkPaths:
    """The benchmark at ``config.root``, generating the procedural one there if needed.

    * ``root/benchmark.yaml`` exists: a procedural benchmark is checked against
      ``config`` (reused, or an error if its settings differ); a converted
      dataset is used as it is.
    * No ``benchmark.yaml`` but site folders under ``root/train``: user data, used as it is.
    * Nothing there: generated when ``config.generate`` is true, else an error.

    ``workers`` and ``progress`` are passed to :func:`generate_benchmark`.
    """
    root = Path(config.root)
    if (root / BENCHMARK_FILE).is_file():
        doc = _read_benchmark_file(root)
        if doc.get("generator") == GENERATOR_NAME:
            return generate_benchmark(root, config=config, workers=workers, progress=progress)
        return benchmark_paths(root)
    if list_sites(root / "train") or list_sites(root / "test"):
        return benchmark_paths(root)
    if not config.generate:
        raise SiteDataError(
            f"{root}: no sites under train/ or test/ and data.generate is false. Fix: set "
            "data.generate=true to write the procedural benchmark there, or point data.root at a "
            "folder holding train/ and test/ site directories",
            path=root,
        )
    return generate_benchmark(root, config=config, workers=workers, progress=progress)
