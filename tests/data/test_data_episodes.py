"""Episode samplers: layout, disjointness, balance, determinism, masks and Poisson sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.data import ModalitySpec, SiteDataError, load_site, sample_episodes, sample_poisson_episodes, write_site

# "ident" carries each record's index, so tests can tell which records an episode holds.
IDENT = ModalitySpec("ident", "series", (1, 1))
IMAGE = ModalitySpec("image", "image", (1, 3, 3))
TOKENS = ModalitySpec("tokens", "tokens", (2,), "int64", 7)
AUDIO = ModalitySpec("audio", "spectrogram", (1, 2, 2))  # in the schema, absent from the site
SCHEMA = {"ident": IDENT, "image": IMAGE, "tokens": TOKENS, "audio": AUDIO}


def _site(tmp_path, counts=(6, 6, 6, 6, 6, 6, 2), image_missing=(), name="s"):
    labels = np.concatenate([np.full(c, k) for k, c in enumerate(counts)]).astype(np.int64)
    n = len(labels)
    rng = np.random.default_rng(0)
    labels = labels[rng.permutation(n)]
    mask = np.ones(n, dtype=bool)
    mask[list(image_missing)] = False
    write_site(
        tmp_path / name,
        arrays={
            "ident": np.arange(n, dtype=np.float32).reshape(n, 1, 1),
            "image": rng.random((n, 1, 3, 3), dtype=np.float32) + 1.0,
            "tokens": rng.integers(0, 7, (n, 2)),
        },
        labels=labels,
        class_names=[f"c{k}" for k in range(len(counts))],
        masks={"image": mask},
        specs={"ident": IDENT, "image": IMAGE, "tokens": TOKENS},
        site_id=name,
        provenance={"generator": "tests"},
    )
    return load_site(tmp_path / name, schema=SCHEMA)


def _ids(batch) -> np.ndarray:
    return batch["inputs"]["ident"][..., 0, 0].numpy().astype(np.int64)


def test_layout_shapes_and_dtypes(tmp_path):
    site = _site(tmp_path)
    e, ways, shots, q = 3, 5, 2, 3
    ep = sample_episodes(
        site, schema=SCHEMA, ways=ways, shots=shots, query_shots=q, num_episodes=e, generator=torch.Generator().manual_seed(0)
    )
    for part, b in (("support", ways * shots), ("query", ways * q)):
        batch = ep[part]
        assert set(batch) == {"inputs", "masks", "labels", "weights"}
        assert set(batch["inputs"]) == set(SCHEMA) == set(batch["masks"])
        for name, spec in SCHEMA.items():
            x = batch["inputs"][name]
            assert x.shape == (e, b, *spec.shape)
            assert x.dtype == (torch.int64 if spec.kind == "tokens" else torch.float32)
            assert batch["masks"][name].shape == (e, b) and batch["masks"][name].dtype == torch.bool
        assert batch["labels"].shape == (e, b) and batch["labels"].dtype == torch.int64
        assert batch["weights"].shape == (e, b) and batch["weights"].dtype == torch.float32
        assert (batch["weights"] == 1).all()
        # The site has no audio: zeros, mask False. It has ident and image everywhere.
        assert not batch["inputs"]["audio"].any() and not batch["masks"]["audio"].any()
        assert batch["masks"]["ident"].all() and batch["masks"]["image"].all()
    ep64 = sample_episodes(
        site, schema=SCHEMA, ways=2, shots=1, query_shots=1, num_episodes=1,
        generator=torch.Generator().manual_seed(0), dtype=torch.float64,
    )
    assert ep64["support"]["inputs"]["image"].dtype == torch.float64
    assert ep64["support"]["weights"].dtype == torch.float64
    assert ep64["support"]["inputs"]["tokens"].dtype == torch.int64


def test_disjoint_balanced_and_consistently_relabelled(tmp_path):
    site = _site(tmp_path)
    shots, q, ways = 2, 3, 5
    ep = sample_episodes(
        site, schema=SCHEMA, ways=ways, shots=shots, query_shots=q, num_episodes=50, generator=torch.Generator().manual_seed(1)
    )
    s_ids, q_ids = _ids(ep["support"]), _ids(ep["query"])
    s_lab, q_lab = ep["support"]["labels"].numpy(), ep["query"]["labels"].numpy()
    first_class = []
    for i in range(50):
        assert len(set(s_ids[i]) | set(q_ids[i])) == ways * (shots + q)  # no record twice
        assert np.bincount(s_lab[i], minlength=ways).tolist() == [shots] * ways
        assert np.bincount(q_lab[i], minlength=ways).tolist() == [q] * ways
        # One episode label <-> one site class, the same in support and query.
        mapping = {}
        for ids, labs in ((s_ids[i], s_lab[i]), (q_ids[i], q_lab[i])):
            for rec, lab in zip(ids, labs):
                assert mapping.setdefault(int(lab), int(site.labels[rec])) == site.labels[rec]
        assert len(set(mapping.values())) == ways
        assert 6 not in mapping.values()  # class c6 has 2 records: not eligible for 2 + 3
        first_class.append(mapping[0])
    assert len(set(first_class)) > 3  # the class order is random


def test_determinism(tmp_path):
    site = _site(tmp_path)

    def draw(seed):
        return sample_episodes(
            site, schema=SCHEMA, ways=3, shots=1, query_shots=2, num_episodes=4, generator=torch.Generator().manual_seed(seed)
        )

    a, b, c = draw(5), draw(5), draw(6)
    for part in ("support", "query"):
        assert torch.equal(a[part]["inputs"]["ident"], b[part]["inputs"]["ident"])
        assert torch.equal(a[part]["labels"], b[part]["labels"])
    assert not torch.equal(a["query"]["inputs"]["ident"], c["query"]["inputs"]["ident"])


def test_masks_reflect_missing_records(tmp_path):
    missing = (0, 3, 4, 10, 11, 20)
    site = _site(tmp_path, image_missing=missing)
    ep = sample_episodes(
        site, schema=SCHEMA, ways=5, shots=2, query_shots=2, num_episodes=20, generator=torch.Generator().manual_seed(2)
    )
    for part in ("support", "query"):
        ids = _ids(ep[part])
        mask = ep[part]["masks"]["image"].numpy()
        np.testing.assert_array_equal(mask, ~np.isin(ids, missing))
        images = ep[part]["inputs"]["image"].numpy()
        assert not images[~mask].any() and (images[mask] >= 1.0).all()
    assert not ep["support"]["masks"]["image"].numpy().all()  # some missing record was drawn


def test_not_enough_eligible_classes(tmp_path):
    site = _site(tmp_path)
    with pytest.raises(SiteDataError, match=r"only 6 of its 7 classes have at least shots \+ query_shots = 1 \+ 5 = 6") as info:
        sample_episodes(site, schema=SCHEMA, ways=7, shots=1, query_shots=5, num_episodes=1, generator=torch.Generator())
    assert "Fix:" in str(info.value) and "needs 7" in str(info.value)


def test_schema_mismatch_is_an_error(tmp_path):
    site = _site(tmp_path)
    other = dict(SCHEMA, image=ModalitySpec("image", "image", (1, 4, 4)))
    with pytest.raises(SiteDataError, match="schema expects"):
        sample_episodes(site, schema=other, ways=2, shots=1, query_shots=1, num_episodes=1, generator=torch.Generator())


# --------------------------------------------------------------------------- Poisson sampling


def _poisson(site, seed=0, **kw):
    args = dict(schema=SCHEMA, ways=5, sample_rate=0.5, query_shots=2, num_episodes=8)
    args.update(kw)
    return sample_poisson_episodes(site, generator=torch.Generator().manual_seed(seed), **args)


def test_poisson_layout_and_padding(tmp_path):
    site = _site(tmp_path)
    batch, info = _poisson(site)
    s, q = batch["support"], batch["query"]
    e = 8
    length = s["labels"].shape[1]
    assert length >= 1
    for name, spec in SCHEMA.items():
        assert s["inputs"][name].shape == (e, length, *spec.shape)
        assert q["inputs"][name].shape == (e, 5 * 2, *spec.shape)
    sizes = info["support_size"]
    assert sizes.dtype == torch.int64 and sizes.shape == (e,)
    assert length == max(1, int(sizes.max()))
    assert torch.equal(s["weights"].sum(1).long(), sizes)
    pad = s["weights"] == 0
    assert torch.equal(pad, torch.arange(length)[None, :] >= sizes[:, None])  # padding at the end
    assert (s["labels"][pad] == 0).all()
    for name in SCHEMA:
        assert not s["masks"][name][pad].any()
        assert not s["inputs"][name][pad].any()
    # Support and query of an episode never share a record; labels are episode labels.
    s_ids, q_ids = _ids(s), _ids(q)
    for i in range(e):
        real = s_ids[i][~pad[i].numpy()]
        assert len(set(real)) == len(real) and not set(real) & set(q_ids[i][q["weights"][i].numpy() > 0])
    assert s["labels"].max() < 5 and q["labels"].max() < 5


def test_poisson_expected_size_and_small_classes(tmp_path):
    # Class c6 has 2 records: with query_shots=3 its query is 2 real records and 1 padding,
    # and it never contributes support candidates.
    site = _site(tmp_path)
    batch, info = _poisson(site, ways=7, query_shots=3, num_episodes=4, sample_rate=0.25)
    counts = site.records_per_class()
    candidates = np.maximum(counts - 3, 0).sum()  # all 7 classes are chosen
    assert torch.allclose(info["expected_support_size"], torch.full((4,), 0.25 * candidates))
    q = batch["query"]
    assert int(q["weights"].sum()) == 4 * (6 * 3 + 2)
    assert (q["labels"][q["weights"] == 0] == 0).all()
    assert not q["masks"]["ident"][q["weights"] == 0].any()


def test_poisson_empty_support_is_representable(tmp_path):
    site = _site(tmp_path)
    batch, info = _poisson(site, sample_rate=0.0)
    assert batch["support"]["labels"].shape == (8, 1)
    assert (batch["support"]["weights"] == 0).all()
    assert (info["support_size"] == 0).all() and (info["expected_support_size"] == 0).all()
    assert not any(m.any() for m in batch["support"]["masks"].values())


def test_poisson_inclusion_frequency(tmp_path):
    """Each candidate record joins the support with probability sample_rate, independently."""
    counts = (10, 10, 10, 10, 10)
    site = _site(tmp_path, counts=counts)
    rate, q, e = 0.3, 2, 2000
    batch, info = _poisson(site, sample_rate=rate, query_shots=q, num_episodes=e, seed=3)
    n = sum(counts)
    in_support = np.zeros((e, n), dtype=bool)
    in_query = np.zeros((e, n), dtype=bool)
    s_ids, s_w = _ids(batch["support"]), batch["support"]["weights"].numpy() > 0
    q_ids = _ids(batch["query"])
    for i in range(e):
        in_support[i, s_ids[i][s_w[i]]] = True
        in_query[i, q_ids[i]] = True
    assert not (in_support & in_query).any()
    candidate = ~in_query
    # Per record: P(in support | not in query) = rate (5 classes, all chosen: ways = 5).
    cond = in_support.sum(0) / candidate.sum(0)
    assert np.all(np.abs(cond - rate) < 0.05), cond
    assert abs(in_support.mean() - rate * (1 - q / 10)) < 0.01
    # Pairs of candidates are independent: joint frequency ~ rate^2.
    both = (in_support[:, 0] & in_support[:, 1])[candidate[:, 0] & candidate[:, 1]].mean()
    assert abs(both - rate**2) < 0.04
    assert abs(info["support_size"].float().mean().item() - rate * 5 * (10 - q)) < 0.3


def test_poisson_picks_classes_uniformly_from_the_class_list(tmp_path):
    site = _site(tmp_path)  # 7 classes, one with only 2 records: still picked as often
    batch, _ = _poisson(site, ways=2, query_shots=1, num_episodes=3000, sample_rate=0.0, seed=4)
    ids = _ids(batch["query"])
    real = batch["query"]["weights"].numpy() > 0
    freq = np.bincount(site.labels[ids[real]], minlength=7) / 3000
    assert np.all(np.abs(freq - 2 / 7) < 0.04), freq


def test_poisson_determinism(tmp_path):
    site = _site(tmp_path)
    (a, ia), (b, ib) = _poisson(site, seed=9), _poisson(site, seed=9)
    assert torch.equal(a["support"]["inputs"]["ident"], b["support"]["inputs"]["ident"])
    assert torch.equal(ia["support_size"], ib["support_size"])


def test_poisson_query_is_an_independent_poisson_sample(tmp_path):
    """With query_sample_rate the query is its own Poisson sample of the chosen classes' records."""
    counts = (10, 10, 10, 10, 10)
    site = _site(tmp_path, counts=counts)
    rate, q_rate, e = 0.3, 0.2, 2000
    batch, info = _poisson(site, sample_rate=rate, query_sample_rate=q_rate, num_episodes=e, seed=5)
    n = sum(counts)
    in_support = np.zeros((e, n), dtype=bool)
    in_query = np.zeros((e, n), dtype=bool)
    for part, seen in (("support", in_support), ("query", in_query)):
        ids, real = _ids(batch[part]), batch[part]["weights"].numpy() > 0
        for i in range(e):
            seen[i, ids[i][real[i]]] = True
        # padding at the end, with weight 0, label 0 and no modality present
        pad = batch[part]["weights"] == 0
        size = info[f"{part}_size"]
        assert torch.equal(pad, torch.arange(pad.shape[1])[None, :] >= size[:, None])
        assert (batch[part]["labels"][pad] == 0).all()
        assert not any(m[pad].any() for m in batch[part]["masks"].values())
    # all 5 classes are chosen (ways = 5): every record is a candidate of both samples
    assert np.all(np.abs(in_support.mean(0) - rate) < 0.05)
    assert np.all(np.abs(in_query.mean(0) - q_rate) < 0.05)
    # independent of each other: a record lands in both at rate q * q_query
    assert abs((in_support & in_query).mean() - rate * q_rate) < 0.01
    assert torch.allclose(info["expected_support_size"], torch.full((e,), rate * n))
    assert torch.allclose(info["expected_query_size"], torch.full((e,), q_rate * n))
    assert abs(info["query_size"].float().mean().item() - q_rate * n) < 0.3


def test_poisson_query_is_restricted_to_the_episode_classes(tmp_path):
    site = _site(tmp_path)  # 7 classes, c6 with 2 records
    batch, info = _poisson(site, ways=3, sample_rate=0.5, query_sample_rate=0.5, num_episodes=50, seed=6)
    counts = site.records_per_class()
    for part in ("support", "query"):
        ids, real = _ids(batch[part]), batch[part]["weights"].numpy() > 0
        labels = batch[part]["labels"].numpy()
        for i in range(50):
            classes = site.labels[ids[i][real[i]]]
            # each episode label maps to one site class, and there are at most 3 of them
            pairs = set(zip(labels[i][real[i]].tolist(), classes.tolist()))
            assert len({c for _, c in pairs}) == len(pairs) <= 3
    # the expected size counts the records of the chosen classes (never more than 3 classes' worth)
    assert (info["expected_query_size"] <= 0.5 * np.sort(counts)[-3:].sum() + 1e-9).all()
    assert torch.equal(info["expected_query_size"], info["expected_support_size"])
