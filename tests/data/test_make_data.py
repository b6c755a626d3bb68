"""Writing the procedural benchmark in a pool of worker processes (``metafed make-data --workers``)."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import pytest
import yaml

from common.config import ConfigError
from common.data import generate_benchmark, procedural
from simulations import cli
from simulations.data_commands import ProgressBar


def _files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by relative path; benchmark.yaml without its timing."""
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if path.name == procedural.BENCHMARK_FILE:
            doc = yaml.safe_load(data)
            assert doc.pop("generation_seconds") >= 0
            data = yaml.safe_dump(doc).encode()
        out[str(path.relative_to(root))] = data
    return out


def test_parallel_writes_the_same_bytes_as_serial(tmp_path, small_config):
    # More sites than one task holds, so that both workers write some; all four modalities.
    cfg = dataclasses.replace(
        small_config, num_train_sites=procedural.SITES_PER_TASK + 3, num_test_sites=3,
        modalities=("image", "audio", "series", "tokens"), interference=0.5,
    )
    calls = []
    serial = generate_benchmark(tmp_path / "serial", config=cfg)
    parallel = generate_benchmark(tmp_path / "parallel", config=cfg, workers=2,
                                  progress=lambda done, total, what: calls.append((done, total, what)))
    a, b = _files(tmp_path / "serial"), _files(tmp_path / "parallel")
    assert len(a) > 5 * (cfg.num_train_sites + cfg.num_test_sites)  # manifest, labels, and a file per modality
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []
    assert [p.name for p in parallel.train_sites] == [p.name for p in serial.train_sites]
    # Progress only grows, and ends at every site.
    total = cfg.num_train_sites + cfg.num_test_sites
    assert [c[0] for c in calls] == sorted({c[0] for c in calls}) and calls[-1] == (total, total, "sites")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["parallel", "serial"]  # no temporary folders left


def test_a_failing_worker_fails_the_run_and_leaves_nothing(tmp_path, small_config, monkeypatch):
    cfg = dataclasses.replace(small_config, num_train_sites=procedural.SITES_PER_TASK + 2, num_test_sites=1)
    real = procedural._site_records

    def records(protos, config, split, index, pool):
        if split == "train" and index == procedural.SITES_PER_TASK + 1:
            raise RuntimeError("site 9 cannot be rendered")
        return real(protos, config, split, index, pool)

    monkeypatch.setattr(procedural, "_site_records", records)  # the forked workers inherit it
    with pytest.raises(RuntimeError, match="site 9 cannot be rendered"):
        generate_benchmark(tmp_path / "bench", config=cfg, workers=2)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("workers", [0, -1, 1.5, True])
def test_workers_must_be_a_whole_number_of_processes(tmp_path, small_config, workers):
    with pytest.raises(ConfigError, match="workers must be a whole number >= 1"):
        generate_benchmark(tmp_path / "bench", config=small_config, workers=workers)
    assert not (tmp_path / "bench").exists()


def test_cli_refuses_a_bad_worker_count(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["make-data", "--out", str(tmp_path / "bench"), "--workers", "none"])
    assert info.value.code == 2
    assert "--workers: expected a whole number of processes >= 1, got 'none'" in capsys.readouterr().err
    assert not (tmp_path / "bench").exists()


def test_progress_bar_draws_on_a_terminal_only():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    term, pipe = Terminal(), io.StringIO()
    for stream in (term, pipe):
        bar = ProgressBar(stream=stream, width=10)
        bar(4, 8, "sites")
        bar(8, 8, "sites")
    assert pipe.getvalue() == ""
    assert term.getvalue().endswith("[##########] 8/8\n") and "[#####.....] 4/8" in term.getvalue()
