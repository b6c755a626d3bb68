"""metafed import: class folders of images and WAV audio, and per-modality arrays, as site directories."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.data import PROCEDURAL_SCHEMA, SiteDataError, load_site
from common.data.importers import (
    ImageSettings,
    SpectrogramSettings,
    import_arrays,
    import_class_folders,
    log_spectrogram,
    read_wav,
)


def write_wav(path: Path, samples: np.ndarray, *, rate: int, width: int = 2, channels: int = 1) -> None:
    """``samples`` in [-1, 1] as PCM of ``width`` bytes, the same signal on every channel."""
    path.parent.mkdir(parents=True, exist_ok=True)
    scale = float(1 << (8 * width - 1)) - 1
    ints = np.repeat(np.round(np.asarray(samples) * scale).astype(np.int64), channels)  # interleaved
    if width == 3:
        frames = ints.astype("<i4").view(np.uint8).reshape(-1, 4)[:, :3].tobytes()
    else:
        frames = ints.astype({2: "<i2", 4: "<i4"}[width]).tobytes()
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(frames)


def tone(freq: float, *, rate: int, n: int) -> np.ndarray:
    return 0.5 * np.sin(2 * np.pi * freq * np.arange(n) / rate)


def write_image(path: Path, value: int, size=(20, 16), mode="L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size[0], size[1]) if mode == "L" else (size[0], size[1], 3)
    Image.fromarray(np.full(shape, value, dtype=np.uint8), mode=mode).save(path)


# --------------------------------------------------------------------------- images


def test_image_class_folders_become_one_site_with_a_class_per_folder(tmp_path):
    src = tmp_path / "photos"
    values = {"owl": 40, "cat": 200, "dog": 120}  # one grey level per class
    for cls, v in values.items():
        for r in range(3):
            write_image(src / cls / f"r{r}.png", v)
        write_image(src / cls / "extra.jpeg", v, mode="RGB")  # JPEG, RGB: converted to grey
    (src / "cat" / "notes.txt").write_text("ignored")
    (site_dir,) = import_class_folders(src, tmp_path / "out", image=ImageSettings(size=(12, 10)))
    assert site_dir == tmp_path / "out" / "photos"
    site = load_site(site_dir)
    assert site.class_names == ("cat", "dog", "owl")  # sorted folder names
    assert site.specs["image"].shape == (1, 12, 10) and site.specs["image"].kind == "image"
    assert site.records_per_class().tolist() == [4, 4, 4]
    for label, cls in enumerate(site.class_names):
        x = site.arrays["image"][site.labels == label]
        # JPEG is lossy and Lanczos rings at the border: a flat image stays flat to a few levels.
        np.testing.assert_allclose(x, values[cls] / 255.0, atol=3 / 255)
    assert site.masks["image"].all()


def test_subfolders_are_sites_and_rgb_keeps_three_channels(tmp_path):
    src = tmp_path / "hospitals"
    for site in ("ward-a", "ward b"):
        for cls in ("x", "y"):
            for r in range(2):
                write_image(src / site / cls / f"{r}.png", 10 * r, mode="RGB")
    dirs = import_class_folders(src, tmp_path / "out", sites_from="subfolders",
                                image=ImageSettings(size=(8, 8), channels=3), image_name="photo")
    assert sorted(d.name for d in dirs) == ["ward-a", "ward_b"]  # folder-safe names
    for d in dirs:
        site = load_site(d)
        assert set(site.specs) == {"photo"} and site.specs["photo"].shape == (3, 8, 8)
    assert load_site(tmp_path / "out" / "ward_b").site_id == "ward b"


def test_images_of_different_sizes_without_resize_name_the_files(tmp_path):
    write_image(tmp_path / "src" / "a" / "big.png", 0, size=(20, 20))
    write_image(tmp_path / "src" / "a" / "small.png", 0, size=(10, 10))
    with pytest.raises(SiteDataError, match=r"small\.png.*images differ in size.*--image-size"):
        import_class_folders(tmp_path / "src", tmp_path / "out", image=ImageSettings(size=None))
    assert not (tmp_path / "out" / "src").exists()


def test_an_unreadable_image_and_an_empty_class_folder_are_named(tmp_path):
    src = tmp_path / "src"
    write_image(src / "a" / "ok.png", 0)
    (src / "a" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(SiteDataError, match=r"broken\.png: not a readable image"):
        import_class_folders(src, tmp_path / "out")
    (src / "a" / "broken.png").unlink()
    (src / "empty").mkdir()
    with pytest.raises(SiteDataError, match=r"empty: class folder holds no PNG, JPEG or WAV file"):
        import_class_folders(src, tmp_path / "out")


def test_an_existing_site_is_not_overwritten_unless_asked(tmp_path):
    write_image(tmp_path / "src" / "a" / "0.png", 0)
    write_image(tmp_path / "src" / "a" / "1.png", 0)
    import_class_folders(tmp_path / "src", tmp_path / "out")
    with pytest.raises(SiteDataError, match="refusing to overwrite"):
        import_class_folders(tmp_path / "src", tmp_path / "out")
    import_class_folders(tmp_path / "src", tmp_path / "out", overwrite=True)


# --------------------------------------------------------------------------- audio


@pytest.mark.parametrize("width", [2, 3])
def test_read_wav_returns_the_written_samples_as_mono(tmp_path, width):
    x = tone(440, rate=8000, n=800)
    write_wav(tmp_path / "a.wav", x, rate=8000, width=width, channels=2 if width == 2 else 1)
    y, rate = read_wav(tmp_path / "a.wav")
    assert rate == 8000 and y.dtype == np.float32 and y.shape == x.shape
    np.testing.assert_allclose(y, x, atol=2.0 / (1 << (8 * width - 1)))


def test_default_spectrogram_is_the_builtin_audio_transform():
    """A 1,056-sample clip at 8 kHz: exactly the procedural benchmark's log |STFT| (n_fft 64, hop 32)."""
    x = np.random.default_rng(0).standard_normal(1056).astype(np.float32) * 0.3
    got = log_spectrogram(x, rate=8000, settings=SpectrogramSettings())
    assert got.shape == PROCEDURAL_SCHEMA["audio"].shape
    want = torch.log(torch.stft(torch.from_numpy(x), 64, hop_length=32, window=torch.hann_window(64),
                                center=False, return_complex=True).abs() + 0.05)
    np.testing.assert_allclose(got[0], want.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rate", [8000, 16000, 11025])
def test_a_tone_peaks_at_its_frequency_bin_whatever_the_file_rate(rate):
    """Resampled to 8 kHz, a 1 kHz tone is brightest in bin 1000 / 8000 * 64 = 8, in every frame."""
    x = tone(1000, rate=rate, n=rate // 2)
    settings = SpectrogramSettings(frames=16)
    spec = log_spectrogram(x, rate=rate, settings=settings)
    assert spec.shape == (1, 33, 16)
    assert (spec[0].argmax(axis=0) == 8).all()


def test_clip_seconds_crops_and_pads():
    settings = SpectrogramSettings(clip_seconds=0.25, frames=8)
    long = np.concatenate([tone(500, rate=8000, n=2000), tone(3000, rate=8000, n=6000)])
    spec = log_spectrogram(long, rate=8000, settings=settings)  # only the first 0.25 s: the 500 Hz part
    assert (spec[0].argmax(axis=0) == 4).all()
    short = log_spectrogram(tone(500, rate=8000, n=300), rate=8000, settings=settings)
    assert short.shape == (1, 33, 8) and np.isfinite(short).all()


def test_images_and_wavs_sharing_a_stem_are_one_record(tmp_path):
    src = tmp_path / "clinic"
    freqs = {"low": 500, "high": 2500}
    for cls, f in freqs.items():
        for r in range(3):
            write_image(src / cls / f"rec{r}.png", 50)
            if r < 2:  # rec2 has no audio
                write_wav(src / cls / f"rec{r}.wav", tone(f, rate=8000, n=2000), rate=8000)
        write_wav(src / cls / "voice-only.wav", tone(f, rate=8000, n=2000), rate=8000)
    calls = []
    (site_dir,) = import_class_folders(src, tmp_path / "out", audio_name="voice",
                                       progress=lambda done, total, what: calls.append((done, total, what)))
    site = load_site(site_dir)
    assert set(site.specs) == {"image", "voice"}
    assert site.specs["voice"].kind == "spectrogram" and site.specs["voice"].shape == (1, 33, 32)
    assert site.num_records == 8  # 3 image records + 1 audio-only, per class
    assert calls[-1] == (8, 8, "clinic") and [c[0] for c in calls] == list(range(1, 9))
    # rec2 lacks audio, voice-only lacks the image; the rest have both.
    assert site.masks["voice"].sum() == 6 and site.masks["image"].sum() == 6
    assert (site.masks["voice"] | site.masks["image"]).all()
    for label, cls in enumerate(site.class_names):
        rows = (site.labels == label) & site.masks["voice"]
        peak = site.arrays["voice"][rows][:, 0].mean(axis=-1).argmax(axis=-1)
        assert (peak == round(freqs[cls] / 8000 * 64)).all()
        assert not site.arrays["voice"][(site.labels == label) & ~site.masks["voice"]].any()  # zeros


# --------------------------------------------------------------------------- arrays


def test_arrays_with_a_site_column_become_one_site_per_value(tmp_path):
    rng = np.random.default_rng(0)
    n = 24
    np.save(tmp_path / "x.npy", rng.random((n, 10, 12)).astype(np.float64))  # [n, H, W]: a channel is added
    np.save(tmp_path / "ecg.npy", rng.standard_normal((n, 2, 30)))  # [n, C, L]: a series
    np.save(tmp_path / "words.npy", rng.integers(0, 7, (n, 5)))  # integers [n, L]: tokens
    labels = np.array(["flu", "cold", "covid"] * 8)
    site_ids = np.array([0] * 12 + [1] * 12)
    labels[12:] = np.where(labels[12:] == "covid", "flu", labels[12:])  # site 1 has no covid
    np.save(tmp_path / "y.npy", labels)
    np.save(tmp_path / "site.npy", site_ids)
    has_ecg = rng.random(n) < 0.7
    has_ecg[0] = True
    np.save(tmp_path / "ecg_mask.npy", has_ecg)
    dirs = import_arrays({"scan": tmp_path / "x.npy", "ecg": tmp_path / "ecg.npy", "words": tmp_path / "words.npy"},
                         tmp_path / "y.npy", tmp_path / "out", kinds={"scan": "image"},
                         masks={"ecg": tmp_path / "ecg_mask.npy"}, sites=tmp_path / "site.npy")
    assert [d.name for d in dirs] == ["0", "1"]
    a, b = (load_site(d) for d in dirs)
    assert a.specs["scan"].shape == (1, 10, 12) and a.specs["ecg"].kind == "series"
    assert a.specs["words"].kind == "tokens" and a.specs["words"].vocab_size == 7
    assert a.specs == b.specs  # one schema across the sites
    assert a.class_names == ("cold", "covid", "flu") and b.class_names == ("cold", "flu")
    assert a.num_records == b.num_records == 12
    np.testing.assert_array_equal(a.masks["ecg"], has_ecg[:12])
    for site, rows in ((a, slice(0, 12)), (b, slice(12, 24))):
        np.testing.assert_array_equal(np.array(site.class_names)[site.labels], labels[rows])


def test_arrays_that_disagree_with_the_labels_are_refused_before_writing(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((5, 1, 4, 4), np.float32))
    np.save(tmp_path / "y.npy", np.arange(6))
    with pytest.raises(SiteDataError, match=r"x\.npy: holds 5 records but y\.npy has 6 labels"):
        import_arrays({"image": tmp_path / "x.npy"}, tmp_path / "y.npy", tmp_path / "out")
    np.save(tmp_path / "y.npy", np.arange(5))
    np.save(tmp_path / "v.npy", np.zeros((5, 2, 2, 2, 2), np.float32))
    with pytest.raises(SiteDataError, match=r"cannot tell the kind.*--kind v=KIND"):
        import_arrays({"v": tmp_path / "v.npy"}, tmp_path / "y.npy", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- the command


def test_the_import_command_then_check_site(tmp_path, capsys):
    from simulations.cli import main

    src = tmp_path / "recordings"
    for site in ("north", "south"):
        for cls, f in (("whistle", 1500), ("hum", 300)):
            for r in range(3):
                write_wav(src / site / cls / f"{r}.wav", tone(f, rate=16000, n=4000), rate=16000)
                write_image(src / site / cls / f"{r}.jpg", 90, mode="RGB")
    out = tmp_path / "data" / "train"
    code = main(["import", str(src), "--sites-from", "subfolders", "--out", str(out), "--n-fft", "62",
                 "--frames", "16", "--image-size", "10", "12", "--audio-name", "sound"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert f"{out / 'north'}: 6 records, 2 classes, image [1, 10, 12], sound [1, 32, 16]" in text
    assert main(["check-site", str(out)]) == 0
    assert "2 site(s) checked: 2 ok" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--array", "x=a.npy"], "--array needs --labels FILE"),
        (["--array", "x"], "--array expects NAME=VALUE"),
        ([], "nothing to import"),
        (["src", "--n-fft", "1"], "n_fft >= 2"),
        (["missing-folder"], "missing-folder: no such folder"),
    ],
)
def test_bad_import_arguments_exit_2_with_the_reason(tmp_path, capsys, monkeypatch, args, message):
    from simulations.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "src").mkdir()
    assert main(["import", *args, "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_progress_bar_redraws_on_a_terminal_and_is_silent_elsewhere():
    import io

    from simulations.data_commands import ProgressBar

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term, pipe = Terminal(), io.StringIO()
    for stream in (term, pipe):
        bar = ProgressBar(stream=stream, width=10)
        for done in range(1, 5):
            bar(done, 4, "ward-a")
    frames = term.getvalue().split("\r")[1:]
    assert len(frames) == 4 and frames[1].rstrip().endswith("[#####.....] 2/4")
    assert frames[-1] == f"{'ward-a':<24} [##########] 4/4\n"
    assert pipe.getvalue() == ""


def test_the_example_folders_import_as_the_readme_shows(tmp_path):
    from common.data.site_report import check_site
    from simulations.example_folders import write_example_folders

    clinic, held_out = write_example_folders(tmp_path, records=4)
    sites = import_class_folders(clinic, tmp_path / "data" / "train", sites_from="subfolders")
    (test_site,) = import_class_folders(held_out / "ward-d", tmp_path / "data" / "test")
    assert [s.name for s in sites] == ["ward-a", "ward-b", "ward-c"] and test_site.name == "ward-d"
    report = check_site(sites[0])
    assert report.ok and len(report.class_names) == 6 and report.num_records == 24
    assert {m.name: m.missing_rate for m in report.modalities} == {"image": 0.0, "audio": 0.25}
    assert not set(load_site(test_site).class_names) & set(report.class_names)  # held-out classes
