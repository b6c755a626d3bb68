"""``python -m simulations.local`` writes the run directory ``metafed simulate`` writes; TensorBoard; ``metafed report``.

Two real smoke runs of the local runner (2 rounds, a tiny model), one with
``runtime.tensorboard: true``; the report reads both.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from simulations import local

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "simulations" / "configs" / "smoke.yaml"


def _local_run(tmp: Path, name: str, *sets: str) -> Path:
    out = tmp / name
    args = ["--config", str(SMOKE), "--no-ablate", "--set", f"data.root={tmp / 'data'}", "--set", f"output_dir={out}",
            "--set", f"name={name}", "--set", "federation.eval_episodes=6", "--set", "runtime.device=cpu"]
    assert local.main(args + [x for s in sets for x in ("--set", s)]) == 0
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("local-runs")
    return (_local_run(tmp, "reptile", "runtime.tensorboard=true"),
            _local_run(tmp, "fomaml", "algorithm.name=fomaml", "federation.rounds=1"))


def _lines(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


def test_the_local_runner_writes_a_run_directory(runs):
    run_dir, _ = runs
    assert run_dir.name.startswith("reptile-")
    lines = _lines(run_dir)
    assert [line["round"] for line in lines] == [1, 2]
    for line in lines:
        assert line["sites_sampled"] == 3 and line["sites_replied"] + line["sites_invalid"] == 3
        assert math.isfinite(line["train"]["train_loss"]) and line["elapsed"] > 0
    assert 0.0 <= lines[-1]["meta_test"]["accuracy"] <= 1.0 and "raw_1nn" in lines[-1]["meta_test"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds"] == 2 and summary["algorithm"] == "reptile"
    final = summary["final_meta_test"]
    assert {k: final[k] for k in ("round", "accuracy", "ci95")} == {
        "round": 2, "accuracy": lines[-1]["meta_test"]["accuracy"], "ci95": lines[-1]["meta_test"]["ci95"]}
    assert final["baselines"]["raw_1nn"]["accuracy"] == lines[-1]["meta_test"]["raw_1nn"]
    assert final["baselines"]["random_init"]["accuracy"] == lines[-1]["meta_test"]["random_init"]
    from common.config import load

    assert load(run_dir / "config.yaml").name == "reptile"
    for png in ("train_loss.png", "meta_test_accuracy.png"):
        assert (run_dir / png).stat().st_size > 1000 and str(run_dir / png) in summary["paths"]["plots"]
    assert (run_dir / "final_params.pt").is_file()


def test_tensorboard_reads_back_the_rounds_and_the_baselines(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, other = runs
    assert not (other / "tensorboard").exists()  # off unless asked
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    lines = _lines(run_dir)

    def series(tag):
        return [(e.step, e.value) for e in events.Scalars(tag)]

    assert [step for step, _ in series("train/train_loss")] == [1, 2]
    assert [v for _, v in series("train/train_loss")] == pytest.approx([line["train"]["train_loss"] for line in lines])
    meta = lines[-1]["meta_test"]
    assert series("accuracy/held_out") == [(2, pytest.approx(meta["accuracy"]))]
    assert series("accuracy/raw_1nn") == [(2, pytest.approx(meta["raw_1nn"]))]
    assert series("accuracy/chance") == [(2, pytest.approx(1 / 3))]
    assert series("accuracy/held_out_high")[0][1] == pytest.approx(meta["accuracy"] + meta["ci95"])
    assert {"sites/sampled", "time/elapsed", "meta_test/ci95"} <= tags


def test_scalars_keep_every_finite_number_and_drop_the_rest():
    from server.tensorboard_events import scalars

    line = {"round": 3, "sites_sampled": 4, "train": {"loss": 1.5, "bad": float("nan"), "flag": True, "name": "x"},
            "meta_test": {"accuracy": 0.5, "ci95": 0.1, "raw_1nn": 0.4, "raw_1nn_ci95": 0.05,
                          "random_init": 0.3, "only_image": float("inf")},
            "bytes_sent": 10}
    got = scalars(line, ways=5)
    assert got["train/loss"] == 1.5 and "train/bad" not in got and "train/flag" not in got
    assert "meta_test/only_image" not in got and got["sites/sampled"] == 4 and got["bytes/sent"] == 10
    assert got["accuracy/held_out"] == 0.5 and got["accuracy/chance"] == 0.2
    assert got["accuracy/raw_1nn"] == 0.4 and got["accuracy/random_init"] == 0.3
    assert "accuracy/raw_1nn_ci95" not in got
    assert got["accuracy/held_out_low"] == pytest.approx(0.4) and got["accuracy/held_out_high"] == pytest.approx(0.6)
    assert all(math.isfinite(v) for v in got.values())


def test_report_compares_the_runs(runs, tmp_path, capsys):
    from simulations.cli import main

    a, b = runs
    assert main(["report", str(a), str(b), "--out", str(tmp_path / "report")]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| run | algorithm | status | rounds | held-out accuracy (95% CI) | raw 1-NN")
    assert len(rows) == 3 and a.name in rows[1] and b.name in rows[2]
    for run_dir, row in zip(runs, rows[1:]):
        final = json.loads((run_dir / "summary.json").read_text())["final_meta_test"]
        assert f"{final['accuracy']:.3f} ± {final['ci95']:.3f}" in row and "completed" in row
        assert "| 0.333 |" in row and "| - |" in row  # chance for 3 ways; a local run sends no bytes
    assert "| reptile | completed | 2 |" in rows[1] and "| fomaml | completed | 1 |" in rows[2]
    report = tmp_path / "report"
    assert rows[0] in (report / "report.md").read_text()
    for name in ("accuracy_vs_rounds.png", "accuracy_vs_bytes.png", "accuracy_vs_seconds.png"):
        assert (report / name).stat().st_size > 1000


def test_report_refuses_a_folder_that_is_not_a_finished_run(runs, tmp_path, capsys):
    from simulations.cli import main

    assert main(["report", str(runs[0]), str(tmp_path), "--out", str(tmp_path / "report")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path} has no summary.json" in err and "Traceback" not in err
    assert not (tmp_path / "report").exists()  # nothing written


def test_bad_input_to_the_local_runner_exits_2_and_writes_nothing(tmp_path, capsys):
    code = local.main(["--config", str(SMOKE), "--set", f"data.root={tmp_path / 'none'}", "--set", "data.generate=false",
                       "--set", f"output_dir={tmp_path / 'runs'}"])
    assert code == 2 and "data.generate" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_tensorboard_without_its_package_is_bad_input(tmp_path, capsys, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else find_spec(name, *a))
    code = local.main(["--config", str(SMOKE), "--set", f"data.root={tmp_path / 'data'}",
                       "--set", f"output_dir={tmp_path / 'runs'}", "--set", "runtime.tensorboard=true"])
    err = capsys.readouterr().err
    assert code == 2 and "pip install 'metafed[tensorboard]'" in err and "runtime.tensorboard=false" in err
    assert not (tmp_path / "runs").exists()


def test_a_resumed_run_replaces_the_rounds_it_repeats_in_tensorboard(tmp_path):
    """A session that ended after its last checkpoint logged rounds that the resumed session runs again."""
    import time

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from common.config import load
    from server.run_files import RunFiles

    config = load(SMOKE, overrides={"runtime.tensorboard": True})
    first = RunFiles(tmp_path, config=config)
    for r in (1, 2, 3):
        first.append({"round": r, "train": {"loss": float(r)}})
    first.close()
    time.sleep(1.1)  # event files are named by the second they were opened
    resumed = RunFiles(tmp_path, config=config)
    for r in (2, 3):
        resumed.append({"round": r, "train": {"loss": 10.0 * r}})
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 1.0), (2, 20.0), (3, 30.0)]


def test_a_local_run_that_fails_midway_exits_1_with_a_failed_summary(tmp_path, capsys):
    """Record-level DP whose budget holds one round: every site refuses the second."""
    code = local.main(["--config", str(SMOKE), "--no-ablate", "--set", f"data.root={tmp_path / 'data'}",
                       "--set", f"output_dir={tmp_path / 'runs'}", "--set", "federation.eval_episodes=3",
                       "--set", "privacy.record.enabled=true", "--set", "site_privacy.require_record_dp=true",
                       "--set", "site_privacy.max_epsilon=15", "--set", "privacy.record.max_epsilon=15",
                       "--set", f"site_privacy.ledger_dir={tmp_path / 'ledgers'}"])
    assert code == 1 and "the run failed: PrivacyBudgetExceeded" in capsys.readouterr().err
    (run_dir,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "max_epsilon=15" in summary["reason"] and summary["rounds"] == 1
    assert [line["round"] for line in _lines(run_dir)] == [1]
