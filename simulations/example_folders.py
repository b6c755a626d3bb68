"""Write example class folders of images and WAV recordings, the layout ``metafed import`` reads.

    python -m simulations.example_folders [OUT]      (default: the current folder)

``OUT/clinic/ward-{a,b,c}/<class>/recNN.png`` (+ ``recNN.wav``, missing for every
fourth record) holds six classes, and ``OUT/clinic-heldout/ward-d`` four other
classes. A class is a sine grating at its own angle (48x48 grayscale PNG, with
pixel noise) and a tone at its own pitch (0.5 s of 16-bit PCM at 16 kHz, pitch
jittered by 3% per record, with noise). Deterministic from a seed.
"""

from __future__ import annotations

import argparse
import wave
from pathlib import Path

import numpy as np

__all__ = ["write_example_folders"]


def _ward(folder: Path, classes: dict[str, tuple[float, float]], rng: np.random.Generator, *, records: int) -> None:
    from PIL import Image

    yy, xx = np.mgrid[0:48, 0:48] / 48
    t = np.arange(8000) / 16000
    for name, (angle, pitch) in classes.items():
        d = folder / name
        d.mkdir(parents=True, exist_ok=True)
        for r in range(records):
            grating = 0.5 + 0.4 * np.sin(12 * (np.cos(angle) * xx + np.sin(angle) * yy))
            image = np.clip(grating + 0.15 * rng.standard_normal(grating.shape), 0, 1)
            Image.fromarray((image * 255).astype(np.uint8)).save(d / f"rec{r:02d}.png")
            if r % 4 == 3:
                continue  # this record has no recording
            f = pitch * (1 + 0.03 * rng.standard_normal())
            x = np.clip(0.4 * np.sin(2 * np.pi * f * t) + 0.05 * rng.standard_normal(t.size), -1, 1)
            with wave.open(str(d / f"rec{r:02d}.wav"), "wb") as w:
                w.setnchannels(1)
                w.setsampwidth(2)
                w.setframerate(16000)
                w.writeframes((x * 32767).astype(np.int16).tobytes())


def write_example_folders(out: str | Path, *, records: int = 8, seed: int = 0) -> list[Path]:
    """Write ``out/clinic`` (three wards, six classes) and ``out/clinic-heldout`` (one ward, four classes)."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    train = {f"class{k}": (k * 0.5, 250.0 + 180 * k) for k in range(6)}
    held_out = {f"class{k}": (k * 0.5 + 0.25, 340.0 + 180 * k) for k in range(6, 10)}
    for ward in ("ward-a", "ward-b", "ward-c"):
        _ward(out / "clinic" / ward, train, rng, records=records)
    _ward(out / "clinic-heldout" / "ward-d", held_out, rng, records=records)
    return [out / "clinic", out / "clinic-heldout"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default=".")
    args = parser.parse_args(argv)
    for path in write_example_folders(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
