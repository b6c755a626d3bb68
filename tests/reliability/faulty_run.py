"""A real Flower simulation in which one site corrupts its train reply, a different way each round.

    python -m tests.reliability.faulty_run DATA_ROOT RUN_DIR RECORD_DIR

The ClientApp wraps the project's own (:func:`client.client_app.make_client_app`):
every site trains for real; the attacking site then corrupts the reply the real
handler built, as :data:`SCHEDULE` says for the round. Every site writes what it
received (theta) and what it sent (phi, episodes, the case) to RECORD_DIR, so
that a test can recompute the server's aggregate from the replies it should
have accepted. The ServerApp is the project's (:func:`server.server_app.make_server_app`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import sites, wire
from client.client_app import make_client_app
from common.config import Config, load

SMOKE = Path(__file__).resolve().parents[2] / "simulations" / "configs" / "smoke.yaml"
ATTACKER = "train-0003"  # the manifest site id of train/site-0003
# Round -> what the attacking site does to its reply.
SCHEDULE = {
    1: "honest",
    2: "stale_replay",  # round 1's accepted phi again
    3: "finite_1e30",
    4: "scaled_x100",
    5: "wrong_round",  # labelled with round 4's round and nonce
    6: "oversized_extra_array",
    7: "sign_flip",  # accepted by the mean: not a norm outlier
    8: "metrics_out_of_range",  # accepted; its metrics are dropped
    9: "raises",
}
ROUNDS = len(SCHEDULE)
REJECTED = {"stale_replay": "replayed", "finite_1e30": "update_norm", "scaled_x100": "update_norm",
            "wrong_round": "wrong_round", "oversized_extra_array": "oversized"}


def fault_config(data_root: str | Path, run_dir: str | Path) -> Config:
    return load(SMOKE, overrides=[
        f"data.root={Path(data_root).resolve()}", "data.num_train_sites=4", "data.generate=false",
        f"output_dir={Path(run_dir).resolve().parent}", "federation.sites_per_round=4",
        f"federation.rounds={ROUNDS}", f"federation.eval_every={ROUNDS}", f"federation.checkpoint_every={ROUNDS}",
    ])


def _tree(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return wire.record_to_tree(record)


def make_faulty_client_app(config: Config, record_dir: str | Path) -> ClientApp:
    real = make_client_app(config)
    record_dir = Path(record_dir)
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        named = str(msg.content[wire.CONFIG].get(wire.SITE_FOR, ""))  # the site the server assigned this node
        site_id = sites.site_ref(config, context.node_config, site_id=named).site_id
        r = int(msg.content[wire.CONFIG]["round"])
        case = SCHEDULE[r] if site_id == ATTACKER else "honest"
        if case == "raises":
            raise ValueError(f"cannot read {config.data.root}/train/{site_id}/labels.npy: injected fault")
        honest = real(msg, context)
        theta = _tree(msg.content[wire.ARRAYS])
        phi = _tree(honest.content[wire.ARRAYS])
        metrics = dict(honest.content[wire.METRICS])
        echo = honest.content[wire.REPLY]
        extra: dict[str, np.ndarray] = {}
        if case == "stale_replay":
            phi = torch.load(record_dir / f"r{r - 1:02d}-{site_id}.pt")["phi"]
        elif case == "finite_1e30":
            phi = {k: torch.full_like(v, 1e30) for k, v in phi.items()}
        elif case == "scaled_x100":
            phi = {k: theta[k] + 100.0 * (phi[k] - theta[k]) for k in phi}
        elif case == "sign_flip":
            phi = {k: theta[k] - (phi[k] - theta[k]) for k in phi}
        elif case == "wrong_round":
            echo = ConfigRecord(json.loads((record_dir / f"r{r - 1:02d}-{site_id}.echo").read_text()))
        elif case == "oversized_extra_array":
            extra["extra"] = np.zeros(4 * sum(v.numel() for v in phi.values()) + 2**18, np.float32)
        elif case == "metrics_out_of_range":
            metrics.update({"train_loss": -5.0, "adapted_loss": float("nan"), "query_accuracy": 3.0})
        arrays = wire.tree_to_record(phi)
        for k, v in extra.items():
            arrays[k] = Array(v)
        torch.save({"theta": theta, "phi": phi, "episodes": int(metrics[wire.NUM_EXAMPLES]), "case": case,
                    "metrics": {k: v for k, v in metrics.items() if k != wire.NUM_EXAMPLES}},
                   record_dir / f"r{r:02d}-{site_id}.pt")
        (record_dir / f"r{r:02d}-{site_id}.echo").write_text(json.dumps(dict(honest.content[wire.REPLY])))
        content = RecordDict({wire.ARRAYS: arrays, wire.METRICS: MetricRecord(metrics), wire.REPLY: echo})
        return Message(content, reply_to=msg)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return real(msg, context)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return real(msg, context)

    return app


def main(argv: list[str]) -> int:
    data_root, run_dir, record_dir = argv
    import ray

    from server.server_app import make_server_app
    from simulations.flower_engine import run_in_process
    from simulations.runner import backend_config

    config = fault_config(data_root, run_dir)
    Path(record_dir).mkdir(parents=True, exist_ok=True)
    try:
        run_in_process(
            server_app=make_server_app(config, run_dir=run_dir, expected_nodes=4),
            client_app=make_faulty_client_app(config, record_dir),
            num_supernodes=4, backend_config=backend_config(config), verbose=False,
        )
    finally:
        if ray.is_initialized():
            ray.shutdown()
    return 0 if (Path(run_dir) / "summary.json").is_file() else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
