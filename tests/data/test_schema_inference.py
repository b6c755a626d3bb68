"""The experiment's schema: a schema file, or inferred from the sites' manifests; sites that disagree."""

from __future__ import annotations

import numpy as np
import pytest

from common.config import ConfigError, load
from common.data import ModalitySpec, SiteDataError, write_site
from common.data.schema_inference import infer_schema, read_schema_file, write_schema_file
from common.task import Task, resolve_schema

AUDIO_32 = ModalitySpec("audio", "spectrogram", (1, 32, 32))
AUDIO_33 = ModalitySpec("audio", "spectrogram", (1, 33, 32))
IMAGE = ModalitySpec("image", "image", (1, 8, 8))


def site(path, specs, *, n_classes=3, per_class=4, seed=0):
    rng = np.random.default_rng(seed)
    n = n_classes * per_class
    return write_site(
        path,
        arrays={m: rng.random((n, *s.shape)).astype(np.float32) for m, s in specs.items()},
        labels=np.repeat(np.arange(n_classes), per_class),
        class_names=[f"c{i}" for i in range(n_classes)],
        specs=specs,
        site_id=path.name,
        provenance={"source": "tests"},
    )


def test_the_schema_is_the_union_of_the_manifests(tmp_path):
    a = site(tmp_path / "train" / "a", {"image": IMAGE, "audio": AUDIO_32})
    b = site(tmp_path / "train" / "b", {"image": IMAGE})  # lacks audio: allowed
    c = site(tmp_path / "test" / "c", {"audio": AUDIO_32})
    assert infer_schema([a, b, c]) == {"audio": AUDIO_32, "image": IMAGE}


def test_sites_that_disagree_give_one_error_naming_them_and_the_difference(tmp_path):
    site(tmp_path / "train" / "a", {"image": IMAGE, "audio": AUDIO_33})
    site(tmp_path / "train" / "b", {"image": IMAGE, "audio": AUDIO_33})
    site(tmp_path / "test" / "c", {"image": ModalitySpec("image", "image", (3, 8, 8)), "audio": AUDIO_32})
    dirs = [tmp_path / "train" / "a", tmp_path / "train" / "b", tmp_path / "test" / "c"]
    with pytest.raises(SiteDataError) as info:
        infer_schema(dirs)
    text = str(info.value)
    assert "train/a, train/b declare shape [1, 33, 32]; test/c declares shape [1, 32, 32]" in text
    assert "'image'" in text and "shape [3, 8, 8]" in text  # both modalities in the one error
    assert "kind" not in text.split("Fix:")[0].replace("'audio'", "")  # only the fields that differ
    assert "Fix:" in text
    # The experiment's schema, found from data.root, fails the same way (before any training).
    config = load(overrides={"data.root": str(tmp_path), "data.generate": False})
    with pytest.raises(SiteDataError, match="the sites disagree on the schema"):
        resolve_schema(config)


def test_resolve_schema_infers_from_data_root_and_builds_that_model(tmp_path):
    site(tmp_path / "train" / "a", {"image": IMAGE, "audio": AUDIO_32})
    site(tmp_path / "test" / "b", {"audio": AUDIO_32})
    config = load(overrides={"data.root": str(tmp_path), "data.generate": False, "episodes.ways": 3,
                             "episodes.query_shots": 2, "model.hidden": 4, "model.embed_dim": 8})
    assert resolve_schema(config) == {"audio": AUDIO_32, "image": IMAGE}
    task = Task(config, device="cpu")
    assert task.model.modalities == ("audio", "image")
    assert task.load_site(tmp_path / "train" / "a").num_records == 12  # the site fits the model
    # data.modalities other than its default picks among the sites' modalities ...
    only_audio = load(overrides={"data.root": str(tmp_path), "data.generate": False, "data.modalities": "audio"})
    assert resolve_schema(only_audio) == {"audio": AUDIO_32}
    # ... and cannot name one they lack.
    wrong = load(overrides={"data.root": str(tmp_path), "data.generate": False, "data.modalities": "series"})
    with pytest.raises(ConfigError, match=r"data.modalities names \['series'\].*known: \['audio', 'image'\]"):
        resolve_schema(wrong)


def test_a_schema_file_wins_over_the_manifests(tmp_path):
    site(tmp_path / "train" / "a", {"audio": AUDIO_32})
    path = write_schema_file(tmp_path / "schema.yaml", {"audio": AUDIO_32, "image": IMAGE})
    assert read_schema_file(path) == {"audio": AUDIO_32, "image": IMAGE}
    config = load(overrides={"data.root": str(tmp_path), "data.generate": False, "data.schema_file": str(path),
                             "data.modalities": "audio,image"})
    assert resolve_schema(config) == {"audio": AUDIO_32, "image": IMAGE}
    (tmp_path / "bad.yaml").write_text("audio: {kind: spectrogram}\n")
    bad = load(overrides={"data.schema_file": str(tmp_path / "bad.yaml"), "data.modalities": "audio"})
    with pytest.raises(ConfigError, match=r"bad\.yaml: not a valid modality schema.*Fix:"):
        resolve_schema(bad)
    missing = load(overrides={"data.schema_file": str(tmp_path / "none.yaml")})
    with pytest.raises(ConfigError, match=r"none\.yaml: no such schema file"):
        resolve_schema(missing)


def test_without_sites_the_builtin_schema_is_used(tmp_path):
    from common.data import PROCEDURAL_SCHEMA

    config = load(overrides={"data.root": str(tmp_path / "empty"), "data.generate": True})
    assert resolve_schema(config) == {m: PROCEDURAL_SCHEMA[m] for m in ("image", "audio", "series")}
