"""Converters: tiny fixtures in Omniglot's and LEAF FEMNIST's own formats become valid sites."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from common.data import (
    SiteDataError,
    convert_femnist,
    convert_omniglot,
    list_sites,
    load_benchmark_schema,
    load_site,
    sample_episodes,
)

# --------------------------------------------------------------------------- Omniglot


def _draw_character(path, seed):
    """A 105x105 black-on-white PNG with a few strokes, like Omniglot's drawings."""
    rng = np.random.default_rng(seed)
    im = Image.new("L", (105, 105), color=255)
    draw = ImageDraw.Draw(im)
    for _ in range(3):
        x0, y0, x1, y1 = rng.integers(10, 95, 4).tolist()
        draw.line((x0, y0, x1, y1), fill=0, width=4)
    im.save(path)


def _omniglot(root, layout):
    """layout: {split folder: {alphabet: number of characters}}, 3 drawings per character."""
    seed = 0
    for folder, alphabets in layout.items():
        for alphabet, n_chars in alphabets.items():
            for c in range(1, n_chars + 1):
                d = root / folder / alphabet / f"character{c:02d}"
                d.mkdir(parents=True)
                for k in range(3):
                    seed += 1
                    _draw_character(d / f"{1000 + c:04d}_{k + 1:02d}.png", seed)
    return root


def test_convert_omniglot(tmp_path):
    src = _omniglot(
        tmp_path / "omniglot",
        {
            "images_background": {"Greek": 4, "Japanese_(hiragana)": 5},
            "images_evaluation": {"Tengwar": 6},
        },
    )
    paths = convert_omniglot(src, tmp_path / "out")
    assert [p.name for p in paths.train_sites] == ["Greek", "Japanese__hiragana"]
    assert [p.name for p in paths.test_sites] == ["Tengwar"]
    assert load_benchmark_schema(tmp_path / "out") == paths.schema
    assert paths.schema["image"].shape == (1, 28, 28)
    site = load_site(paths.train_sites[1], schema=paths.schema, min_records_per_class=3)
    assert site.site_id == "Japanese_(hiragana)"
    assert site.class_names[0] == "Japanese_(hiragana)/character01" and site.num_classes == 5
    assert site.records_per_class().tolist() == [3] * 5
    x = site.arrays["image"]
    assert x.shape == (15, 1, 28, 28) and x.dtype == np.float32
    assert x.min() >= 0.0 and x.max() <= 1.0
    # Inverted: strokes bright on a dark background.
    assert x.max() > 0.7 and np.median(x) < 0.1 and x[:, :, 0, :].mean() < 0.1
    assert site.provenance["split"] == "images_background"
    ep = sample_episodes(
        site, schema=paths.schema, ways=5, shots=1, query_shots=2, num_episodes=2, generator=torch.Generator().manual_seed(0)
    )
    assert ep["query"]["inputs"]["image"].shape == (2, 10, 1, 28, 28)


def test_convert_omniglot_image_size_and_one_split(tmp_path):
    src = _omniglot(tmp_path / "o", {"images_evaluation": {"Atlantean": 2}})
    paths = convert_omniglot(src, tmp_path / "out", image_size=14)
    assert paths.train_sites == () and len(paths.test_sites) == 1
    assert load_site(paths.test_sites[0]).arrays["image"].shape == (6, 1, 14, 14)


def test_convert_omniglot_errors(tmp_path):
    with pytest.raises(SiteDataError, match="holds neither images_background/ nor images_evaluation/"):
        convert_omniglot(tmp_path, tmp_path / "out")
    src = _omniglot(tmp_path / "o", {"images_background": {"Greek": 2}})
    convert_omniglot(src, tmp_path / "out")
    with pytest.raises(SiteDataError, match="refusing to overwrite"):
        convert_omniglot(src, tmp_path / "out")
    bad = tmp_path / "bad"
    (bad / "images_background" / "Greek" / "character01").mkdir(parents=True)
    (bad / "images_background" / "Greek" / "character01" / "x.png").write_bytes(b"not a png")
    with pytest.raises(SiteDataError, match=r"x\.png: not a readable image"):
        convert_omniglot(bad, tmp_path / "out2")


# --------------------------------------------------------------------------- LEAF FEMNIST


def _writer(rng, n, classes):
    """LEAF style: 784 floats per image, 1.0 background and dark ink."""
    x = np.ones((n, 28, 28), dtype=np.float32)
    for i in range(n):
        r = rng.integers(4, 20)
        x[i, r : r + 6, 6:22] = rng.uniform(0.0, 0.3)
    y = rng.choice(classes, n)
    return {"x": x.reshape(n, 784).round(4).tolist(), "y": [int(v) for v in y]}


def _leaf_file(path, users):
    doc = {
        "users": list(users),
        "num_samples": [len(u["y"]) for u in users.values()],
        "user_data": users,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))


def test_convert_femnist(tmp_path):
    rng = np.random.default_rng(0)
    writers = {f"f{i:04d}_{i % 7:02d}": _writer(rng, 30, [3, 10, 40, 61]) for i in range(6)}
    writers["f9999_00"] = _writer(rng, 5, [1, 2])  # too few samples: skipped
    names = list(writers)
    # LEAF splits each writer's samples across a train and a test file: they are merged back.
    first = {u: {"x": d["x"][:20], "y": d["y"][:20]} for u, d in writers.items()}
    second = {u: {"x": d["x"][20:], "y": d["y"][20:]} for u, d in writers.items() if len(d["y"]) > 20}
    _leaf_file(tmp_path / "leaf" / "train" / "all_data_0.json", first)
    _leaf_file(tmp_path / "leaf" / "test" / "all_data_0.json", second)
    paths = convert_femnist(tmp_path / "leaf", tmp_path / "out", test_fraction=0.34, seed=1, min_records=20)
    train_ids = {load_site(p).site_id for p in paths.train_sites}
    test_ids = {load_site(p).site_id for p in paths.test_sites}
    assert len(train_ids) == 4 and len(test_ids) == 2 and not train_ids & test_ids
    assert train_ids | test_ids == set(names[:6])
    for p in paths.train_sites + paths.test_sites:
        site = load_site(p, schema=paths.schema, min_records_per_class=2)
        assert site.num_records == 30
        original = writers[site.site_id]
        assert set(site.class_names) <= {"3", "A", "e", "z"}
        # Labels relabelled to the writer's own classes, names kept.
        chars = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
        assert sorted(site.class_names[k] for k in site.labels) == sorted(chars[y] for y in original["y"])
        x = site.arrays["image"]
        assert x.shape == (30, 1, 28, 28) and x.dtype == np.float32
        assert x[:, 0, 0, 0].max() == 0.0 and x.max() > 0.6  # inverted: dark background, bright ink
    # The split is a deterministic function of the seed.
    again = convert_femnist(sorted((tmp_path / "leaf").rglob("*.json")), tmp_path / "out2", test_fraction=0.34, seed=1)
    assert {load_site(p).site_id for p in again.test_sites} == test_ids


def test_convert_femnist_drops_rare_classes(tmp_path):
    rng = np.random.default_rng(1)
    w = _writer(rng, 24, [5])
    w["y"][0] = 7  # a single sample of class 7
    _leaf_file(tmp_path / "a.json", {"u1": w})
    paths = convert_femnist([tmp_path / "a.json"], tmp_path / "out", test_fraction=0.0, min_records=10)
    site = load_site(paths.train_sites[0])
    assert site.class_names == ("5",) and site.num_records == 23


def test_convert_femnist_errors(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SiteDataError, match=r"bad\.json: not valid JSON"):
        convert_femnist(tmp_path / "bad.json", tmp_path / "out")
    (tmp_path / "other.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(SiteDataError, match=r"other\.json: not a LEAF file"):
        convert_femnist([tmp_path / "other.json"], tmp_path / "out")
    _leaf_file(tmp_path / "d" / "small.json", {"u": _writer(np.random.default_rng(0), 3, [1])})
    with pytest.raises(SiteDataError, match="no writer has at least 20 samples"):
        convert_femnist(tmp_path / "d", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SiteDataError, match="no .json files found"):
        convert_femnist(tmp_path / "empty", tmp_path / "out3")
    with pytest.raises(SiteDataError, match="no such file"):
        convert_femnist([tmp_path / "missing.json"], tmp_path / "out3")
    assert list_sites(tmp_path / "out" / "train") == []
