"""The Flower ClientApp that ``flwr run`` loads: metafed's own, or a thin shim in front of a warm worker.

A node whose node config sets ``warm-worker = true`` (a deployed site) gets
the shim: no torch import, it hands each message's records to the site's warm
worker (:mod:`client.worker`) over a Unix socket with an authentication key,
and returns the worker's reply. When no worker answers, the shim starts one
(it lives on for ``worker-idle-timeout`` seconds after its last message) and,
if it cannot, answers with an error reply that says why. The socket and the
key live in ``worker-dir`` (node config; default a folder of the user's in
the system's temporary folder, mode 0700).

Any other node (a simulation, a site without the key) gets
:data:`client.client_app.app` in this process, as before.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Client
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.error import Error
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

WARM_KEY = "warm-worker"
WORKER_DIR_KEY = "worker-dir"
IDLE_KEY = "worker-idle-timeout"
START_TIMEOUT = 120.0  # seconds for a worker to import torch and listen
APP_ROOT = Path(__file__).resolve().parents[1]


def is_warm(node_config: dict[str, Any]) -> bool:
    value = node_config.get(WARM_KEY, False)
    return value is True or str(value).lower() == "true"


# ------------------------------------------------------------- plain records
def plain_records(content: RecordDict) -> dict[str, dict]:
    """A message's records as dicts of numpy arrays and plain values (what crosses the socket)."""
    return {
        "arrays": {k: {n: a.numpy() for n, a in rec.items()} for k, rec in content.array_records.items()},
        "configs": {k: dict(rec) for k, rec in content.config_records.items()},
        "metrics": {k: dict(rec) for k, rec in content.metric_records.items()},
    }


def records_from(plain: dict[str, dict]) -> RecordDict:
    from flwr.app import Array

    out = RecordDict()
    for key, arrays in plain.get("arrays", {}).items():
        out[key] = ArrayRecord({n: Array(v) for n, v in arrays.items()})
    for key, values in plain.get("configs", {}).items():
        out[key] = ConfigRecord(values)
    for key, values in plain.get("metrics", {}).items():
        out[key] = MetricRecord(values)
    return out


def message_from(request: dict[str, Any]) -> Message:
    """The worker's copy of the message (its identity set by the caller)."""
    return Message(records_from(request), dst_node_id=int(request["node_id"]), message_type=request["kind"])


def plain_reply(reply: Message) -> dict[str, Any]:
    if reply.has_error():
        return {"error": (int(reply.error.code), str(reply.error.reason))}
    return plain_records(reply.content)


# --------------------------------------------------------------- the worker
def worker_paths(node_config: dict[str, Any]) -> tuple[Path, Path]:
    """The worker's socket and key file: one worker per site folder and app version."""
    folder = Path(str(node_config.get(WORKER_DIR_KEY, "") or Path(tempfile.gettempdir()) / f"metafed-{os.getuid()}"))
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = folder.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        # Another user could read the key, or put a socket of theirs in its place.
        raise PermissionError(f"{folder} ({WORKER_DIR_KEY}) must be this user's own and mode 0700 (chmod 700 it), "
                              f"or set {WORKER_DIR_KEY} to such a folder")
    ident = hashlib.sha256(f"{node_config.get('data-path', '')}\0{APP_ROOT}".encode()).hexdigest()[:16]
    return folder / f"worker-{ident}.sock", folder / f"worker-{ident}.key"


def _authkey(key_file: Path) -> bytes:
    if not key_file.exists():
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
    return key_file.read_bytes()


def start_worker(socket_path: Path, key_file: Path, idle: float) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(APP_ROOT), os.environ.get("PYTHONPATH", "")])}
    log = open(socket_path.with_suffix(".log"), "ab")
    return subprocess.Popen([sys.executable, "-m", "client.worker", str(socket_path), str(key_file), str(idle)],
                            cwd=APP_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)


def ask_worker(request: dict[str, Any], node_config: dict[str, Any]) -> dict[str, Any]:
    """Send the request to the site's worker (starting it when none answers); its plain reply."""
    socket_path, key_file = worker_paths(node_config)
    authkey = _authkey(key_file)
    started: subprocess.Popen | None = None
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            with Client(str(socket_path), family="AF_UNIX", authkey=authkey) as conn:
                conn.send(request)
                return conn.recv()
        except (FileNotFoundError, ConnectionRefusedError, EOFError):
            if started is None:
                started = start_worker(socket_path, key_file, float(node_config.get(IDLE_KEY, 600.0)))
            elif started.poll() is not None:
                raise RuntimeError(f"the site's warm worker exited with code {started.returncode}: see "
                                   f"{socket_path.with_suffix('.log')}") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"the site's warm worker did not listen on {socket_path} within "
                                   f"{START_TIMEOUT:.0f}s: see {socket_path.with_suffix('.log')}") from None
            time.sleep(0.2)


def stop_worker(node_config: dict[str, Any]) -> bool:
    """End the site's worker if one is listening; True if one was."""
    socket_path, key_file = worker_paths(node_config)
    if not key_file.exists():
        return False
    try:
        with Client(str(socket_path), family="AF_UNIX", authkey=key_file.read_bytes()) as conn:
            conn.send({"kind": "stop"})
            return bool(conn.recv().get("stopped"))
    except (FileNotFoundError, ConnectionRefusedError, EOFError):
        return False


def forward(msg: Message, context: Context) -> Message:
    node_config = dict(context.node_config)
    request = {"kind": msg.metadata.message_type, "run_id": context.run_id, "node_id": context.node_id,
               "node_config": node_config, "run_config": dict(context.run_config), **plain_records(msg.content)}
    try:
        reply = ask_worker(request, node_config)
    except Exception as err:  # noqa: BLE001 - a clear error reply, never a crash of the ClientApp
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"warm worker: {err}"), reply_to=msg)
    if "error" in reply:
        code, reason = reply["error"]
        return Message(Error(code=int(code), reason=str(reason)), reply_to=msg)
    return Message(records_from(reply), reply_to=msg)


def make_shim_app() -> ClientApp:
    app = ClientApp()

    def handle(msg: Message, context: Context) -> Message:
        if is_warm(dict(context.node_config)):
            return forward(msg, context)
        from client.client_app import app as in_process  # torch, in this process

        return in_process(msg, context)

    app.train()(handle)
    app.evaluate()(handle)
    app.query()(handle)
    return app


# `flwr run .` loads this object (pyproject: [tool.flwr.app.components]).
app = make_shim_app()
