"""A site's warm worker: one long-lived process that serves the site's messages.

Flower starts one ClientApp process per message, and each would pay torch's
import, the engine's build and the site's loading again. A warm worker pays
them once: it imports torch and the engine when it starts, and keeps the
engine, the validated site data and the privacy ledger (all cached per
process, :mod:`client.sites`) across messages and runs. The ClientApp
(:mod:`client.shim_app`, no torch import) hands it each message's records over
a Unix socket with an authentication key (``multiprocessing.connection``:
HMAC challenge on connect), and returns its reply.

The worker runs metafed's own ClientApp (:func:`client.client_app.make_client_app`)
on the message, so a warm site answers exactly as a cold one. It exits after
``idle_timeout`` seconds without a message.

    python -m client.worker SOCKET AUTHKEY_FILE [IDLE_TIMEOUT]
"""

from __future__ import annotations

import os
import sys
from multiprocessing.connection import Listener
from pathlib import Path
from typing import Any

# Request / reply: plain Python and numpy values only (pickled over the socket).
#   request: {"kind", "run_id", "node_id", "node_config", "run_config",
#             "arrays": {record: {name: ndarray}}, "configs": {record: dict}, "metrics": {record: dict}}
#   reply:   {"error": (code, reason)} or {"arrays": ..., "configs": ..., "metrics": ...}


STOP = "stop"  # a request that ends the worker


def serve(socket_path: str, authkey: bytes, *, idle_timeout: float = 600.0) -> None:
    """Answer requests until ``idle_timeout`` seconds pass without one."""
    from flwr.app import Context, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from client import shim_app
    from client.client_app import make_client_app

    app = make_client_app()
    path = Path(socket_path)
    if path.exists():
        path.unlink()
    listener = Listener(str(path), family="AF_UNIX", authkey=authkey)
    os.chmod(path, 0o600)
    listener._listener._socket.settimeout(idle_timeout)  # accept() gives up after the idle time
    try:
        while True:
            try:
                conn = listener.accept()
            except (TimeoutError, OSError):
                return
            with conn:
                try:
                    request = conn.recv()
                except (EOFError, OSError):
                    continue
                if request.get("kind") == STOP:
                    conn.send({"stopped": True})
                    return
                TaskIdentity.run_id = int(request["run_id"])
                TaskIdentity.node_id = int(request["node_id"])
                TaskIdentity.task_id = 1
                msg = shim_app.message_from(request)
                context = Context(run_id=int(request["run_id"]), node_id=int(request["node_id"]),
                                  node_config=dict(request["node_config"]), state=RecordDict(),
                                  run_config=dict(request["run_config"]))
                try:
                    reply = app(msg, context)
                    conn.send(shim_app.plain_reply(reply))
                except Exception as err:  # noqa: BLE001 - the site answers with the error
                    conn.send({"error": (0, f"{type(err).__name__}: {err}")})
    finally:
        listener.close()
        if path.exists():
            path.unlink()


def main(argv: list[str]) -> int:
    socket_path, key_file = argv[0], argv[1]
    idle = float(argv[2]) if len(argv) > 2 else 600.0
    authkey = Path(key_file).read_bytes()
    # The heavy imports now, before the first message.
    import torch  # noqa: F401

    import common.task  # noqa: F401

    serve(socket_path, authkey, idle_timeout=idle)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
