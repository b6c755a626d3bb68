"""The procedural benchmark: layout, determinism, missing data, reuse, and how hard it is.

``pytest tests/data/test_procedural.py -s`` prints the 1-nearest-neighbour
accuracy on raw inputs (5-way 1-shot, held-out sites) per modality and fused.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import yaml

from common.config import ConfigError, DataConfig
from common.evaluation import only_modality, raw_nearest_neighbour
from common.data import (
    PROCEDURAL_SCHEMA,
    SiteDataError,
    ensure_benchmark,
    generate_benchmark,
    list_sites,
    load_benchmark_schema,
    load_site,
    sample_episodes,
    write_site,
)


def test_schema():
    assert PROCEDURAL_SCHEMA["image"].kind == "image" and PROCEDURAL_SCHEMA["image"].shape == (1, 28, 28)
    assert PROCEDURAL_SCHEMA["audio"].kind == "spectrogram" and PROCEDURAL_SCHEMA["audio"].shape == (1, 33, 32)
    assert PROCEDURAL_SCHEMA["series"].kind == "series" and PROCEDURAL_SCHEMA["series"].shape == (3, 64)
    assert PROCEDURAL_SCHEMA["tokens"].kind == "tokens" and PROCEDURAL_SCHEMA["tokens"].vocab_size > 1
    assert DataConfig().num_classes >= 1000 and set(DataConfig().modalities) <= set(PROCEDURAL_SCHEMA)


def test_layout_and_validation(small_benchmark, small_config):
    paths = small_benchmark
    assert len(paths.train_sites) == small_config.num_train_sites
    assert len(paths.test_sites) == small_config.num_test_sites
    assert [p.name for p in paths.train_sites] == [f"site-{i:04d}" for i in range(small_config.num_train_sites)]
    assert paths.schema == {m: PROCEDURAL_SCHEMA[m] for m in small_config.modalities}
    assert load_benchmark_schema(paths.root) == paths.schema
    doc = yaml.safe_load((paths.root / "benchmark.yaml").read_text())
    assert doc["settings"]["num_classes"] == small_config.num_classes
    assert doc["settings"]["modalities"] == list(small_config.modalities)
    for site_dir in paths.train_sites + paths.test_sites:
        site = load_site(site_dir, schema=paths.schema, min_records_per_class=small_config.records_per_class)
        assert site.num_records == small_config.classes_per_site * small_config.records_per_class
        assert site.records_per_class().tolist() == [small_config.records_per_class] * small_config.classes_per_site
        assert site.provenance["generator"] == "metafed.procedural"
        for name, arr in site.arrays.items():
            assert np.isfinite(arr).all()
            assert arr.std() > 0


def test_train_and_test_classes_are_disjoint(small_benchmark):
    train = {c for p in small_benchmark.train_sites for c in load_site(p).class_names}
    test = {c for p in small_benchmark.test_sites for c in load_site(p).class_names}
    assert train and test and not train & test
    ids = sorted(int(c.split("-")[1]) for c in train)
    assert max(ids) < min(int(c.split("-")[1]) for c in test)


def test_missing_modalities(small_benchmark, small_config):
    """FedMultimodal-style: some sites lack modalities, some records too; never all of them."""
    sites = [load_site(p) for p in small_benchmark.train_sites + small_benchmark.test_sites]
    all_mods = set(small_config.modalities)
    site_missing = sum(len(all_mods - set(s.arrays)) for s in sites)
    record_missing = 0
    for s in sites:
        assert s.arrays  # never all modalities missing at a site
        present = np.zeros(s.num_records, dtype=bool)
        for m in s.arrays:
            present |= s.masks[m]
            record_missing += int((~s.masks[m]).sum())
            assert not s.arrays[m][~s.masks[m]].any()
        assert present.all()  # never all modalities missing in a record
    assert site_missing > 0 and record_missing > 0


def test_degraded_modalities_never_cover_a_whole_site(small_benchmark):
    for p in small_benchmark.train_sites + small_benchmark.test_sites:
        style = load_site(p).provenance["style"]
        assert not all(v["degraded"] for v in style.values())


def test_deterministic_from_seed(tmp_path, small_config):
    cfg = dataclasses.replace(small_config, num_train_sites=2, num_test_sites=1, modalities=("image", "audio", "series", "tokens"))
    a = generate_benchmark(tmp_path / "a", config=cfg)
    b = generate_benchmark(tmp_path / "b", config=cfg)
    c = generate_benchmark(tmp_path / "c", config=dataclasses.replace(cfg, seed=1))
    for pa, pb, pc in zip(a.train_sites + a.test_sites, b.train_sites + b.test_sites, c.train_sites + c.test_sites):
        sa, sb, sc = load_site(pa), load_site(pb), load_site(pc)
        assert sa.class_names == sb.class_names
        np.testing.assert_array_equal(sa.labels, sb.labels)
        assert set(sa.arrays) == set(sb.arrays)
        for m in sa.arrays:
            np.testing.assert_array_equal(sa.arrays[m], sb.arrays[m])
            np.testing.assert_array_equal(sa.masks[m], sb.masks[m])
        common = set(sa.arrays) & set(sc.arrays)
        assert any(not np.array_equal(sa.arrays[m], sc.arrays[m]) for m in common) or sa.class_names != sc.class_names
    # A site does not depend on how many sites are generated.
    d = generate_benchmark(tmp_path / "d", config=dataclasses.replace(cfg, num_train_sites=1))
    np.testing.assert_array_equal(load_site(d.train_sites[0]).labels, load_site(a.train_sites[0]).labels)
    tokens = load_site(a.train_sites[0]).arrays.get("tokens")
    if tokens is not None:
        assert tokens.dtype == np.int64 and tokens.min() >= 0 and tokens.max() < PROCEDURAL_SCHEMA["tokens"].vocab_size


def test_reuse_and_refusal(tmp_path, small_config):
    cfg = dataclasses.replace(small_config, num_train_sites=1, num_test_sites=1)
    root = tmp_path / "bench"
    first = generate_benchmark(root, config=cfg)
    def stamps() -> dict[str, int]:
        return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}

    before = stamps()
    again = generate_benchmark(root, config=cfg)
    assert again == first and stamps() == before  # reused: no file written again
    with pytest.raises(SiteDataError, match=r"generated with other settings \(seed: 0 there, 7 asked\).*never overwritten") as info:
        generate_benchmark(root, config=dataclasses.replace(cfg, seed=7))
    assert "Fix:" in str(info.value)
    # A folder holding other files is never written into.
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(SiteDataError, match="holds files but no benchmark.yaml"):
        generate_benchmark(other, config=cfg)
    assert [p.name for p in other.iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench", "other"]  # no temporary folders left


def test_ensure_benchmark(tmp_path, small_config, site_kwargs):
    cfg = dataclasses.replace(small_config, root=str(tmp_path / "gen"), num_train_sites=1, num_test_sites=1)
    with pytest.raises(SiteDataError, match="data.generate is false"):
        ensure_benchmark(dataclasses.replace(cfg, generate=False))
    paths = ensure_benchmark(cfg)
    assert len(paths.train_sites) == 1 and ensure_benchmark(cfg) == paths
    with pytest.raises(SiteDataError, match="other settings"):
        ensure_benchmark(dataclasses.replace(cfg, records_per_class=4))
    # Sites a user put there are used as they are, with the schema their manifests declare.
    user = tmp_path / "user"
    write_site(user / "train" / "hospital-a", **site_kwargs())
    paths = ensure_benchmark(dataclasses.replace(cfg, root=str(user)))
    assert paths.train_sites == (user / "train" / "hospital-a",) and paths.test_sites == ()
    assert set(paths.schema) == {"image", "series", "tokens"}


def test_config_errors(tmp_path, small_config):
    with pytest.raises(ConfigError, match="exceeds the 12 test classes"):
        generate_benchmark(tmp_path / "x", config=dataclasses.replace(small_config, classes_per_site=13))
    with pytest.raises(ConfigError, match="pick one or more"):
        generate_benchmark(tmp_path / "x", config=dataclasses.replace(small_config, modalities=("video",)))
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- difficulty


def one_nn_accuracy(sites, schema, *, episodes_per_site=60, seed=0) -> dict[str, float]:
    """1-NN on raw inputs (:func:`raw_nearest_neighbour`), 5-way 1-shot, 5 queries per class.

    Per modality: that modality alone, over the queries that have it. Fused:
    every modality, over all queries. Pooled over the queries of all sites.
    """
    g = torch.Generator().manual_seed(seed)
    hits: dict[str, float] = {}
    total: dict[str, float] = {}

    def add(name, episodes):
        weights = episodes["query"]["weights"].double()
        hits[name] = hits.get(name, 0.0) + float((raw_nearest_neighbour(episodes, schema=schema) * weights.sum(-1)).sum())
        total[name] = total.get(name, 0.0) + float(weights.sum())

    for site in sites:
        episodes = sample_episodes(site, schema=schema, ways=5, shots=1, query_shots=5,
                                   num_episodes=episodes_per_site, generator=g)
        for m in schema:
            if m in site.arrays:
                alone = only_modality(episodes, m, tuple(schema))
                query = alone["query"]
                alone["query"] = {**query, "weights": query["weights"] * query["masks"][m].to(query["weights"].dtype)}
                add(m, alone)
        add("fused", episodes)
    return {m: hits[m] / total[m] for m in hits if total[m]}


def test_one_nearest_neighbour_is_well_above_chance_but_far_from_solved(small_benchmark):
    sites = [load_site(p, schema=small_benchmark.schema) for p in small_benchmark.test_sites]
    acc = one_nn_accuracy(sites, small_benchmark.schema)
    print("\n1-NN on raw inputs, 5-way 1-shot, held-out sites: " + ", ".join(f"{m} {a:.3f}" for m, a in acc.items()))
    for m, a in acc.items():
        assert 0.3 < a < 0.75, (m, a)  # learnable (chance is 0.2), not trivial
    single = max(a for m, a in acc.items() if m != "fused")
    assert acc["fused"] > single + 0.02  # site noise makes every single modality unreliable somewhere


# --------------------------------------------------------------------------- raw 1-NN in every report


def _episodes(benchmark, *, num_episodes=8, seed=3):
    site = load_site(benchmark.test_sites[0], schema=benchmark.schema)
    return sample_episodes(site, schema=benchmark.schema, ways=5, shots=1, query_shots=3,
                           num_episodes=num_episodes, generator=torch.Generator().manual_seed(seed))


def _nearest_neighbour_loop(episodes, schema) -> list[float]:
    """One query and one support record at a time: the reference for the batched version."""
    out = []
    s_all, q_all = episodes["support"], episodes["query"]
    for e in range(s_all["labels"].shape[0]):
        hits = 0
        for qi in range(q_all["labels"].shape[1]):
            best, label = float("inf"), None
            for si in range(s_all["labels"].shape[1]):
                parts = []
                for m, spec in schema.items():
                    if not (q_all["masks"][m][e, qi] and s_all["masks"][m][e, si]):
                        continue
                    a, b = q_all["inputs"][m][e, qi], s_all["inputs"][m][e, si]
                    if spec.kind == "tokens":
                        a, b = (torch.nn.functional.one_hot(t, spec.vocab_size) for t in (a, b))
                    a, b = (t.flatten().double() for t in (a, b))
                    a, b = ((t - t.mean()) / ((t - t.mean()).norm() + 1e-8) for t in (a, b))
                    parts.append(float(((a - b) ** 2).sum()))
                if parts and sum(parts) / len(parts) < best:
                    best, label = sum(parts) / len(parts), int(s_all["labels"][e, si])
            hits += label == int(q_all["labels"][e, qi])
        out.append(hits / q_all["labels"].shape[1])
    return out


def test_raw_nearest_neighbour_equals_a_per_record_loop(small_benchmark):
    episodes = _episodes(small_benchmark)
    batched = raw_nearest_neighbour(episodes, schema=small_benchmark.schema)
    assert batched.tolist() == pytest.approx(_nearest_neighbour_loop(episodes, small_benchmark.schema), abs=1e-12)


def test_raw_nearest_neighbour_ignores_level_and_padding(small_benchmark):
    schema = small_benchmark.schema
    episodes = _episodes(small_benchmark)
    support = episodes["support"]
    # Queries that are the support records themselves, at another gain and offset: all right.
    copies = {**support, "inputs": {m: (3.0 * x + 5.0 if x.is_floating_point() else x) for m, x in support["inputs"].items()}}
    assert raw_nearest_neighbour({"support": support, "query": copies}, schema=schema).tolist() == [1.0] * 8
    # A padded support record (weight 0) is never the nearest, even when it is
    # the query itself under a wrong label.
    g = torch.Generator().manual_seed(0)
    query = {k: ({m: x[:, :1] for m, x in v.items()} if isinstance(v, dict) else v[:, :1]) for k, v in support.items()}
    query["inputs"] = {m: (x + 0.01 * torch.randn(x.shape, generator=g) if x.is_floating_point() else x)
                       for m, x in query["inputs"].items()}
    padded_support = {
        "inputs": {m: torch.cat([x, query["inputs"][m]], dim=1) for m, x in support["inputs"].items()},
        "masks": {m: torch.cat([x, x[:, :1]], dim=1) for m, x in support["masks"].items()},
        "labels": torch.cat([support["labels"], (support["labels"][:, :1] + 1) % 5], dim=1),
        "weights": torch.cat([support["weights"], torch.zeros_like(support["weights"][:, :1])], dim=1),
    }
    assert raw_nearest_neighbour({"support": padded_support, "query": query}, schema=schema).tolist() == [1.0] * 8


# --------------------------------------------------------------------------- interference


@pytest.fixture
def interfered_benchmark(tmp_path, small_config):
    return generate_benchmark(tmp_path / "interfered", config=dataclasses.replace(small_config, interference=1.0))


def _residual_after_quadratic(image: np.ndarray) -> float:
    """Largest residual of the least-squares fit of ``1, x, y, x^2 + y^2`` to a 2-D array."""
    size = image.shape[-1]
    y, x = np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij")
    basis = np.stack([np.ones_like(x), x, y, x**2 + y**2], axis=-1).reshape(-1, 4)
    coef, *_ = np.linalg.lstsq(basis, image.reshape(-1), rcond=None)
    return float(np.abs(basis @ coef - image.reshape(-1)).max())


def test_interference_adds_only_a_smooth_term_of_its_own(small_benchmark, interfered_benchmark):
    for plain_path, noisy_path in zip(small_benchmark.test_sites, interfered_benchmark.test_sites):
        plain = load_site(plain_path, schema=small_benchmark.schema)
        noisy = load_site(noisy_path, schema=interfered_benchmark.schema)
        assert np.array_equal(plain.labels, noisy.labels) and plain.class_names == noisy.class_names
        assert plain.masks.keys() == noisy.masks.keys()
        assert all(np.array_equal(plain.masks[m], noisy.masks[m]) for m in plain.masks)
        for m, before in plain.arrays.items():
            term = noisy.arrays[m].astype(np.float64) - before
            scale = np.abs(term).max()
            assert scale > 0.1, m  # large next to the signal (records are roughly unit scale)
            if m == "image":  # an illumination ramp: a quadratic over the canvas
                assert max(_residual_after_quadratic(t[0]) for t in term) < 1e-4 * scale
            elif m == "audio":  # a colouring of the spectrum: the same in every frame
                assert np.abs(term - term[..., :1]).max() < 1e-5 * scale
            elif m == "series":  # slow wander: tiny second differences
                assert np.abs(np.diff(term, n=2, axis=-1)).max() < 0.05 * scale


def test_interference_defeats_raw_nearest_neighbour(small_benchmark, interfered_benchmark):
    plain = one_nn_accuracy([load_site(p, schema=small_benchmark.schema) for p in small_benchmark.test_sites],
                            small_benchmark.schema)
    noisy = one_nn_accuracy([load_site(p, schema=interfered_benchmark.schema) for p in interfered_benchmark.test_sites],
                            interfered_benchmark.schema)
    print(f"\n1-NN fused: {plain['fused']:.3f} without interference, {noisy['fused']:.3f} with it")
    assert noisy["fused"] < plain["fused"] - 0.15
    assert noisy["fused"] < 0.2 + 0.1  # near chance


def test_interference_setting_is_checked_and_recorded_only_when_used(tmp_path, small_config):
    cfg = dataclasses.replace(small_config, num_train_sites=1, num_test_sites=1)
    with pytest.raises(ConfigError, match=r"data.interference must be a finite number >= 0"):
        generate_benchmark(tmp_path / "bad", config=dataclasses.replace(cfg, interference=-1.0))
    root = tmp_path / "bench"
    generate_benchmark(root, config=cfg)
    # Benchmarks written before the setting existed have no such key: they still match.
    assert "interference" not in yaml.safe_load((root / "benchmark.yaml").read_text())["settings"]
    with pytest.raises(SiteDataError, match=r"interference: None there, 1.0 asked"):
        generate_benchmark(root, config=dataclasses.replace(cfg, interference=1.0))
