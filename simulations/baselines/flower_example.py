"""A Flower-example-style simulation of the same workload, as a baseline for throughput.

Written the way Flower's PyTorch examples are (``quickstart-pytorch`` on the
message API of Flower 1.2x): one ClientApp call per site and round, which
builds the network as an ``nn.Module``, loads the global weights with
``load_state_dict``, trains with ``torch.optim.SGD`` and ``loss.backward()``,
and replies with its ``state_dict``; the server is Flower's own ``FedAvg``.
The work per site is metafed's Reptile update on the same net and the same
episodes (the site's directory, ``common.data.sample_episodes`` from a seed
per site and round): per episode, ``inner_steps`` SGD steps alternating
between support and query, from the global weights; the reply is the mean of
the adapted weights over episodes. No reply checks, no privacy, no meta-test.

    python -m simulations.baselines.flower_example --config simulations/configs/default.yaml --set ...

Prints ``round N/R`` when each round ends (the benchmark times those lines).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from common.config import Config, load

_cache: dict[str, object] = {}


def _site(config: Config, partition_id: int):
    from client import sites
    from common.data import load_site
    from common.task import resolve_schema

    key = f"{config.data.root}:{partition_id}"
    if key not in _cache:
        path = sites.site_index(config.data.root).paths[partition_id]
        _cache[key] = load_site(path, schema=resolve_schema(config), min_records_per_class=0)
    return _cache[key]


def _net(config: Config) -> torch.nn.Module:
    from common.models import build_model
    from common.task import resolve_schema

    return build_model(config=config.model, schema=resolve_schema(config), ways=config.episodes.ways)


def _episode(batch: dict, e: int) -> dict:
    return {k: ({m: t[e] for m, t in v.items()} if isinstance(v, dict) else v[e]) for k, v in batch.items()}


def make_client_app(config: Config) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        from common.data import sample_episodes
        from common.task import resolve_schema

        torch.set_num_threads(max(1, config.runtime.torch_threads))
        pid = int(context.node_config["partition-id"])
        server_round = int(msg.content["config"]["server-round"])
        site = _site(config, pid)
        net = _net(config)
        theta = msg.content["arrays"].to_torch_state_dict()
        seed = int(np.random.SeedSequence([config.federation.seed, server_round, pid]).generate_state(1)[0])
        ep = config.episodes
        episodes = sample_episodes(site, schema=resolve_schema(config), ways=ep.ways, shots=ep.effective_train_shots,
                                   query_shots=ep.query_shots, num_episodes=ep.episodes_per_round,
                                   generator=torch.Generator().manual_seed(seed))
        total = {k: torch.zeros_like(v) for k, v in theta.items()}
        for e in range(ep.episodes_per_round):
            support, query = _episode(episodes["support"], e), _episode(episodes["query"], e)
            net.load_state_dict(theta)
            optimizer = torch.optim.SGD(net.parameters(), lr=config.algorithm.inner_lr)
            net.train()
            for step in range(config.algorithm.inner_steps):
                batch = (support, query)[step % 2]
                optimizer.zero_grad()
                loss = torch.nn.functional.cross_entropy(net(batch["inputs"], batch["masks"]), batch["labels"])
                loss.backward()
                optimizer.step()
            for k, v in net.state_dict().items():
                total[k] += v
        phi = {k: v / ep.episodes_per_round for k, v in total.items()}
        content = RecordDict({"arrays": ArrayRecord(phi),
                              "metrics": MetricRecord({"num-examples": ep.episodes_per_round})})
        return Message(content=content, reply_to=msg)

    return app


def make_server_app(config: Config, num_sites: int) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        torch.manual_seed(config.federation.seed)
        fed = config.federation
        strategy = FedAvg(fraction_train=min(1.0, fed.sites_per_round / num_sites), fraction_evaluate=0.0,
                          min_available_nodes=num_sites, min_train_nodes=min(fed.sites_per_round, num_sites))

        def after_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            if server_round > 0:
                print(f"round {server_round}/{fed.rounds}", flush=True)
            return None

        strategy.start(grid=grid, initial_arrays=ArrayRecord(_net(config).state_dict()), num_rounds=fed.rounds,
                       train_config=ConfigRecord({}), evaluate_fn=after_round)

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None)
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    args = parser.parse_args(argv)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    from flwr.simulation import run_simulation

    from client import sites
    from simulations.runner import absolute_paths

    config = absolute_paths(load(args.config, overrides=args.overrides))
    num_sites = len(sites.site_index(config.data.root))
    logging.getLogger("flwr").setLevel(logging.WARNING)
    t0 = time.perf_counter()
    run_simulation(server_app=make_server_app(config, num_sites), client_app=make_client_app(config),
                   num_supernodes=num_sites, backend_name="ray",
                   backend_config={"client_resources": {"num_cpus": config.runtime.num_cpus, "num_gpus": 0.0},
                                   "init_args": {"logging_level": "ERROR", "log_to_driver": False}})
    print(f"done in {time.perf_counter() - t0:.1f}s", flush=True)
    sys.stdout.flush()
    os._exit(0)  # Ray's native threads make interpreter shutdown take seconds


if __name__ == "__main__":
    main()
