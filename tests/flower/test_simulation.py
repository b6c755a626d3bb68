"""End to end through the command line: a real Flower simulation on the Ray backend.

Smoke scale (3 sites, a tiny model); each run costs ~15-25 s, most of it
starting Ray and importing torch in the workers.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "simulations" / "configs" / "smoke.yaml"
METAFED = shutil.which("metafed") or ""

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def ray_daemons() -> set[int]:
    """Pids of Ray's daemons (raylet, gcs_server) on this machine."""
    out = subprocess.run(["ps", "-eo", "pid=,comm=,args="], capture_output=True, text=True).stdout
    pids = set()
    for line in out.splitlines():
        parts = line.split(None, 2)
        if len(parts) >= 2 and any(name in line for name in ("raylet", "gcs_server")):
            pids.add(int(parts[0]))
    return pids


def simulate(tmp_path: Path, data: Path, *args: str, resume: Path | None = None) -> subprocess.CompletedProcess:
    cmd = [METAFED] if METAFED else [sys.executable, "-m", "simulations.cli"]
    cmd += ["simulate"]
    if resume is None:
        cmd += ["--config", str(SMOKE), "--set", f"data.root={data}", "--set", f"output_dir={tmp_path / 'runs'}"]
    else:
        cmd += ["--resume", str(resume)]
    cmd += list(args)
    before = ray_daemons()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=400)
    # No Ray daemon started by this run may outlive it.
    deadline = time.time() + 15
    while (left := ray_daemons() - before) and time.time() < deadline:
        time.sleep(0.5)
    assert not left, f"Ray processes left running: {left}"
    return proc


def run_dirs(tmp_path: Path) -> list[Path]:
    return sorted(p for p in (tmp_path / "runs").iterdir() if p.is_dir())


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


def final_params(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "final_params.pt", weights_only=True)


def test_simulate_smoke_end_to_end(tmp_path, smoke_data):
    proc = simulate(tmp_path, smoke_data)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    (run_dir,) = run_dirs(tmp_path)
    assert run_dir.name.startswith("smoke-")
    # Progress lines from the server app, one per round.
    assert "round 1/2 | sites 3/3" in proc.stdout and "round 2/2 | sites 3/3" in proc.stdout
    assert "meta-test acc" in proc.stdout and "ETA" in proc.stdout
    lines = metrics(run_dir)
    assert [line["round"] for line in lines] == [1, 2]
    for line in lines:
        assert (line["sites_sampled"], line["sites_replied"], line["sites_failed"], line["sites_invalid"]) == (3, 3, 0, 0)
        assert line["train"]["episodes"] == 3 * 4
        assert {"query_loss", "update_norm"} <= set(line["train"])
        assert 0.0 <= line["meta_test"]["accuracy"] <= 1.0 and "ci95" in line["meta_test"]
        assert line["bytes_sent"] > 0 and line["bytes_received"] > 0
        assert line["elapsed"] > 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds"] == 2
    assert summary["final_meta_test"]["round"] == 2
    assert summary["final_meta_test"]["accuracy"] == lines[-1]["meta_test"]["accuracy"]
    assert summary["final_meta_test"]["ci95"] is not None and summary["wall_time_s"] > 0
    assert (run_dir / "config.yaml").is_file()
    for png in ("train_loss.png", "meta_test_accuracy.png"):
        assert (run_dir / png).stat().st_size > 1000
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["round-000001", "round-000002"]
    # The final model is the last checkpoint's.
    from server import checkpoint

    state, _ = checkpoint.load_latest(run_dir)
    params = final_params(run_dir)
    assert all(torch.equal(params[k], state.params[k]) for k in params)


def test_invalid_site_gets_an_error_reply_and_the_run_goes_on(tmp_path, broken_data):
    proc = simulate(tmp_path, broken_data, "--set", "data.generate=false", "--set", "federation.rounds=1",
                    "--set", "federation.sites_per_round=4")
    assert proc.returncode == 0, proc.stderr[-5000:]
    (run_dir,) = run_dirs(tmp_path)
    (line,) = metrics(run_dir)
    assert (line["sites_sampled"], line["sites_replied"], line["sites_failed"]) == (4, 3, 1)
    failure = line["failures"][0]
    assert failure["site"] == "site-0003" and failure["kind"] == "error"
    assert "labels" in failure["reason"]
    assert "site-0003" in proc.stdout + proc.stderr  # logged
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"


def test_resume_reaches_the_same_model(tmp_path, smoke_data):
    """A run that dies after its round-2 checkpoint, resumed, ends where an uninterrupted run ends.

    The interrupted run is the uninterrupted run's directory with everything
    after the round-2 checkpoint taken away (the round-4 checkpoint, the final
    model and the summary), as a crash between the two checkpoints leaves it;
    metrics.jsonl still has lines for rounds 3 and 4, which resuming must drop.
    Adam as the outer optimizer, so its moments must come back too.
    """
    args = ["--set", "federation.rounds=4", "--set", "federation.checkpoint_every=2",
            "--set", "federation.eval_every=4", "--set", "server_opt.name=adam", "--set", "server_opt.lr=0.01",
            "--set", "federation.sites_per_round=2"]
    full = simulate(tmp_path, smoke_data, *args)
    assert full.returncode == 0, full.stderr[-5000:]
    (run_a,) = run_dirs(tmp_path)
    run_b = tmp_path / "interrupted"
    shutil.copytree(run_a, run_b)
    shutil.rmtree(run_b / "checkpoints" / "round-000004")
    (run_b / "final_params.pt").unlink()
    (run_b / "summary.json").unlink()

    resumed = simulate(tmp_path, smoke_data, resume=run_b)
    assert resumed.returncode == 0, resumed.stderr[-5000:]
    assert "round 3/4" in resumed.stdout and "round 1/4" not in resumed.stdout
    a, b = final_params(run_a), final_params(run_b)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la, lb = metrics(run_a), metrics(run_b)
    assert [line["round"] for line in lb] == [1, 2, 3, 4]
    for x, y in zip(la, lb):
        assert x["train"] == y["train"]
    assert la[-1]["meta_test"]["accuracy"] == lb[-1]["meta_test"]["accuracy"]
