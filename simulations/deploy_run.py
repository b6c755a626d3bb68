"""``metafed deploy run``: submit the app to a deployed SuperLink, follow it, and say how it ended.

``flwr run`` returns 0 whether the run completes or fails, and a run whose
ServerApp (or SuperLink) died stays failed. This command:

1. checks its input before anything starts (the experiment config, the app
   folder, the SuperLink connection in ``$FLWR_HOME/config.toml``): exit 2;
2. submits the app with ``flwr run APP CONNECTION --run-config FILE``, the
   whole resolved config written as run-config overrides, plus a ``run-name``
   that fixes the run's directory under the server's ``output_dir``;
3. streams the run's progress lines (``flwr log --stream``) and polls its
   status (``flwr list --run-id``);
4. ends with 0 when Flower says ``finished:completed``; with 1 when it says
   ``finished:failed`` or ``finished:stopped``, printing Flower's reason;
5. when the reason is that the task stopped sending heartbeats (the ServerApp
   or the SuperLink died), resubmits the run with ``resume=<run-name>``, at
   most ``--max-resumes`` times, and says so: the server continues from the
   run directory's last checkpoint (or from round 0 when there is none yet).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from common.config import Config, ConfigError, flatten

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
# Flower's reason for a task whose process died (supercore.corestate).
NO_HEARTBEAT = "No heartbeat"
# A progress line of the ServerApp (server.server_app.format_progress), and the lines worth showing.
PROGRESS = re.compile(r"round \d+/\d+ \|")
SHOWN = re.compile(r"round \d+/\d+ \||WARNING|ERROR|resum|sites known")


class DeployError(ConfigError):
    """Bad input to ``metafed deploy run``; the message says what to fix."""


@dataclass(frozen=True)
class Outcome:
    code: int
    status: str
    reason: str = ""
    run_ids: tuple[int, ...] = ()


def flwr_command() -> str:
    """The ``flwr`` next to this Python (the environment metafed is installed in), else on PATH."""
    beside = Path(sys.executable).with_name("flwr")
    found = str(beside) if beside.is_file() else shutil.which("flwr")
    if not found:
        raise DeployError("the `flwr` command is not installed here: pip install -e . (it comes with flwr)")
    return found


def flwr_home() -> Path:
    return Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr").expanduser()


def check_connection(name: str) -> dict[str, Any]:
    """The ``[superlink.NAME]`` section of ``$FLWR_HOME/config.toml``; raises DeployError."""
    path = flwr_home() / "config.toml"
    if not path.is_file():
        raise DeployError(f"no Flower connection config at {path}: copy deploy/flwr-config.toml there "
                          "(or set FLWR_HOME) and fill in the SuperLink's address and CA certificate")
    try:
        doc = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise DeployError(f"{path} is not valid TOML: {err}") from None
    connections = {k: v for k, v in doc.get("superlink", {}).items() if isinstance(v, dict)}
    if name not in connections:
        raise DeployError(f"no SuperLink connection {name!r} in {path} (it has: {', '.join(sorted(connections)) or 'none'}); "
                          f"add a [superlink.{name}] section with address and root-certificates")
    conn = connections[name]
    if not conn.get("address"):
        raise DeployError(f"[superlink.{name}] in {path} has no address")
    cert = conn.get("root-certificates")
    if cert and not Path(str(cert)).expanduser().is_file():
        raise DeployError(f"[superlink.{name}] root-certificates={cert!r}: no such file")
    return conn


def check_app(app: Path) -> Path:
    app = app.expanduser().resolve()
    pyproject = app / "pyproject.toml"
    if not pyproject.is_file():
        raise DeployError(f"{app} is not a Flower app (no pyproject.toml): give --app the metafed folder")
    try:
        doc = tomllib.loads(pyproject.read_text())
    except tomllib.TOMLDecodeError as err:
        raise DeployError(f"{pyproject} is not valid TOML: {err}") from None
    if "app" not in doc.get("tool", {}).get("flwr", {}):
        raise DeployError(f"{pyproject} has no [tool.flwr.app] section: give --app the metafed folder")
    return app


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return json.dumps(",".join(str(v) for v in value))
    if isinstance(value, float):
        return "inf" if value == float("inf") else ("-inf" if value == float("-inf") else repr(value))
    if isinstance(value, int):
        return str(value)
    return json.dumps(str(value))


def run_config_toml(config: Config, extra: Mapping[str, str]) -> str:
    """Every key of ``config`` as Flower run-config overrides (dotted keys), plus ``extra``.

    ``config-file`` is emptied: the app's default file would otherwise take every
    key that ``config`` leaves at the schema's default (client.sites.config_from_run_config).
    """
    lines = ['"config-file" = ""'] + [f"{key} = {_toml_value(value)}" for key, value in flatten(config).items()]
    lines += [f'"{key}" = {json.dumps(value)}' for key, value in extra.items()]
    return "\n".join(lines) + "\n"


def default_run_name(config: Config) -> str:
    return f"{config.name}-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}"


class Flower:
    """The ``flwr`` commands this one calls, against one SuperLink connection."""

    def __init__(self, *, connection: str, app: Path, timeout: float = 120.0) -> None:
        self.flwr = flwr_command()
        self.connection = connection
        self.app = app
        self.timeout = timeout

    def _json(self, args: list[str]) -> dict[str, Any]:
        done = subprocess.run([self.flwr, *args, "--format", "json"], capture_output=True, text=True,
                              timeout=self.timeout, cwd=self.app)
        text = done.stdout
        start = text.find("{")
        try:
            return json.loads(text[start:]) if start >= 0 else {"success": False, "error-message": done.stderr}
        except json.JSONDecodeError:
            return {"success": False, "error-message": (text + done.stderr).strip()}

    def submit(self, run_config_file: Path) -> int:
        out = self._json(["run", str(self.app), self.connection, "--run-config", str(run_config_file)])
        if not out.get("success") or out.get("run-id") is None:
            message = str(out.get("error-message") or out)
            raise SubmitError(message.strip())
        return int(out["run-id"])

    def status(self, run_id: int) -> tuple[str, str] | None:
        """(status, details) of the run, or None when the SuperLink did not answer."""
        try:
            out = self._json(["list", self.connection, "--run-id", str(run_id)])
        except subprocess.TimeoutExpired:
            return None
        runs = [r for r in out.get("runs", []) if str(r.get("run-id")) == str(run_id)]
        if not out.get("success") or not runs:
            return None
        return str(runs[0].get("status", "")), str(runs[0].get("status-details", "") or "")

    def follow_logs(self, run_id: int, emit: Callable[[str], None]) -> subprocess.Popen:
        """Stream the run's log in a thread; ``emit`` gets each line worth showing."""
        proc = subprocess.Popen([self.flwr, "log", str(run_id), self.connection, "--stream"], cwd=self.app,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                line = line.rstrip()
                if SHOWN.search(line):
                    emit(line)

        threading.Thread(target=pump, daemon=True).start()
        return proc


class SubmitError(RuntimeError):
    """``flwr run`` refused the submission."""


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def follow(
    flower: Flower, run_id: int, *, poll: float, superlink_patience: float, emit: Callable[[str], None],
) -> tuple[str, str]:
    """Wait for the run to finish; (status, details). A SuperLink that stays silent past the patience: failed."""
    logs = flower.follow_logs(run_id, emit)
    silent_since: float | None = None
    try:
        while True:
            got = flower.status(run_id)
            if got is None:
                silent_since = silent_since or time.monotonic()
                if time.monotonic() - silent_since > superlink_patience:
                    return "finished:failed", (f"the SuperLink did not answer for {superlink_patience:.0f}s "
                                               "(--superlink-patience)")
            else:
                silent_since = None
                status, details = got
                if status.startswith("finished"):
                    return status, details
            time.sleep(poll)
    finally:
        _stop(logs)


def deploy_run(
    config: Config,
    *,
    connection: str,
    app: Path,
    run_name: str | None = None,
    max_resumes: int = 2,
    poll: float = 2.0,
    superlink_patience: float = 300.0,
    emit: Callable[[str], None] = print,
) -> Outcome:
    """Submit, follow and (bounded) resume one run; the outcome's code is the command's exit code."""
    if max_resumes < 0:
        raise DeployError(f"--max-resumes must be >= 0; got {max_resumes}")
    if poll <= 0:
        raise DeployError(f"--poll must be > 0; got {poll}")
    check_connection(connection)
    app = check_app(app)
    name = run_name or default_run_name(config)
    if Path(name).name != name or name in (".", ".."):
        raise DeployError(f"--run-name must be a folder name, not a path; got {name!r}")
    flower = Flower(connection=connection, app=app)
    run_ids: list[int] = []
    with tempfile.TemporaryDirectory(prefix="metafed-deploy-") as tmp:
        extra = {"run-name": name}
        for attempt in range(max_resumes + 1):
            overrides = Path(tmp) / f"run-config-{attempt}.toml"
            overrides.write_text(run_config_toml(config, extra))
            try:
                run_id = flower.submit(overrides)
            except SubmitError as err:
                text = str(err)
                code = EXIT_USAGE if not run_ids else EXIT_FAILED
                return Outcome(code, "not submitted", f"flwr run refused the run: {text}", tuple(run_ids))
            run_ids.append(run_id)
            emit(f"run {run_id} submitted to {connection} (run directory {config.output_dir}/{name})")
            status, details = follow(flower, run_id, poll=poll, superlink_patience=superlink_patience, emit=emit)
            if status == "finished:completed":
                emit(f"run {run_id} completed: outputs in {config.output_dir}/{name} on the server")
                return Outcome(EXIT_OK, status, "", tuple(run_ids))
            if NO_HEARTBEAT in details and attempt < max_resumes:
                emit(f"run {run_id} ended: {details} (the ServerApp or the SuperLink died); resuming "
                     f"{name} from its last checkpoint as a new run (resume {attempt + 1} of {max_resumes})")
                extra = {"resume": name}
                continue
            return Outcome(EXIT_FAILED, status, details or status, tuple(run_ids))
    raise AssertionError("unreachable")
