"""End to end through the command line: real Flower simulations on the Ray backend.

Smoke scale (3-4 sites, a tiny model). A run costs ~30-50 s on 2 cores, most of
it starting Ray and importing torch in the workers, so the runs are shared:
run S (3 sites, 2 rounds) for the happy path and the ``flwr run`` comparison;
run A (4 sites, one of them invalid, 4 rounds, Adam) for the invalid site and as
the uninterrupted reference of the resume test.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "simulations" / "configs" / "smoke.yaml"
BIN = Path(sys.executable).parent

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def processes() -> list[tuple[int, str]]:
    """(pid, full command line) of every process (read from /proc: ``ps`` may cut long lines)."""
    rows = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if raw:
            rows.append((int(entry.name), raw.replace(b"\0", b" ").decode(errors="replace").strip()))
    return rows


def ray_tmpdir() -> str:
    """A Ray temp root of this test's own (short: Ray's socket paths must stay under 108 bytes).

    Every process of a Ray instance started under it has the path in its
    command line, which tells this run's Ray processes from any other on the machine.
    """
    return tempfile.mkdtemp(prefix="mf-ray-", dir="/tmp")


def ray_processes(tmpdir: str) -> set[int]:
    return {pid for pid, args in processes() if tmpdir in args}


def assert_ray_gone(tmpdir: str) -> None:
    deadline = time.time() + 20
    while (left := ray_processes(tmpdir)) and time.time() < deadline:
        time.sleep(0.5)
    assert not left, f"Ray processes left running: {left}"
    shutil.rmtree(tmpdir, ignore_errors=True)


def metafed(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    exe = BIN / "metafed"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "simulations.cli"]
    tmpdir = ray_tmpdir()
    proc = subprocess.run([*cmd, *args], capture_output=True, text=True, cwd=ROOT, timeout=400,
                          env={**os.environ, **(env or {}), "RAY_TMPDIR": tmpdir})
    assert_ray_gone(tmpdir)  # no Ray process started by this run outlives it
    return proc


def simulate(out: Path, data: Path, *args: str) -> tuple[subprocess.CompletedProcess, Path]:
    proc = metafed("simulate", "--config", str(SMOKE), "--set", f"data.root={data}",
                   "--set", f"output_dir={out}", *args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    return proc, run_dir


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


def final_params(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "final_params.pt", weights_only=True)


@pytest.fixture(scope="module")
def run_s(tmp_path_factory, smoke_data):
    return simulate(tmp_path_factory.mktemp("run_s"), smoke_data, "--set", "runtime.tensorboard=true")


@pytest.fixture(scope="module")
def run_a(tmp_path_factory, broken_data):
    return simulate(
        tmp_path_factory.mktemp("run_a"), broken_data,
        "--set", "data.generate=false", "--set", "data.on_invalid_site=warn", "--set", "federation.rounds=4", "--set", "federation.sites_per_round=3",
        "--set", "federation.checkpoint_every=2", "--set", "federation.eval_every=2",
        "--set", "server_opt.name=adam", "--set", "server_opt.lr=0.01",
    )


def test_simulate_smoke_end_to_end(run_s):
    proc, run_dir = run_s
    assert run_dir.name.startswith("smoke-")
    # Progress lines from the server app, one per round.
    assert "round 1/2 | sites 3/3" in proc.stdout and "round 2/2 | sites 3/3" in proc.stdout
    assert "meta-test acc" in proc.stdout and "ETA" in proc.stdout
    lines = metrics(run_dir)
    assert [line["round"] for line in lines] == [1, 2]
    for line in lines:
        assert (line["sites_sampled"], line["sites_replied"], line["sites_failed"], line["sites_invalid"]) == (3, 3, 0, 0)
        assert line["train"]["episodes"] == 3 * 4
        assert "update_norm" in line["train"] and {"query_loss", "train_loss"} & set(line["train"])
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
    from server import checkpoint

    state, _ = checkpoint.load_latest(run_dir)
    params = final_params(run_dir)
    assert all(torch.equal(params[k], state.params[k]) for k in params)


def test_tensorboard_events_of_a_flower_run(run_s):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run_dir = run_s
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    lines = metrics(run_dir)
    held_out = [(e.step, e.value) for e in events.Scalars("accuracy/held_out")]
    assert held_out == [(line["round"], pytest.approx(line["meta_test"]["accuracy"])) for line in lines]
    assert [e.value for e in events.Scalars("bytes/sent")] == [line["bytes_sent"] for line in lines]
    assert [e.step for e in events.Scalars("accuracy/raw_1nn")] == [2]  # measured after the last round


def test_report_on_flower_runs(run_s, run_a, tmp_path):
    out = tmp_path / "report"
    proc = metafed("report", str(run_s[1]), str(run_a[1]), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert len(rows) == 3
    for (_, run_dir), row in zip((run_s, run_a), rows[1:]):
        lines = metrics(run_dir)
        total = sum(line["bytes_sent"] + line["bytes_received"] for line in lines)
        assert row.startswith(f"| {run_dir.name} | reptile | completed | {len(lines)} |")
        acc = lines[-1]["meta_test"]
        assert f"| {acc['accuracy']:.3f} ± {acc['ci95']:.3f} |" in row and f"| {acc['raw_1nn']:.3f}" in row
        assert f"{total / 1024:.1f} KiB" in row or f"{total / 1024 ** 2:.1f} MiB" in row
    for name in ("accuracy_vs_rounds.png", "accuracy_vs_bytes.png", "accuracy_vs_seconds.png"):
        assert (out / name).stat().st_size > 1000


def test_invalid_site_gets_an_error_reply_and_the_run_goes_on(run_a):
    proc, run_dir = run_a
    lines = metrics(run_dir)
    assert len(lines) == 4
    hit = [line for line in lines if line["sites_failed"]]
    assert hit, "the invalid site was never sampled"
    for line in lines:
        assert line["sites_sampled"] == 3
        assert line["sites_replied"] + line["sites_failed"] == 3 and line["sites_invalid"] == 0
    for line in hit:
        (failure,) = line["failures"]
        assert failure["site"] == "site-0003" and failure["kind"] == "error"
        assert "labels" in failure["reason"]
    assert "site-0003" in proc.stdout + proc.stderr  # logged
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"


def test_resume_reaches_the_same_model(run_a, tmp_path):
    """A run that dies after its round-2 checkpoint, resumed, ends where the uninterrupted run ends.

    The interrupted run is the uninterrupted run's directory with everything
    after the round-2 checkpoint taken away (the round-4 checkpoint, the final
    model and the summary), as a crash between the two checkpoints leaves it;
    its metrics.jsonl still has lines for rounds 3 and 4, which resuming drops.
    The outer optimizer is Adam, so its moments must come back too.
    """
    _, run_dir = run_a
    interrupted = tmp_path / "interrupted"
    shutil.copytree(run_dir, interrupted)
    shutil.rmtree(interrupted / "checkpoints" / "round-000004")
    (interrupted / "final_params.pt").unlink()
    (interrupted / "summary.json").unlink()

    resumed = metafed("simulate", "--resume", str(interrupted))
    assert resumed.returncode == 0, resumed.stderr[-5000:]
    assert "round 3/4" in resumed.stdout and "round 1/4" not in resumed.stdout
    a, b = final_params(run_dir), final_params(interrupted)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la, lb = metrics(run_dir), metrics(interrupted)
    assert [line["round"] for line in lb] == [1, 2, 3, 4]
    for x, y in zip(la, lb):
        assert x["train"] == y["train"] and x.get("failures") == y.get("failures")
    assert la[-1]["meta_test"]["accuracy"] == lb[-1]["meta_test"]["accuracy"]


# --------------------------------------------------------------------- flwr run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_json(text: str) -> dict:
    return json.loads(text[text.index("{"):])


def stop_processes_with(markers: list[str]) -> None:
    """SIGTERM (then SIGKILL) the processes whose command line holds one of ``markers``."""
    mine = [pid for pid, args in processes() if any(m in args for m in markers) and pid != os.getpid()]
    for pid in mine:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + 10
    while time.time() < deadline and any(pid in dict(processes()) for pid in mine):
        time.sleep(0.2)
    for pid in mine:
        if pid in dict(processes()):
            os.kill(pid, signal.SIGKILL)


def wait_healthy(port: int, proc: subprocess.Popen, timeout: float, allow_exit: bool = False) -> bool:
    """True once the SuperLink answers; False if it exited and ``allow_exit``."""
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            if allow_exit:
                return False
            errors = sorted(Path(proc.args[proc.args.index("--log-file") + 1]).parents[1].glob("superlink-*.err"))
            tail = errors[-1].read_text()[-3000:] if errors else ""
            pytest.fail(f"flower-superlink exited with code {proc.returncode}:\n{tail}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"flower-superlink did not answer on port {port} within {timeout:.0f}s")


def test_flwr_run_reaches_the_same_model(run_s, smoke_data, tmp_path):
    """``flwr run . local`` on the same apps: the run completes and ends at run S's model.

    ``flwr run . local`` uses the local SuperLink when one answers on its port and
    starts a detached one otherwise (giving it 15 s, too little on a busy
    2-core machine). The test starts that same SuperLink itself (the command
    ``flwr`` would run, on ports of its own) so that it knows what to stop.
    ``flwr run`` exits 0 even when the run fails: the run's status is read
    with ``flwr list``.
    """
    home = tmp_path / "flwr-home"
    flwr = str(BIN / "flwr")
    out = tmp_path / "runs"
    run_config = f'config-file="{SMOKE}" data.root="{smoke_data}" output_dir="{out}"'
    (home / "local-superlink").mkdir(parents=True)
    ray_dir = ray_tmpdir()
    markers: list[str] = []
    # A port picked free can be taken before the SuperLink binds it (it then exits
    # with code 3): try again on fresh ports.
    for attempt in range(3):
        http_port, control_port = free_port(), free_port()
        env = {
            **os.environ,
            # The SuperLink starts its SuperExec by name: this environment's commands come first.
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "FLWR_HOME": str(home),
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port),
            "FLWR_LOCAL_CONTROL_API_PORT": str(control_port),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # nothing to install, no registry
            "FLWR_TELEMETRY_ENABLED": "0",
            "RAY_TMPDIR": ray_dir,
        }
        markers += [f"127.0.0.1:{control_port}", f"127.0.0.1:{http_port}"]
        superlink = subprocess.Popen(
            [str(BIN / "flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
             "--control-api-address", f"127.0.0.1:{control_port}", "--host", "127.0.0.1", "--port", str(http_port),
             "--database", str(home / "local-superlink" / "state.db"),
             "--log-file", str(home / "local-superlink" / "superlink.log")],
            env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(home / f"superlink-{attempt}.err", "wb"),
            start_new_session=True,
        )
        if wait_healthy(http_port, superlink, timeout=90, allow_exit=attempt < 2):
            break
    try:
        started = subprocess.run(
            [flwr, "run", ".", "local", "--run-config", run_config,
             "--federation-config", "num-supernodes=3 client-resources-num-cpus=1", "--format", "json"],
            capture_output=True, text=True, cwd=ROOT, env=env, timeout=120,
        )
        payload = parse_json(started.stdout) if "{" in started.stdout else {}
        assert started.returncode == 0 and "run-id" in payload, started.stdout + started.stderr
        run_id = payload["run-id"]
        status, deadline = "", time.time() + 180
        while time.time() < deadline:
            listed = subprocess.run([flwr, "list", "local", "--format", "json"], capture_output=True, text=True,
                                    cwd=ROOT, env=env, timeout=60)
            runs = {r["run-id"]: r for r in parse_json(listed.stdout).get("runs", [])} if "{" in listed.stdout else {}
            status = runs.get(run_id, {}).get("status", "")
            if status.startswith("finished"):
                break
            time.sleep(2)
        if status != "finished:completed":
            log = subprocess.run([flwr, "log", run_id, "local", "--show"], capture_output=True, text=True,
                                 cwd=ROOT, env=env, timeout=60)
            pytest.fail(f"run status {status!r}\n{log.stdout[-5000:]}{log.stderr[-2000:]}")
    finally:
        superlink.terminate()
        try:
            superlink.wait(timeout=15)
        except subprocess.TimeoutExpired:
            superlink.kill()
            superlink.wait(timeout=15)
        stop_processes_with(markers)  # anything of this SuperLink's that outlived it
    assert not [pid for pid, args in processes() if any(m in args for m in markers)]
    assert_ray_gone(env["RAY_TMPDIR"])

    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds"] == 2
    assert [line["round"] for line in metrics(run_dir)] == [1, 2]
    a, b = final_params(run_s[1]), final_params(run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_failing_server_app_exits_non_zero(smoke_data, tmp_path):
    """An exception in the ServerApp (here: raised in its round-2 hook) -> exit 1 with the reason, Ray stopped.

    The fault is injected from outside the project: a ``sitecustomize`` module on the command's
    PYTHONPATH wraps the ServerApp's per-round hook, so no test hook lives in the product.
    """
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(
        "import server.server_app as app\n"
        "_after_round = app.MetaRun.after_round\n"
        "def after_round(self, server_round, arrays):\n"
        "    if self.strategy.true_round(server_round) == 2:\n"
        "        raise RuntimeError('injected ServerApp failure in round 2')\n"
        "    return _after_round(self, server_round, arrays)\n"
        "app.MetaRun.after_round = after_round\n"
    )
    pythonpath = os.pathsep.join(p for p in (str(hooks), str(ROOT), os.environ.get("PYTHONPATH")) if p)
    proc = metafed("simulate", "--config", str(SMOKE), "--set", f"data.root={smoke_data}",
                   "--set", "data.generate=false", "--set", "federation.rounds=3",
                   "--set", f"output_dir={tmp_path / 'runs'}", env={"PYTHONPATH": pythonpath})
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "the run failed" in proc.stderr and "injected ServerApp failure" in proc.stderr
    (run_dir,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "injected ServerApp failure" in summary["reason"]
    assert summary["rounds"] == 1  # the round before the failure is kept


# ------------------------------------------------------------ cohort execution, an existing Ray cluster
def test_simulation_attaches_to_a_running_ray_cluster(run_s, smoke_data, tmp_path):
    """``ray start --head`` here, ``--ray-address`` to it: the run uses that cluster and leaves it running.

    It runs in cohorts (one node per worker of the cluster) and reaches exactly
    the model of run S (one node per site, a local Ray).
    """
    ray_bin = BIN / "ray"
    if not ray_bin.exists():
        pytest.skip("the ray command is not installed beside this Python")
    tmpdir = ray_tmpdir()
    port = free_port()
    env = {**os.environ, "RAY_TMPDIR": tmpdir, "RAY_USAGE_STATS_ENABLED": "0"}
    started = subprocess.run(
        [str(ray_bin), "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
         f"--temp-dir={tmpdir}", "--disable-usage-stats"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    try:
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
        head = ray_processes(tmpdir)
        exe = BIN / "metafed"
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "simulations.cli"]
        proc = subprocess.run(
            [*cmd, "simulate", "--config", str(SMOKE), "--set", f"data.root={smoke_data}",
             "--set", f"output_dir={tmp_path}", "--set", "runtime.cohort=true", "--ray-address", f"127.0.0.1:{port}"],
            capture_output=True, text=True, cwd=ROOT, timeout=400, env=env,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        assert "3 train sites in cohorts over 2 nodes" in proc.stdout  # the cluster's 2 CPUs: 2 workers
        assert head <= ray_processes(tmpdir)  # the cluster outlives the run that attached to it
        (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
        reference, params = final_params(run_s[1]), final_params(run_dir)
        assert all(torch.equal(params[k], reference[k]) for k in reference)
    finally:  # this cluster's processes only (``ray stop`` would stop every Ray on the machine)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in ray_processes(tmpdir):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(2)
        assert_ray_gone(tmpdir)

