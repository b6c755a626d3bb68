"""The site-directory format: round trip, and a clear error for every kind of bad input."""

from __future__ import annotations

import pickle  # noqa: S403 - only to write a hostile fixture file; never used to load
import re

import numpy as np
import pytest
import yaml

from common.data import ModalitySpec, SiteDataError, list_sites, load_site, write_site


def _manifest(site):
    return yaml.safe_load((site / "manifest.yaml").read_text())


def _write_manifest(site, doc):
    (site / "manifest.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))


def _raises(match: str, fn, *args, **kwargs) -> SiteDataError:
    with pytest.raises(SiteDataError, match=match) as info:
        fn(*args, **kwargs)
    assert "Fix:" in str(info.value), str(info.value)
    return info.value


# --------------------------------------------------------------------------- round trip


def test_round_trip(make_site, site_kwargs, schema):
    kw = site_kwargs()
    mask = np.ones(len(kw["labels"]), dtype=bool)
    mask[[1, 7]] = False
    site_dir = make_site(masks={"series": mask})
    site = load_site(site_dir, schema=schema, min_records_per_class=6)
    assert site.site_id == "site-a"
    assert site.site_dir == site_dir
    assert site.num_records == 24
    assert site.class_names == ("c0", "c1", "c2", "c3")
    assert site.records_per_class().tolist() == [6, 6, 6, 6]
    assert site.provenance == {"generator": "tests", "seed": 0}
    assert site.specs == schema
    np.testing.assert_array_equal(site.labels, kw["labels"])
    np.testing.assert_array_equal(site.arrays["image"], kw["arrays"]["image"])
    np.testing.assert_array_equal(site.arrays["tokens"], kw["arrays"]["tokens"])
    assert site.arrays["image"].dtype == np.float32 and site.arrays["tokens"].dtype == np.int64
    assert site.labels.dtype == np.int64
    # Masked-out records read as zeros; the rest are kept.
    np.testing.assert_array_equal(site.masks["series"], mask)
    assert not site.arrays["series"][~mask].any()
    np.testing.assert_array_equal(site.arrays["series"][mask], kw["arrays"]["series"][mask])
    assert site.masks["image"].all()  # no mask file: every record has it
    assert not (site_dir / "image.mask.npy").exists()
    # Arrays of a loaded site are read-only, and the class index lists each class's records.
    with pytest.raises(ValueError):
        site.arrays["image"][0] = 1.0
    for k, idx in enumerate(site.class_index):
        assert (site.labels[idx] == k).all()


def test_write_casts_and_does_not_modify_input(tmp_path, site_kwargs):
    kw = site_kwargs()
    kw["arrays"]["image"] = kw["arrays"]["image"].astype(np.float64)
    kw["arrays"]["series"][3] = np.nan
    original = kw["arrays"]["series"].copy()
    mask = np.ones(24, dtype=bool)
    mask[3] = False  # a NaN in a record that lacks the modality is ignored
    write_site(tmp_path / "s", masks={"series": mask}, **kw)
    site = load_site(tmp_path / "s")
    assert site.arrays["image"].dtype == np.float32
    assert not site.arrays["series"][3].any()
    np.testing.assert_array_equal(kw["arrays"]["series"], original)


def test_overwrite_rules(tmp_path, site_kwargs):
    target = tmp_path / "s"
    target.mkdir()  # an empty folder may be written into
    write_site(target, **site_kwargs(seed=1))
    err = _raises("refusing to overwrite", write_site, target, **site_kwargs(seed=2))
    assert str(target) in str(err)
    assert load_site(target).provenance["seed"] == 1
    write_site(target, overwrite=True, **site_kwargs(seed=2))
    assert load_site(target).provenance["seed"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # no temporary folders left


def test_write_refuses_invalid_data_and_writes_nothing(tmp_path, site_kwargs):
    kw = site_kwargs()
    kw["arrays"]["image"][2, 0, 0, 0] = np.inf
    _raises("NaN or Inf", write_site, tmp_path / "s", **kw)
    assert not any(tmp_path.iterdir())


def test_list_sites(tmp_path, make_site):
    make_site("b")
    make_site("a")
    (tmp_path / "not-a-site").mkdir()
    (tmp_path / "file.txt").write_text("x")
    assert list_sites(tmp_path) == [tmp_path / "a", tmp_path / "b"]
    assert list_sites(tmp_path / "missing") == []


# --------------------------------------------------------------------------- validation errors


def test_missing_manifest(make_site):
    site = make_site()
    (site / "manifest.yaml").unlink()
    err = _raises(r"manifest\.yaml: missing manifest", load_site, site)
    assert err.path == site / "manifest.yaml"


def test_missing_site_folder(tmp_path):
    _raises("no such site directory", load_site, tmp_path / "nowhere")


def test_missing_array_file(make_site):
    site = make_site()
    (site / "series.npy").unlink()
    _raises(r"series\.npy: missing array file for modality 'series'", load_site, site)
    (site / "labels.npy").unlink()
    _raises(r"labels\.npy: missing array file for labels", load_site, site)


def test_extra_unexpected_npy(make_site):
    site = make_site()
    np.save(site / "depth.npy", np.zeros(24, dtype=np.float32))
    _raises(r"depth\.npy: unexpected file depth\.npy.*matches no modality", load_site, site)


def test_mask_of_unknown_modality_is_unexpected(make_site):
    site = make_site()
    np.save(site / "audio.mask.npy", np.ones(24, dtype=bool))
    _raises(r"audio\.mask\.npy: unexpected file", load_site, site)


def test_manifest_not_valid_yaml(make_site):
    site = make_site()
    (site / "manifest.yaml").write_text("site_id: [unclosed\nmodalities: {")
    _raises(r"manifest\.yaml: is not valid YAML", load_site, site)


def test_manifest_not_a_mapping(make_site):
    site = make_site()
    (site / "manifest.yaml").write_text("- just\n- a list\n")
    _raises(r"manifest\.yaml: must hold a mapping", load_site, site)


@pytest.mark.parametrize("field", ["format_version", "site_id", "modalities", "class_names", "num_records"])
def test_manifest_missing_required_field(make_site, field):
    site = make_site()
    doc = _manifest(site)
    del doc[field]
    _write_manifest(site, doc)
    _raises(rf"manifest\.yaml: manifest is missing the required field\(s\) {field}", load_site, site)


def test_manifest_bad_fields(make_site):
    site = make_site()
    doc = _manifest(site)
    _write_manifest(site, {**doc, "format_version": 99})
    _raises("newer than this metafed reads", load_site, site)
    _write_manifest(site, {**doc, "class_names": ["a", "a", "b", "c"]})
    _raises("class_names repeats", load_site, site)
    bad = {**doc, "modalities": {**doc["modalities"], "image": {"kind": "video", "shape": [1]}}}
    _write_manifest(site, bad)
    _raises("has kind 'video'", load_site, site)
    bad = {**doc, "modalities": {**doc["modalities"], "image": {"kind": "image", "shape": [1, 4, 4], "dtype": "float64"}}}
    _write_manifest(site, bad)
    _raises("dtype 'float64'", load_site, site)
    _write_manifest(site, {**doc, "num_records": 23})
    _raises(r"labels\.npy: holds 24 labels but the manifest says num_records: 23", load_site, site)


def test_shape_mismatch(make_site):
    site = make_site()
    np.save(site / "image.npy", np.zeros((24, 1, 4, 5), dtype=np.float32))
    _raises(r"image\.npy: modality 'image' has shape \[24, 1, 4, 5\], expected \[24, 1, 4, 4\]", load_site, site)
    np.save(site / "image.npy", np.zeros((20, 1, 4, 4), dtype=np.float32))
    _raises(r"image\.npy: .*shape \[20, 1, 4, 4\]", load_site, site)


def test_dtype_mismatch(make_site):
    site = make_site()
    np.save(site / "image.npy", np.zeros((24, 1, 4, 4), dtype=np.float64))
    _raises(r"image\.npy: modality 'image' has dtype float64, expected float32.*astype", load_site, site)
    site = make_site("b")
    np.save(site / "labels.npy", np.zeros(24, dtype=np.int32))
    _raises(r"labels\.npy: the labels array has dtype int32, expected int64", load_site, site)
    site = make_site("c")
    np.save(site / "labels.npy", np.zeros(24, dtype=np.float32))
    _raises(r"labels\.npy: the labels array has dtype float32", load_site, site)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf(make_site, bad):
    site = make_site()
    arr = np.load(site / "series.npy")
    arr[5, 1, 2] = bad
    np.save(site / "series.npy", arr)
    _raises(r"series\.npy: NaN or Inf values in modality 'series' at records 5", load_site, site)


@pytest.mark.parametrize("value", [-1, 4, 100])
def test_labels_out_of_range(make_site, value):
    site = make_site()
    labels = np.load(site / "labels.npy")
    labels[3] = value
    np.save(site / "labels.npy", labels)
    _raises(rf"labels\.npy: labels out of range at records 3 \(values {value}\).*\[0, 4\)", load_site, site)


def test_unknown_modality_for_schema(make_site, schema):
    site = make_site()
    reduced = {k: v for k, v in schema.items() if k != "series"}
    _raises(r"series\.npy: unknown modality 'series': this experiment's modalities are", load_site, site, schema=reduced)


def test_modality_spec_differs_from_schema(make_site, schema):
    site = make_site()
    other = dict(schema, image=ModalitySpec("image", "image", (1, 8, 8)))
    _raises(r"image\.npy: modality 'image' is .* but the experiment expects", load_site, site, schema=other)
    other = dict(schema, tokens=ModalitySpec("tokens", "tokens", (3,), "int64", 50))
    _raises(r"modality 'tokens' is .*vocab_size", load_site, site, schema=other)


def test_a_site_may_lack_schema_modalities(make_site, schema):
    site = make_site()
    wider = dict(schema, audio=ModalitySpec("audio", "spectrogram", (1, 3, 3)))
    assert set(load_site(site, schema=wider).arrays) == {"image", "series", "tokens"}


def test_empty_site(tmp_path, make_site, site_kwargs):
    kw = site_kwargs()
    kw["arrays"] = {k: v[:0] for k, v in kw["arrays"].items()}
    kw["labels"] = kw["labels"][:0]
    _raises("empty site: it has 0 records", write_site, tmp_path / "e", **kw)
    # The same on disk.
    site = make_site()
    for name in ("image", "series", "tokens", "labels"):
        np.save(site / f"{name}.npy", np.load(site / f"{name}.npy")[:0])
    doc = _manifest(site)
    _write_manifest(site, {**doc, "num_records": 0})
    _raises("empty site", load_site, site)


def test_too_few_records_per_class(make_site, site_kwargs):
    kw = site_kwargs()
    labels = kw["labels"].copy()
    labels[labels == 2] = 1
    labels[-1] = 2  # class c2 keeps a single record, taken from c3
    site = make_site(labels=labels)
    load_site(site, min_records_per_class=1)
    err = _raises(
        r"labels\.npy: 2 class\(es\) have fewer than 6 records.*'c2' \(1\), 'c3' \(5\)",
        load_site,
        site,
        min_records_per_class=6,
    )
    assert "fewer shots" in str(err)


def test_token_ids_out_of_vocab(make_site):
    site = make_site()
    tokens = np.load(site / "tokens.npy")
    tokens[4, 0] = 10
    np.save(site / "tokens.npy", tokens)
    _raises(r"tokens\.npy: token ids out of range \[0, 10\) in records 4", load_site, site)
    tokens[4, 0] = -3
    np.save(site / "tokens.npy", tokens)
    _raises(r"token ids out of range", load_site, site)


def test_tokens_of_masked_records_are_ignored(make_site):
    site = make_site()
    tokens = np.load(site / "tokens.npy")
    tokens[4, 0] = 99
    np.save(site / "tokens.npy", tokens)
    mask = np.ones(24, dtype=bool)
    mask[4] = False
    np.save(site / "tokens.mask.npy", mask)
    loaded = load_site(site)
    assert not loaded.arrays["tokens"][4].any()


def test_mask_wrong_shape_or_dtype(make_site):
    site = make_site()
    np.save(site / "image.mask.npy", np.ones(23, dtype=bool))
    _raises(r"image\.mask\.npy: mask of 'image' has shape \[23\], expected \[24\]", load_site, site)
    np.save(site / "image.mask.npy", np.ones((24, 1), dtype=bool))
    _raises(r"image\.mask\.npy: .*shape \[24, 1\]", load_site, site)
    np.save(site / "image.mask.npy", np.ones(24, dtype=np.int64))
    _raises(r"image\.mask\.npy: mask of 'image' has dtype int64, expected bool", load_site, site)


def test_record_without_any_modality_is_refused(tmp_path, site_kwargs):
    mask = np.ones(24, dtype=bool)
    mask[9] = False
    kw = site_kwargs()
    _raises("records 9 have every modality masked out", write_site, tmp_path / "s", masks={m: mask for m in kw["specs"]}, **kw)


def test_pickled_object_array(make_site):
    site = make_site()
    objects = np.empty(24, dtype=object)
    objects[:] = [{"label": i} for i in range(24)]
    np.save(site / "labels.npy", objects, allow_pickle=True)
    err = _raises(r"labels\.npy: holds pickled Python objects", load_site, site)
    assert "arbitrary code" in str(err)
    site = make_site("b")
    (site / "image.npy").write_bytes(pickle.dumps([1, 2, 3]))
    _raises(r"image\.npy: holds pickled Python objects", load_site, site)


def test_not_an_npy_file(make_site):
    site = make_site()
    (site / "series.npy").write_bytes(b"garbage")
    _raises(r"series\.npy: is not a readable \.npy array", load_site, site)


def test_bad_modality_name_is_refused(tmp_path, site_kwargs):
    kw = site_kwargs()
    kw["specs"] = {"my.image": ModalitySpec("my.image", "image", (1, 4, 4))}
    kw["arrays"] = {"my.image": kw["arrays"]["image"]}
    _raises(re.escape("modality name 'my.image' is not allowed"), write_site, tmp_path / "s", **kw)
