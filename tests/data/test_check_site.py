"""metafed check-site: a table per site, and exit 2 with the file and the fix on any problem."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from common.data import ModalitySpec, write_site
from common.data.site_report import check_site, episode_sizes
from simulations.cli import main

ROOT = Path(__file__).resolve().parents[2]
IMAGE = ModalitySpec("image", "image", (1, 6, 6))
SERIES = ModalitySpec("series", "series", (2, 9))


def write(path: Path, *, per_class=(5, 5, 3), image=IMAGE, missing_series=0) -> Path:
    rng = np.random.default_rng(len(str(path)))
    labels = np.repeat(np.arange(len(per_class)), per_class)
    n = labels.size
    mask = np.ones(n, dtype=bool)
    mask[:missing_series] = False
    return write_site(
        path,
        arrays={"image": rng.random((n, *image.shape)), "series": rng.standard_normal((n, *SERIES.shape))},
        masks={"series": mask},
        labels=labels,
        class_names=[f"k{i}" for i in range(len(per_class))],
        specs={"image": image, "series": SERIES},
        site_id=path.name.upper(),
        provenance={"source": "tests"},
    )


@pytest.fixture
def root(tmp_path):
    write(tmp_path / "data" / "train" / "a", missing_series=4)
    write(tmp_path / "data" / "train" / "b", per_class=(2, 8))
    write(tmp_path / "data" / "test" / "c")
    return tmp_path / "data"


def test_episode_sizes_are_the_frontier_of_records_and_ways():
    assert episode_sizes(np.array([5, 5, 3, 1])) == ((3, 3), (5, 2))
    assert episode_sizes(np.array([1, 1])) == ()


def test_good_sites_print_their_table_and_exit_0(root, capsys):
    assert main(["check-site", str(root)]) == 0
    out = capsys.readouterr().out
    assert f"{root / 'train' / 'a'}  (site_id A)  ok" in out
    assert "records 13, classes 3, records per class min 3 / median 5 / max 5" in out
    lines = out.splitlines()
    series = [ln.split() for ln in lines if ln.strip().startswith("series")]
    assert series[0] == ["series", "series", "[2,", "9]", "float32", f"{100 * 4 / 13:.1f}%"]  # site a
    assert series[1][-1] == "0.0%"
    assert "<= 3 -> 3-way, <= 5 -> 2-way" in out  # site a: 3 classes with 3 records, 2 with 5
    assert "<= 2 -> 2-way, <= 8 -> 1-way" in out  # site b
    assert "schema (inferred from the manifests of 3 site(s)): image image [1, 6, 6] float32; series" in out
    assert out.rstrip().endswith("3 site(s) checked: 3 ok, 0 with problems")


def test_the_experiment_s_episodes_are_checked_with_a_config(root, capsys):
    # 2-way with 1 shot + 3 query shots: 4 records per class; site b has one class that large, a and c two.
    code = main(["check-site", str(root), "--set", "episodes.ways=2", "--set", "episodes.query_shots=3"])
    out = capsys.readouterr().out
    assert code == 2
    assert "b  (site_id B)  PROBLEM" in out
    assert (f"problem: {root / 'train' / 'b' / 'labels.npy'}: only 1 class(es) have the 4 records "
            "(shots + query_shots) that a 2-way episode takes from each. Fix:") in out
    assert "a  (site_id A)  ok" in out
    assert "3 site(s) checked: 2 ok, 1 with problems" in out


@pytest.mark.parametrize(
    ("damage", "file", "message"),
    [
        (lambda d: np.save(d / "image.npy", np.zeros((13, 1, 6, 5), np.float32)), "image.npy",
         "modality 'image' has shape [13, 1, 6, 5], expected [13, 1, 6, 6]"),
        (lambda d: (d / "labels.npy").unlink(), "labels.npy", "missing array file for labels"),
        (lambda d: (d / "manifest.yaml").unlink(), "manifest.yaml", "missing manifest"),
        (lambda d: np.save(d / "extra.npy", np.zeros(3)), "extra.npy", "unexpected file extra.npy"),
    ],
)
def test_a_broken_site_exits_2_naming_the_file_and_the_fix(root, capsys, damage, file, message):
    damage(root / "train" / "a")
    assert main(["check-site", str(root)]) == 2
    out = capsys.readouterr().out
    (line,) = [ln for ln in out.splitlines() if ln.startswith(f"  problem: {root / 'train' / 'a' / file}")]
    assert message in line and "Fix:" in line
    assert "1 with problems" in out


def test_sites_that_disagree_on_a_modality_are_a_problem(root, capsys):
    shutil.rmtree(root / "test" / "c")
    write(root / "test" / "c", image=ModalitySpec("image", "image", (1, 7, 7)))
    assert main(["check-site", str(root)]) == 2
    out = capsys.readouterr().out
    assert ("problem: the sites disagree on the schema (from their manifest.yaml files): modality 'image': "
            "train/a, train/b declare shape [1, 6, 6]; test/c declares shape [1, 7, 7]") in out


def test_a_folder_without_sites_and_a_site_with_an_empty_class(tmp_path, capsys):
    (tmp_path / "nothing").mkdir()
    site = write(tmp_path / "s", per_class=(4, 4))
    report = check_site(site)
    assert report.ok and report.records_per_class == (4, 4)
    assert main(["check-site", str(tmp_path / "nothing")]) == 2
    assert "holds no manifest.yaml and no site folders. Fix:" in capsys.readouterr().out


def test_the_command_writes_the_schema_file_and_exits_2_on_a_bad_site(root, tmp_path):
    schema = tmp_path / "schema.yaml"
    cmd = [sys.executable, "-m", "simulations.cli", "check-site", str(root), "--write-schema", str(schema)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    from common.data.schema_inference import read_schema_file

    assert read_schema_file(schema) == {"image": IMAGE, "series": SERIES}
    np.save(root / "test" / "c" / "series.npy", np.full((13, 2, 9), np.nan, np.float32))
    proc = subprocess.run(cmd[:-2], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and "NaN or Inf values in modality 'series'" in proc.stdout
    assert "Traceback" not in proc.stderr
