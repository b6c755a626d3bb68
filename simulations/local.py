"""Federated meta-training in one process, plain PyTorch, no Flower.

The same pure functions the Flower apps call (``Task.train_on_site`` at each
sampled site, then the server optimizer on the weighted mean of
``phi_i - theta``), looped sequentially. For tests of the engine's learning
behaviour, for quick experiments, and as a reference for the Flower runs.

    python -m simulations.local --config simulations/configs/default.yaml --set federation.rounds=20
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from common import tree
from common.algorithms import server_opt
from common.config import Config, load
from common.data import ensure_benchmark
from common.task import Task
from common.tree import Tree


@dataclass
class LocalRun:
    params: Tree
    history: list[dict] = field(default_factory=list)
    meta_test: dict | None = None


def site_round_generator(seed: int, round_index: int, site_index: int) -> torch.Generator:
    """Per site-round randomness derived from (seed, round, site) only, so runs resume exactly."""
    mixed = np.random.SeedSequence([seed, round_index, site_index]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(mixed))


def train(config: Config, *, task: Task | None = None, log=print, ablate: bool = True) -> LocalRun:
    from client import privacy_policy  # plain Python: every site here holds the config's site_privacy

    privacy_policy.check(config, privacy_policy.validate(config.site_privacy))
    paths = ensure_benchmark(config.data)
    task = task or Task(config)
    train_sites = [task.load_site(p) for p in paths.train_sites]
    test_sites = [task.load_site(p) for p in paths.test_sites]
    fed = config.federation
    params = task.initial_parameters(seed=fed.seed)
    opt_state = server_opt.init_state(params, config=config.server_opt)
    run = LocalRun(params=params)
    start = time.perf_counter()
    for r in range(fed.rounds):
        rng = np.random.default_rng([fed.seed, r])
        count = min(len(train_sites), fed.sites_per_round if fed.fraction <= 0 else max(1, round(fed.fraction * len(train_sites))))
        chosen = sorted(rng.choice(len(train_sites), size=count, replace=False).tolist())
        results = [
            task.train_on_site(params, train_sites[i], generator=site_round_generator(fed.seed, r, i)) for i in chosen
        ]
        # As the Flower server does: a reply with NaN or Inf weights is dropped, and a
        # round with none left leaves the model unchanged.
        valid = []
        for i, res in zip(chosen, results):
            if tree.is_finite(res.params):
                valid.append(res)
            else:
                log(f"round {r + 1}: site {train_sites[i].site_id} returned NaN or Inf weights, dropped: its "
                    "inner loop diverged; lower algorithm.inner_lr or algorithm.client_meta_lr")
        if valid:
            delta = tree.weighted_mean([tree.sub(res.params, params) for res in valid],
                                       [res.num_episodes for res in valid])
            params, opt_state = server_opt.apply(params, delta, opt_state, config=config.server_opt,
                                                 round_index=r, total_rounds=fed.rounds)
        else:
            log(f"round {r + 1}: no valid site update; the model is unchanged")
        # A private site reports its epsilon instead of statistics of its records.
        losses = [res.metrics["train_loss"] for res in valid if "train_loss" in res.metrics]
        train_loss = float(np.mean(losses)) if losses else float("nan")
        record = {"round": r + 1, "train_loss": train_loss, "dropped": len(results) - len(valid),
                  "elapsed": time.perf_counter() - start}
        query = [res.metrics["query_loss"] for res in valid if "query_loss" in res.metrics]
        if query:  # the meta-objective: the query's loss after adaptation
            record["query_loss"] = float(np.mean(query))
        epsilons = [res.metrics["epsilon"] for res in results if "epsilon" in res.metrics]
        if epsilons:
            record["epsilon_max"] = max(epsilons)
        run.history.append(record)
        privacy = f" epsilon_max={record['epsilon_max']:.3f}" if epsilons else ""
        adapted = f" query_loss_after_adaptation={record['query_loss']:.3f}" if "query_loss" in record else ""
        log(f"round {r + 1}/{fed.rounds} train_loss={train_loss:.3f}{adapted}{privacy} "
            f"elapsed={record['elapsed']:.1f}s")
    run.params = params
    run.meta_test = task.meta_test(params, test_sites, num_episodes=fed.eval_episodes, seed=fed.eval_seed,
                                   ablate_modalities=ablate, raw_baseline=True,
                                   initial_params=task.initial_parameters(seed=fed.seed))
    return run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None)
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--no-ablate", action="store_true", help="skip the per-modality scores at the end")
    args = parser.parse_args(argv)
    config = load(args.config, overrides=args.overrides)
    torch.set_num_threads(max(1, config.runtime.torch_threads))
    run = train(config, ablate=not args.no_ablate)
    from simulations.run_summary import final_report, summary_lines

    report = run.meta_test
    removed = ", ".join(f"{k} {v:.4f}" for k, v in report.items() if k.startswith("without_"))
    for line in summary_lines(final_report(report, round_index=config.federation.rounds)):
        print(line)
    print(f"worst decile of sites {report['worst_decile']:.4f}" + (f"; {removed}" if removed else ""))


if __name__ == "__main__":
    main()
