"""Held-out accuracy per aggregation rule with one attacking site among ten.

    python -m simulations.bench_robustness [--rules mean,median,...] [--attacks none,x100,...]
        [--rounds 30] [--set key=value ...] [--out results.jsonl]

In-process, as :mod:`simulations.local`: every round each of the 10 sites trains
on the global model (``Task.train_on_site``), site 0 then corrupts its reply,
and the server's own path turns the replies into the outer step: the update
bound (:func:`server.reply_checks.bound_updates`, ``replies.*``), the
aggregation rule (:func:`server.aggregation.make_aggregator`,
``aggregation.*``) and the server optimizer. After the last round the model is
meta-tested on the held-out sites (same episodes for every row).

Attacks (site 0, every round): ``x100`` sends ``theta + 100 (phi - theta)``,
``1e30`` sends every weight at 1e30, ``signflip`` sends ``theta - (phi - theta)``.
Rule ``none`` is the mean without update bounds (``replies.max_update_norm`` and
``max_update_ratio`` at inf): the undefended baseline.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import torch

from common import tree
from common.algorithms import server_opt
from common.config import Config, load
from common.data import ensure_benchmark
from common.task import Task
from server.aggregation import make_aggregator
from server.reply_checks import bound_updates
from simulations.local import site_round_generator

SMOKE = Path(__file__).parent / "configs" / "smoke.yaml"
# The smoke model on 10 sites with the schedule that learns fast (late fusion,
# prototype heads, 3-shot training episodes, inner lr 0.2): one row (30 rounds of
# 10 sites) takes about a minute at 1 torch thread on an idle core.
BENCH_OVERRIDES = [
    "data.root=data/bench-robustness", "data.num_train_sites=10", "data.num_test_sites=4",
    "federation.sites_per_round=10", "federation.rounds=30", "federation.eval_episodes=200",
    "model.fusion=late", "algorithm.head_init=prototypes", "episodes.train_shots=3", "algorithm.inner_lr=0.2",
]
ATTACKS = {
    "none": lambda theta, phi: phi,
    "x100": lambda theta, phi: tree.axpy(100.0, tree.sub(phi, theta), theta),
    "1e30": lambda theta, phi: tree.full_like(phi, 1e30),
    "signflip": lambda theta, phi: tree.axpy(-1.0, tree.sub(phi, theta), theta),
}
RULES = ("none", "mean", "median", "trimmed_mean", "multikrum", "clipped_mean")


def rule_config(config: Config, rule: str) -> Config:
    if rule == "none":  # the undefended mean
        replies = dataclasses.replace(config.replies, max_update_norm=math.inf, max_update_ratio=math.inf)
        aggregation = dataclasses.replace(config.aggregation, rule="mean")
        return dataclasses.replace(config, replies=replies, aggregation=aggregation)
    return dataclasses.replace(config, aggregation=dataclasses.replace(config.aggregation, rule=rule))


def run_row(config: Config, task: Task, train_sites, test_sites, attack: str) -> dict:
    fed, rules = config.federation, config.replies
    params = task.initial_parameters(seed=fed.seed)
    opt_state = server_opt.init_state(params, config=config.server_opt)
    aggregator = make_aggregator(config)
    corrupt = ATTACKS[attack]
    rejected = clipped = 0
    t0 = time.perf_counter()
    for r in range(fed.rounds):
        phis, weights = [], []
        for i, site in enumerate(train_sites):
            res = task.train_on_site(params, site, generator=site_round_generator(fed.seed, r, i))
            phi = corrupt(params, res.params) if i == 0 else res.params
            phis.append(phi)
            weights.append(float(res.num_episodes))
        # The strategy drops non-finite replies before the bounds (they never reach them).
        finite = [i for i, phi in enumerate(phis) if tree.is_finite(phi)]
        bounded = bound_updates([tree.sub(phis[i], params) for i in finite], max_norm=rules.max_update_norm,
                                max_ratio=rules.max_update_ratio, on_excess=rules.on_excess)
        rejected += len(bounded.rejected) + len(phis) - len(finite)
        clipped += len(bounded.clipped)
        delta = aggregator.aggregate(bounded.deltas, [weights[finite[i]] for i in bounded.kept], template=params,
                                     server_round=r + 1, num_sampled=len(phis), expected_sampled=len(phis))
        if delta is not None:
            params, opt_state = server_opt.apply(params, delta, opt_state, config=config.server_opt,
                                                 round_index=r, total_rounds=fed.rounds)
    report = task.meta_test(params, test_sites, num_episodes=fed.eval_episodes, seed=fed.eval_seed)
    return {"accuracy": float(report["accuracy"]), "ci95": float(report["ci95"]), "rejected": rejected,
            "clipped": clipped, "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(SMOKE))
    parser.add_argument("--rules", default=",".join(RULES))
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--out", default="", help="append one JSON line per row to this file")
    args = parser.parse_args(argv)
    base = load(args.config, overrides=BENCH_OVERRIDES + args.overrides)
    torch.set_num_threads(max(1, base.runtime.torch_threads))
    paths = ensure_benchmark(base.data)
    task = Task(base)
    train_sites = [task.load_site(p) for p in paths.train_sites]
    test_sites = [task.load_site(p) for p in paths.test_sites]
    print(f"{len(train_sites)} sites per round (site 0 attacks), {base.federation.rounds} rounds, "
          f"{len(test_sites)} held-out sites, {base.federation.eval_episodes} test episodes", flush=True)
    print("| rule | attack | held-out accuracy | 95% CI | replies rejected | clipped | seconds |")
    print("|---|---|---:|---:|---:|---:|---:|", flush=True)
    for rule in [x for x in args.rules.split(",") if x]:
        config = rule_config(base, rule)
        for attack in [x for x in args.attacks.split(",") if x]:
            row = run_row(config, task, train_sites, test_sites, attack)
            print(f"| {rule} | {attack} | {row['accuracy']:.3f} | {row['ci95']:.3f} | {row['rejected']} | "
                  f"{row['clipped']} | {row['seconds']:.0f} |", flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps({"rule": rule, "attack": attack, **row}) + "\n")


if __name__ == "__main__":
    main()
