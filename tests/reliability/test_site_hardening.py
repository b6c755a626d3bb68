"""Site folders that try to escape, blow up, lie about their size or break the run."""

from __future__ import annotations

import logging
import os
import shutil

import numpy as np
import pytest

from common.data import ModalitySpec, SiteDataError, load_site, write_site
from common.data.site import MAX_MESSAGE

SPEC = {"series": ModalitySpec("series", "series", (3, 64))}


@pytest.fixture
def site(tmp_path):
    rng = np.random.default_rng(0)
    return write_site(
        tmp_path / "sites" / "site-a",
        arrays={"series": rng.standard_normal((12, 3, 64)).astype(np.float32)},
        labels=np.repeat(np.arange(3), 4), class_names=["a", "b", "c"], specs=SPEC,
        site_id="site-a", provenance={"generator": "tests"},
    )


def _refused(site_dir, **kwargs) -> str:
    with pytest.raises(SiteDataError) as info:
        load_site(site_dir, **kwargs)
    text = str(info.value)
    assert len(text) <= MAX_MESSAGE and "Fix:" in text, text
    return text


def _set_manifest_field(site_dir, field: str, yaml_value: str, prelude: str = "") -> None:
    lines = (site_dir / "manifest.yaml").read_text().splitlines()
    kept = [line for line in lines if not line.startswith(f"{field}:")]
    (site_dir / "manifest.yaml").write_text(prelude + "\n".join(kept) + f"\n{field}: {yaml_value}\n")


# ------------------------------------------------------------------------ YAML aliases


def test_a_yaml_alias_bomb_is_refused_before_it_expands(site):
    # Nine levels of ten aliases each: 10**9 strings if it were expanded.
    levels = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, 10):
        levels.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    text = "\n".join(levels) + "\n"
    _set_manifest_field(site, "site_id", "*a9", prelude=text)
    message = _refused(site)
    assert "anchors or aliases" in message


def test_a_single_anchor_is_refused_too(site):
    _set_manifest_field(site, "site_id", "&s site-a")
    assert "anchors or aliases" in _refused(site)


# ------------------------------------------------------------------ bounded messages


def test_an_enormous_value_gives_a_bounded_message_that_keeps_the_fix(site):
    _set_manifest_field(site, "site_id", "[" + ", ".join(["x" * 50] * 20_000) + "]")
    message = _refused(site)
    assert "site_id must be a non-empty string" in message and " ... " in message
    assert message.endswith("set site_id: <name>")


# ------------------------------------------------------------------ .npy declared size


def _write_npy_header(path, shape, dtype="<f4", body=b"\0" * 64) -> None:
    from numpy.lib import format as npy_format

    with open(path, "wb") as f:
        npy_format.write_array_header_1_0(f, {"descr": dtype, "fortran_order": False, "shape": shape})
        f.write(body)


def test_a_header_claiming_64_gib_is_refused_before_allocation(site):
    _write_npy_header(site / "series.npy", (2**34, 1), body=b"\0" * 480)  # 2**34 float32 = 64 GiB
    message = _refused(site)
    assert "68719476736 bytes" in message and "480 bytes" in message and "truncated" in message


def test_a_truncated_array_is_refused_with_its_sizes(site):
    data = (site / "labels.npy").read_bytes()
    (site / "labels.npy").write_bytes(data[:-8])
    message = _refused(site)
    assert "labels.npy" in message and "int64[12] (96 bytes)" in message and "88 bytes" in message


def test_version_2_headers_are_checked_too(site):
    from numpy.lib import format as npy_format

    with open(site / "series.npy", "wb") as f:
        npy_format.write_array_header_2_0(f, {"descr": "<f4", "fortran_order": False, "shape": (10**12,)})
        f.write(b"\0" * 40)
    assert "4000000000000 bytes" in _refused(site)


# -------------------------------------------------------------------------- symlinks


def test_a_link_out_of_the_site_is_refused_unless_allowed(site, tmp_path):
    outside = tmp_path / "elsewhere" / "labels.npy"
    outside.parent.mkdir()
    shutil.move(site / "labels.npy", outside)
    os.symlink(outside, site / "labels.npy")
    message = _refused(site)
    assert "outside the site folder" in message and "data.allow_external_links" in message
    assert load_site(site, allow_external_links=True).num_records == 12


def test_a_linked_manifest_out_of_the_site_is_refused(site, tmp_path):
    outside = tmp_path / "manifest.yaml"
    shutil.move(site / "manifest.yaml", outside)
    os.symlink(outside, site / "manifest.yaml")
    assert "outside the site folder" in _refused(site)


def test_a_link_inside_the_site_is_followed(site):
    inside = site / "raw"
    inside.mkdir()
    shutil.move(site / "series.npy", inside / "series.npy")
    os.symlink(inside / "series.npy", site / "series.npy")
    assert load_site(site).arrays["series"].shape == (12, 3, 64)


def test_the_option_reaches_the_engine(site, tmp_path):
    from common.config import load
    from common.task import Task

    outside = tmp_path / "labels-outside.npy"
    shutil.move(site / "labels.npy", outside)
    os.symlink(outside, site / "labels.npy")
    overrides = {"data.modalities": "series", "episodes.ways": 2, "episodes.query_shots": 2}
    with pytest.raises(SiteDataError, match="outside the site folder"):
        Task(load(overrides=overrides)).load_site(site)
    allowed = Task(load(overrides={**overrides, "data.allow_external_links": True}))
    assert allowed.load_site(site).num_records == 12


# -------------------------------------------------------- one bad site, not the run


def test_a_bad_manifest_among_user_sites_leaves_that_site_out(site, tmp_path, caplog):
    from common.config import DataConfig
    from common.data import ensure_benchmark

    root = tmp_path / "root"
    for name in ("site-a", "site-b"):
        shutil.copytree(site, root / "train" / name)
    (root / "train" / "site-b" / "manifest.yaml").write_text("site_id: [unclosed\n")
    with caplog.at_level(logging.WARNING, logger="metafed.data"):
        paths = ensure_benchmark(DataConfig(root=str(root), generate=True))
    assert paths.schema == SPEC
    assert "site-b" in caplog.text and "left out" in caplog.text
    assert not (root / "benchmark.yaml").exists()  # user data is used as it is, never overwritten
