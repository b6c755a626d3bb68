"""The deploy kit end to end on loopback, with real Flower processes.

One SuperLink (TLS, ``--enable-supernode-auth``, ``--database``), the nginx
Fleet proxy in front of it, and two SuperNodes with their own site folders and
privacy policy in their node config, each served by a warm worker, all started
by deploy/'s scripts and shared by the checks below. ``metafed deploy run`` submits the runs.

Flower's task heartbeat is fixed (a dead ServerApp is noticed after 2 x 30 s),
which is most of this module's time; the rest is one ClientApp process per
message at each site.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent
SMOKE = ROOT / "simulations" / "configs" / "smoke.yaml"
SITES = ("site-a", "site-b")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed: make system-deps"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_cmdlines() -> dict[int, str]:
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                raw = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if raw:
                out[int(entry.name)] = raw.replace(b"\0", b" ").decode(errors="replace")
    return out


def children_of(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry.name))
    return kids


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        kids = children_of(todo.pop())
        found += kids
        todo += kids
    return found


class Loopback:
    """What the deploy README has an operator and two sites start, on one machine."""

    def __init__(self, base: Path, data: Path) -> None:
        self.base = base
        self.data = data
        self.certs = base / "certs"
        self.keys = base / "keys"
        self.runs = base / "runs"
        self.link_port, self.proxy_port = free_port(), free_port()
        self.site_ports = {s: free_port() for s in SITES}
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONPATH": str(ROOT),
            "FLWR_HOME": str(base / "flwr-home"),
            "FLWR_TELEMETRY_ENABLED": "0",
        }
        # Every process started here (and their children) names one of these.
        self.markers = [str(base), f"127.0.0.1:{self.link_port}", f"127.0.0.1:{self.proxy_port}",
                        *(f"127.0.0.1:{p}" for p in self.site_ports.values())]

    def sh(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=120, cwd=ROOT)
        if check:
            assert done.returncode == 0, done.stdout + done.stderr
        return done

    def start(self, name: str, *cmd: str) -> subprocess.Popen:
        log = open(self.base / f"{name}.log", "wb")
        proc = subprocess.Popen(list(cmd), env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=self.base,
                                start_new_session=True)
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.base / f"{name}.log").read_text(errors="replace")

    def flwr_json(self, *args: str) -> dict:
        done = self.sh(str(BIN / "flwr"), *args, "--format", "json", check=False)
        text = done.stdout
        return json.loads(text[text.find("{"):]) if "{" in text else {"success": False, "error-message": done.stderr}

    # ------------------------------------------------------------------ set-up
    def up(self) -> None:
        self.sh("sh", str(DEPLOY / "certs.sh"), str(self.certs), "DNS:localhost", "IP:127.0.0.1")
        for name in (*SITES, "rogue"):
            self.sh("sh", str(DEPLOY / "site-key.sh"), str(self.keys), name)
        home = self.base / "flwr-home"
        home.mkdir()
        template = (DEPLOY / "flwr-config.toml").read_text()
        (home / "config.toml").write_text(
            template.replace("127.0.0.1:9093", f"127.0.0.1:{self.link_port}")
            .replace("/etc/metafed/certs/ca.crt", str(self.certs / "ca.crt"))
            # The address the sites are given: the proxy, as seen from a site.
            + f'\n[superlink.exposed]\naddress = "localhost:{self.proxy_port}"\n'
            f'root-certificates = "{self.certs / "ca.crt"}"\n'
        )
        self.start("superlink", "sh", str(DEPLOY / "start-superlink.sh"), str(self.certs), str(self.base / "state"),
                   "127.0.0.1", str(self.link_port))
        self.start("proxy", "sh", str(DEPLOY / "start-proxy.sh"), str(self.certs), str(self.base / "proxy"),
                   f"127.0.0.1:{self.proxy_port}", f"127.0.0.1:{self.link_port}", "localhost")
        self.wait_for(lambda: self.flwr_json("supernode", "list", "metafed").get("success"), 90, "the SuperLink")
        for name in SITES:
            assert self.flwr_json("supernode", "register", str(self.keys / f"{name}.pub"), "metafed")["success"]
        for i, name in enumerate(SITES):
            self.start_site(name, self.data / "train" / f"site-000{i}")
        self.wait_for(lambda: self.online() == len(SITES), 90, "both SuperNodes online")

    def start_site(self, name: str, folder: Path) -> None:
        site = self.base / name
        site.mkdir(exist_ok=True)
        policy = (DEPLOY / "site.toml").read_text()
        policy = policy.replace("/srv/metafed/site", str(folder)).replace('site-id = "hospital-a"\n', "")
        policy += f'privacy-ledger-dir = "{site / "ledger"}"\nworker-dir = "{site / "worker"}"\n'
        (site / "site.toml").write_text(policy)
        self.start(name, "sh", str(DEPLOY / "start-site.sh"), f"localhost:{self.proxy_port}",
                   str(self.certs / "ca.crt"), str(self.keys / name), str(site / "site.toml"),
                   str(self.site_ports[name]))

    def online(self) -> int:
        nodes = self.flwr_json("supernode", "list", "metafed").get("nodes", [])
        return sum(1 for n in nodes if n.get("status") == "online")

    @staticmethod
    def wait_for(condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            time.sleep(0.5)
        pytest.fail(f"{what}: not ready within {timeout:.0f}s")

    # ------------------------------------------------------------------ runs
    def deploy_run(self, run_name: str, *sets: str) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "simulations.cli", "deploy", "run", "metafed", "--config", str(SMOKE),
               "--run-name", run_name, "--poll", "1", *run_settings(self.runs, self.data), *sets]
        return self.start(f"deploy-{run_name}", *cmd)

    def serverapps(self) -> list[int]:
        link = self.procs["superlink"].pid
        table = proc_cmdlines()
        return [p for p in descendants(link) if "flwr-serverapp" in table.get(p, "")]

    # ---------------------------------------------------------------- clean-up
    def ours(self) -> list[int]:
        me = os.getpid()
        return [p for p, cmd in proc_cmdlines().items() if p != me and any(m in cmd for m in self.markers)]

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 15
        while self.ours() and time.monotonic() < deadline:
            time.sleep(0.3)
        for pid in self.ours():  # what did not stop on SIGTERM
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


def run_settings(runs: Path, data: Path) -> list[str]:
    """The smoke experiment for two deployed sites: a meta-test on one held-out site named by path."""
    settings = {
        "output_dir": str(runs),
        "data.test_paths": f"[{data / 'test' / 'site-0000'}]",
        "federation.min_sites": 2, "federation.sites_per_round": 2, "federation.rounds": 2,
        "federation.checkpoint_every": 1, "federation.eval_every": 2, "federation.eval_episodes": 6,
        "federation.discovery_timeout": 120, "federation.round_timeout": 120,
    }
    return [x for k, v in settings.items() for x in ("--set", f"{k}={v}")]


@pytest.fixture(scope="module")
def two_site_data(tmp_path_factory) -> Path:
    """The smoke benchmark with only the two deployed sites in train/ (the simulation's reference sees these)."""
    import dataclasses

    from common.config import load
    from common.data import ensure_benchmark

    gen = tmp_path_factory.mktemp("bench") / "data"
    ensure_benchmark(dataclasses.replace(load(SMOKE).data, root=str(gen)))
    root = tmp_path_factory.mktemp("two-sites") / "data"
    for i in range(2):
        shutil.copytree(gen / "train" / f"site-000{i}", root / "train" / f"site-000{i}")
    shutil.copytree(gen / "test", root / "test")
    return root


@pytest.fixture(scope="module")
def federation(tmp_path_factory, two_site_data):
    base = tmp_path_factory.mktemp("loopback")
    fed = Loopback(base, two_site_data)
    try:
        fed.up()
        yield fed
    finally:
        fed.close()


def test_an_unregistered_key_is_refused(federation):
    fed = federation
    proc = fed.start("rogue", str(BIN / "flower-supernode"), "--superlink", f"localhost:{fed.proxy_port}",
                     "--root-certificates", str(fed.certs / "ca.crt"), "--auth-supernode-private-key",
                     str(fed.keys / "rogue"), "--node-config", f'data-path="{fed.data / "train" / "site-0001"}"',
                     "--port", str(free_port()), "--max-retries", "0")
    code = proc.wait(timeout=120)
    assert code != 0
    assert "Failed to activate SuperNode" in fed.log("rogue")
    assert fed.online() == len(SITES)


def test_the_proxy_refuses_registration_and_the_control_api(federation):
    fed = federation
    registered = fed.flwr_json("supernode", "register", str(fed.keys / "rogue.pub"), "exposed")
    assert not registered["success"] and "403" in registered["error-message"]
    listed = fed.flwr_json("list", "exposed")
    assert not listed["success"] and "403" in listed["error-message"]
    # The sites train through the same address: their calls are Fleet API calls only.
    access = (fed.base / "proxy" / "access.log").read_text().splitlines()
    fleet = [line for line in access if '"POST /v1/fleet/' in line and '" 200 ' in line]
    assert fleet and all("/v1/fleet/" in line or '" 403 ' in line for line in access)


def test_a_dead_serverapp_is_resumed_and_ends_at_the_uninterrupted_model(federation, two_site_data, tmp_path):
    import torch

    fed = federation
    run = fed.deploy_run("resumed")
    run_dir = fed.runs / "resumed"
    # After round 1's checkpoint, before the run ends: kill the ServerApp.
    fed.wait_for(lambda: (run_dir / "checkpoints" / "round-000001").is_dir() or run.poll() is not None, 300,
                 "round 1's checkpoint")
    assert run.poll() is None, fed.log("deploy-resumed")
    victims = fed.serverapps()
    assert victims, "no flwr-serverapp process under the SuperLink"
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    # Meanwhile (Flower notices the loss after its heartbeat patience), the uninterrupted reference.
    reference = subprocess.run(
        [sys.executable, "-m", "simulations.cli", "simulate", "--config", str(SMOKE),
         "--set", f"data.root={two_site_data}", "--set", "data.generate=false",
         *run_settings(tmp_path / "reference", two_site_data)],
        env=fed.env, capture_output=True, text=True, timeout=400, cwd=ROOT,
    )
    assert reference.returncode == 0, reference.stdout + reference.stderr
    assert run.wait(timeout=400) == 0, fed.log("deploy-resumed")
    out = fed.log("deploy-resumed")
    assert "No heartbeat" in out and "resuming resumed from its last checkpoint" in out
    assert "completed" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds"] == 2
    ref_dir = next((tmp_path / "reference").iterdir())
    resumed = torch.load(run_dir / "final_params.pt")
    uninterrupted = torch.load(ref_dir / "final_params.pt")
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)


def test_a_lost_site_leaves_the_round_to_the_other_counted_once(federation):
    fed = federation
    # The round with the lost site ends when the SuperLink declares its node unavailable
    # (2 x its 30 s heartbeat interval) and answers for it: within the round timeout.
    run = fed.deploy_run("lost-site")
    run_dir = fed.runs / "lost-site"
    metrics = run_dir / "metrics.jsonl"
    fed.wait_for(lambda: (metrics.is_file() and metrics.read_text().strip()) or run.poll() is not None, 300,
                 "round 1")
    assert run.poll() is None, fed.log("deploy-lost-site")
    os.killpg(fed.procs["site-b"].pid, signal.SIGKILL)  # the SuperNode and its ClientApp processes
    assert run.wait(timeout=300) == 0, fed.log("deploy-lost-site")
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    print(f"round seconds with 2 sites, then 1 of 2: {[round(x['round_seconds'], 1) for x in lines]}")
    assert [line["sites_replied"] for line in lines] == [2, 1]
    last = lines[-1]
    lost = last["sites_failed"] + last["sites_missing"] + (last["sites_sampled"] == 1)
    assert lost == 1, last  # once: a failure, or missing, or no longer sampled
    assert all(f["site"] in ("train-0000", "train-0001") for f in last.get("failures", []))


def test_every_process_started_is_gone_at_the_end(federation):
    started = federation.ours()
    # The SuperLink, the proxy, the SuperNodes, their SuperExecs and the warm workers are seen
    assert len(started) >= 5 and any("client.worker" in proc_cmdlines().get(p, "") for p in started)
    federation.close()
    left = {p: c for p, c in proc_cmdlines().items() if p in federation.ours()}
    assert not left, f"processes left running: {left}"
