"""Worker deaths and hangs survived, start-up waited for, a killed command leaves no Ray behind.

The two simulations are real Flower runs on the Ray backend through
``simulations.runner.simulate`` and the ``metafed`` command. The faulty
ClientApp (``faulty_workers.py``) wraps metafed's own and, for chosen sites,
ends its worker process (``os._exit``, SIGKILL) or never returns.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "simulations" / "configs" / "smoke.yaml"
FAULTY = Path(__file__).resolve().parent / "faulty_workers.py"
PYTHON = sys.executable


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class Descendants(threading.Thread):
    """Notes every process below ``pid`` while it runs (Ray's agents rename themselves:
    their command lines do not tell which Ray they belong to, their ancestry does)."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.seen, self.done = pid, {}, threading.Event()

    def run(self) -> None:
        from simulations.watchdog import descendants

        while not self.done.is_set() and alive(self.pid):
            self.seen.update(descendants(self.pid))
            time.sleep(0.3)

    def running(self) -> list[int]:
        """Those still running (a zombie has ended; a pid with another start time is another process)."""
        from simulations.watchdog import _stat

        return [p for p, start in self.seen.items() if (info := _stat(p)) and info[1] == start and alive(p)]

    def seconds_until_gone(self, limit: float = 30.0) -> float:
        start = time.monotonic()
        while self.running() and time.monotonic() - start < limit:
            time.sleep(0.2)
        return time.monotonic() - start

    def kill_left(self) -> None:
        for pid in self.running():  # only processes this test's command started
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


# ----------------------------------------------------------------------- watchdog


def test_the_watchdog_ends_what_a_killed_command_started_and_nothing_else(tmp_path):
    """A parent that starts the watchdog, then a child that starts a grandchild, is SIGKILLed."""
    older = subprocess.Popen(["sleep", "120"])  # the test's own process: never the watchdog's business
    script = textwrap.dedent(f"""
        import os, subprocess, sys, time
        sys.path.insert(0, {str(ROOT)!r})
        before = subprocess.Popen(["sleep", "120"])  # a child from before the watchdog
        from simulations import watchdog
        guard = watchdog.start()
        child = subprocess.Popen([sys.executable, "-c",
            "import subprocess, time; p = subprocess.Popen(['sleep', '120']); print(p.pid, flush=True); time.sleep(120)"],
            stdout=subprocess.PIPE, text=True)
        grandchild = int(child.stdout.readline())
        print(before.pid, guard.pid, child.pid, grandchild, flush=True)
        time.sleep(120)
    """)
    parent = subprocess.Popen([PYTHON, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        before, guard, child, grandchild = map(int, parent.stdout.readline().split())
        time.sleep(1.5)  # the watchdog has seen them
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 10
        while (alive(child) or alive(grandchild) or alive(guard)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(child) and not alive(grandchild), "descendants outlived the killed parent"
        assert not alive(guard), "the watchdog did not end"
        assert alive(before) and older.poll() is None, "a process from before the watchdog was killed"
    finally:
        for pid in (before, child, grandchild):
            try:
                os.kill(pid, signal.SIGKILL)
            except (OSError, UnboundLocalError):
                pass
        older.kill()
        older.wait()


# ----------------------------------------------------------- share of failed rounds


def _finished_run(tmp_path, history, **overrides):
    from common.config import load
    from server.server_app import MetaRun
    from server.state import ServerState

    config = load(SMOKE, overrides={"output_dir": str(tmp_path), "federation.rounds": len(history), **overrides})
    run = MetaRun(config, tmp_path / "run")
    run.state = ServerState(params={"w": torch.zeros(2)}, opt_state={}, round=len(history), history=history)
    run.finish()
    return run.run_dir


def _line(r, sampled, replied):
    return {"round": r, "sites_sampled": sampled, "sites_replied": replied, "sites_failed": sampled - replied,
            "sites_invalid": 0, "sites_missing": 0, "train": {}}


def test_a_run_with_too_many_rounds_without_an_update_fails_and_says_why(tmp_path, capsys):
    from simulations.runner import report_summary

    history = [_line(1, 3, 0), _line(2, 3, 3), _line(3, 0, 0), _line(4, 3, 0)]
    run_dir = _finished_run(tmp_path / "a", history, **{"federation.max_failed_round_share": 0.5})
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert "3 of 4 rounds had no valid site update (rounds 1, 3, 4)" in summary["reason"]
    assert report_summary(run_dir) == 1
    assert "federation.max_failed_round_share=0.5" in capsys.readouterr().err
    # At the share exactly, the run completed.
    run_dir = _finished_run(tmp_path / "b", history, **{"federation.max_failed_round_share": 0.75})
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    assert report_summary(run_dir) == 0


def test_under_poisson_sampling_a_round_that_sampled_no_site_is_not_a_failure(tmp_path):
    from server.server_app import failed_rounds

    history = [_line(1, 0, 0), _line(2, 2, 0), _line(3, 2, 2)]
    assert failed_rounds(history, poisson=True) == [2]
    assert failed_rounds(history, poisson=False) == [1, 2]


# ------------------------------------------------------------------- site discovery


class SlowGrid:
    """Nodes of which only ``answering`` reply to the site query within the timeout."""

    def __init__(self, nodes: int, answering: int) -> None:
        self.nodes = list(range(1, nodes + 1))
        self.answering = set(self.nodes[:answering])
        self.timeouts: list[float] = []

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout=None):
        self.timeouts.append(timeout)
        from client import wire

        return [
            Message(RecordDict({wire.SITE: ConfigRecord({wire.SITE_ID: f"site-{m.metadata.dst_node_id}"})}),
                    reply_to=m)
            for m in messages
            if m.metadata.message_type == MessageType.QUERY and m.metadata.dst_node_id in self.answering
        ]


def _strategy(**overrides):
    from common.algorithms import server_opt
    from common.config import from_dict
    from server.state import ServerState
    from server.strategy import MetaStrategy

    config = from_dict({}, {"federation.round_timeout": 7.0, "federation.discovery_timeout": 90.0, **overrides})
    params = {"w": torch.zeros(2)}
    state = ServerState(params=params, opt_state=server_opt.init_state(params, config=config.server_opt))
    return MetaStrategy(config, state, expected_nodes=4)


def test_site_discovery_has_its_own_timeout_and_says_how_many_answered(task_identity, caplog):
    strategy, grid = _strategy(), SlowGrid(4, answering=2)
    with caplog.at_level("WARNING"):
        sites = strategy.discover(grid)
    assert [s for s, _ in sites] == ["site-1", "site-2"]
    assert grid.timeouts == [90.0]  # the first query waits for start-up: discovery_timeout, not round_timeout
    assert "2 of 4 nodes answered the site query" in caplog.text and "federation.discovery_timeout=90s" in caplog.text
    grid.answering = set(grid.nodes)
    assert len(strategy.discover(grid)) == 4
    assert grid.timeouts == [90.0, 7.0]  # later queries wait a round's timeout at most


def test_no_node_answering_is_an_error_not_a_round_on_zero_sites(task_identity):
    with pytest.raises(TimeoutError, match="federation.discovery_timeout"):
        _strategy().discover(SlowGrid(4, answering=0))


# -------------------------------------------------------------------- simulations


@pytest.fixture(scope="module")
def user_sites(tmp_path_factory) -> Path:
    """User site folders (no benchmark.yaml): the smoke sites, copies of one, and a bad manifest."""
    import dataclasses

    from common.config import load
    from common.data import ensure_benchmark

    base = tmp_path_factory.mktemp("sites")
    gen = base / "generated"
    ensure_benchmark(dataclasses.replace(load(SMOKE).data, root=str(gen)))
    root = base / "user"
    shutil.copytree(gen / "train", root / "train")
    shutil.copytree(gen / "test", root / "test")
    for name in ("site-0003", "site-0004", "site-0005", "site-0006"):
        copy = shutil.copytree(root / "train" / "site-0000", root / "train" / name)
        # A copy is another site: its own site id (a site's one identifier is its manifest's).
        manifest = copy / "manifest.yaml"
        manifest.write_text(manifest.read_text().replace("site_id: train-0000", f"site_id: {name}", 1))
    (root / "train" / "site-0006" / "manifest.yaml").write_text("site_id: [unclosed\n")
    return root


def run_timed(cmd: list[str], env: dict[str, str], timeout: float = 400):
    """Run ``cmd``; return its exit code, its output lines with their arrival times, its exit time
    and the processes it started."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env)
    tracked = Descendants(proc.pid)
    tracked.start()
    lines: list[tuple[float, str]] = []
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        lines.append((time.monotonic(), line.rstrip("\n")))
        if time.monotonic() > deadline:
            proc.kill()
            break
    code = proc.wait()
    return code, lines, time.monotonic(), tracked


@pytest.mark.slow
@pytest.mark.integration
def test_dead_and_hung_workers_cost_only_their_own_replies(user_sites, tmp_path):
    """Round 1: one site's worker calls os._exit, another's is SIGKILLed. Round 2: a third hangs.

    Every other site replies in round 2, the site with a bad manifest is left
    out (data.generate is true on these user sites, and data.on_invalid_site=warn
    lets the run start without it), and the command ends
    within seconds of its last round with no Ray process left.
    """
    faults = {"site-0003": ["exit", [1]], "site-0004": ["kill", [1]], "site-0005": ["hang", [2]]}
    out = tmp_path / "runs"
    cmd = [PYTHON, str(FAULTY), str(SMOKE), json.dumps(faults),
           "--set", f"data.root={user_sites}", "--set", "data.generate=true", "--set", f"output_dir={out}",
           "--set", "data.on_invalid_site=warn",
           "--set", "federation.rounds=2", "--set", "federation.sites_per_round=7",
           "--set", "federation.round_timeout=45", "--set", "federation.eval_every=2",
           "--set", "federation.checkpoint_every=2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    code, lines, ended, tracked = run_timed(cmd, env)
    text = "\n".join(line for _, line in lines)
    gone_after = tracked.seconds_until_gone()
    left = tracked.running()
    tracked.kill_left()
    assert code == 0, text[-5000:]

    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    rounds = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    failed = [{f["site"] for f in line.get("failures", [])} for line in rounds]
    # Round 1: the two dead workers' sites and the bad site fail; the others reply.
    assert failed[0] == {"site-0003", "site-0004", "site-0006"}
    assert rounds[0]["sites_replied"] == 4 and rounds[0]["sites_missing"] == 0
    # Round 2: every site but the hung one and the bad one replies, the two whose workers died included.
    assert failed[1] == {"site-0006"}
    assert rounds[1]["sites_replied"] == 5 and rounds[1]["sites_missing"] == 1
    assert "site-0006" in text and "left out" in text
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"

    # The end: the last progress line, then the command's exit.
    last_round = max(t for t, line in lines if line.startswith("round 2/2"))
    print(f"exit {ended - last_round:.1f}s after the last round; its processes gone {gone_after:.1f}s after exit "
          f"({len(tracked.seen)} seen)")
    assert ended - last_round < 60, f"the command took {ended - last_round:.0f}s to end after its last round"
    assert len(tracked.seen) >= 5  # Ray's GCS, raylet, agents and workers were seen
    assert not left, f"processes left running: {left}"


@pytest.mark.slow
@pytest.mark.integration
def test_a_killed_command_leaves_no_ray_process(tmp_path, user_sites):
    """SIGKILL of `metafed simulate` mid-run: every process it started ends within seconds."""
    data = tmp_path / "data"
    shutil.copytree(user_sites / "train" / "site-0000", data / "train" / "site-0000")
    shutil.copytree(user_sites / "train" / "site-0001", data / "train" / "site-0001")
    cmd = [PYTHON, "-m", "simulations.cli", "simulate", "--config", str(SMOKE),
           "--set", f"data.root={data}", "--set", "data.generate=false", "--set", f"output_dir={tmp_path / 'runs'}",
           "--set", "federation.rounds=500", "--set", "federation.eval_every=0", "--set", "federation.sites_per_round=2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env)
    tracked = Descendants(proc.pid)
    tracked.start()
    try:
        for line in proc.stdout:
            if line.startswith("round 1/"):
                break
        time.sleep(1.0)  # the tracker has seen the workers of round 1
        names = {Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")[0].decode() for p in tracked.running()}
        assert any("ClientAppActor" in n for n in names) and any("Agent" in n for n in names), names
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        gone_after = tracked.seconds_until_gone()
        left = tracked.running()
        print(f"all {len(tracked.seen)} processes gone {gone_after:.1f}s after SIGKILL")
        assert not left, f"processes outlived the killed command: {left}"
        assert gone_after < 15
    finally:
        if proc.poll() is None:
            proc.kill()
        tracked.done.set()
        tracked.kill_left()
