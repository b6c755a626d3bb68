"""A ClientApp around metafed's own that makes chosen sites' workers die or hang.

``FAULTS`` maps a site id to ``(kind, rounds)``: ``"exit"`` ends the worker
process with ``os._exit`` (no cleanup, as a crash in native code), ``"kill"``
sends it SIGKILL, ``"hang"`` never returns. Every other call goes to the real
handlers unchanged.

    python tests/reliability/faulty_workers.py CONFIG_YAML FAULTS_JSON [--set KEY=VALUE ...]

runs ``simulations.runner.simulate`` with it and exits with its code.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path


def make_faulty_app(config, faults: dict[str, tuple[str, list[int]]]):
    from flwr.clientapp import ClientApp

    from client import sites
    from client.client_app import make_client_app

    real = make_client_app(config)
    app = ClientApp()

    @app.train()
    def train(msg, context):
        named = str(msg.content["config"].get("site-id", ""))  # the site the server assigned this node
        site_id = sites.site_ref(config, context.node_config, site_id=named).site_id
        kind, rounds = faults.get(site_id, ("", []))
        if int(msg.content["config"]["round"]) in rounds:
            print(f"fault: site {site_id} {kind} in round {msg.content['config']['round']}", flush=True)
            if kind == "exit":
                os._exit(3)
            if kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if kind == "hang":
                time.sleep(3600)
        return real(msg, context)

    @app.evaluate()
    def evaluate(msg, context):
        return real(msg, context)

    @app.query()
    def query(msg, context):
        return real(msg, context)

    return app


def main(argv: list[str]) -> int:
    from common.config import load
    from simulations.runner import simulate

    config_path, faults_json, *rest = argv
    overrides = [rest[i + 1] for i in range(0, len(rest), 2) if rest[i] == "--set"]
    faults = {site: (kind, list(rounds)) for site, (kind, rounds) in json.loads(faults_json).items()}
    config = load(config_path, overrides=overrides)
    return simulate(config, client_app_factory=lambda cfg: make_faulty_app(cfg, faults))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # as the metafed command does: Ray's native threads slow a normal exit
