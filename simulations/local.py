"""Federated meta-training in one process, plain PyTorch, no Flower.

The same pure functions the Flower apps call (``Task.train_on_site`` at each
sampled site, then the server optimizer on the weighted mean of
``phi_i - theta``), looped sequentially. For tests of the engine's learning
behaviour, for quick experiments, and as a reference for the Flower runs.

    python -m simulations.local --config simulations/configs/default.yaml --set federation.rounds=20

The command checks its input first (:mod:`simulations.preflight`: exit code 2
on bad input, nothing written), then writes the same run directory as
``metafed simulate`` (:mod:`server.run_files`: config.yaml, metrics.jsonl,
summary.json, plots, TensorBoard events when asked); 0 when the run completed,
1 when it failed. There is no checkpoint: a local run cannot be resumed.
"""

from __future__ import annotations

import argparse
import sys
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
from server.run_files import RunFiles, jsonable, make_run_dir


@dataclass
class LocalRun:
    params: Tree
    history: list[dict] = field(default_factory=list)
    meta_test: dict | None = None


def site_round_generator(seed: int, round_index: int, site_index: int) -> torch.Generator:
    """Per site-round randomness derived from (seed, round, site) only, so runs resume exactly."""
    mixed = np.random.SeedSequence([seed, round_index, site_index]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(mixed))


def _load_sites(task: Task, paths, *, log) -> list:
    """The sites; with ``data.on_invalid_site: warn`` one that fails validation is left out, with a line."""
    loaded = []
    for path in paths:
        try:
            loaded.append(task.load_site(path))
        except ValueError as err:
            if task.config.data.on_invalid_site != "warn":
                raise
            log(f"site {path.name} left out: {err}")
    return loaded


def train(config: Config, *, task: Task | None = None, log=print, ablate: bool = True,
          files: RunFiles | None = None) -> LocalRun:
    """``federation.rounds`` rounds, then the meta-test on the held-out sites.

    ``run.history`` holds one line per round in the format of ``metrics.jsonl``
    (the last one with the meta-test); with ``files`` each line is also written
    as its round ends.
    """
    from client import privacy_policy  # plain Python: every site here holds the config's site_privacy

    privacy_policy.check(config, privacy_policy.validate(config.site_privacy))
    paths = ensure_benchmark(config.data)
    task = task or Task(config)
    train_sites = _load_sites(task, paths.train_sites, log=log)
    test_sites = _load_sites(task, paths.test_sites, log=log)
    fed = config.federation
    params = task.initial_parameters(seed=fed.seed)
    opt_state = server_opt.init_state(params, config=config.server_opt)
    run = LocalRun(params=params)
    start = time.perf_counter()

    def final_meta_test(final_params):
        # The same episodes as every run's (federation.eval_seed alone), with the
        # random initialization adapted the same way as a baseline.
        return task.meta_test(final_params, test_sites, num_episodes=fed.eval_episodes, seed=fed.eval_seed,
                              ablate_modalities=ablate, raw_baseline=True,
                              initial_params=task.initial_parameters(seed=fed.seed))
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
        metrics = {"train_loss": train_loss, "episodes": float(sum(res.num_episodes for res in valid))}
        query = [res.metrics["query_loss"] for res in valid if "query_loss" in res.metrics]
        if query:  # the meta-objective: the query's loss after adaptation
            metrics["query_loss"] = float(np.mean(query))
        epsilons = [res.metrics["epsilon"] for res in results if "epsilon" in res.metrics]
        if epsilons:
            metrics["epsilon_max"] = max(epsilons)
        # The same line as the Flower server's (server.server_app), without what only a network has.
        record = {"round": r + 1, "sites_sampled": len(chosen), "sites_replied": len(valid), "sites_failed": 0,
                  "sites_invalid": len(results) - len(valid), "sites_missing": 0, "train": metrics}
        if r + 1 == fed.rounds:
            t0 = time.perf_counter()
            run.meta_test = jsonable(final_meta_test(params))
            record["meta_test"] = {**run.meta_test, "seconds": time.perf_counter() - t0}
        record["elapsed"] = time.perf_counter() - start
        record["round_seconds"] = record["elapsed"] - (run.history[-1]["elapsed"] if run.history else 0.0)
        run.history.append(record)
        if files is not None:
            files.append(record)
        privacy = f" epsilon_max={metrics['epsilon_max']:.3f}" if epsilons else ""
        adapted = f" query_loss_after_adaptation={metrics['query_loss']:.3f}" if "query_loss" in metrics else ""
        log(f"round {r + 1}/{fed.rounds} train_loss={train_loss:.3f}{adapted}{privacy} "
            f"elapsed={record['elapsed']:.1f}s")
    run.params = params
    if run.meta_test is None:  # no rounds
        run.meta_test = jsonable(final_meta_test(params))
    return run


def main(argv: list[str] | None = None) -> int:
    """The command: 0 when the run completed, 1 when it failed, 2 on bad input (nothing written)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None)
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--no-ablate", action="store_true", help="skip the per-modality scores at the end")
    args = parser.parse_args(argv)
    from simulations import preflight
    from simulations.runner import absolute_paths

    try:
        config = absolute_paths(load(args.config, overrides=args.overrides))
        preflight.check(config, ray=False)
    except ValueError as err:
        from simulations.cli import _is_input_error

        if not _is_input_error(err):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, config.runtime.torch_threads))
    files = RunFiles(make_run_dir(config), config=config)
    print(f"run directory: {files.run_dir}", flush=True)
    files.write_config()
    files.rewrite_metrics([])
    session_start = time.time()
    try:
        run = train(config, ablate=not args.no_ablate, files=files)
    except Exception as err:  # noqa: BLE001 - reported, in summary.json too, and the exit code says so
        reason = f"{type(err).__name__}: {err}"
        print(f"error: the run failed: {reason}", file=sys.stderr, flush=True)
        done = files.lines()
        files.summary(done, rounds=len(done), wall_time_s=time.time() - session_start,
                      session_time_s=time.time() - session_start, plots=[], error=reason)
        files.close()
        return 1
    plots = files.plots(run.history, on_error=lambda err: print(f"plots not written: {err}", file=sys.stderr))
    torch.save({k: v.detach().cpu() for k, v in run.params.items()}, files.run_dir / "final_params.pt")
    elapsed = run.history[-1]["elapsed"] if run.history else time.time() - session_start
    files.summary(run.history, rounds=len(run.history), wall_time_s=elapsed,
                  session_time_s=time.time() - session_start, plots=plots,
                  extra_paths={"final_params": str(files.run_dir / "final_params.pt")})
    files.close()
    report = run.meta_test
    removed = ", ".join(f"{k} {v:.4f}" for k, v in report.items() if k.startswith("without_"))
    print(f"worst decile of sites {report['worst_decile']:.4f}" + (f"; {removed}" if removed else ""))
    from simulations.runner import report_summary

    return report_summary(files.run_dir)


if __name__ == "__main__":
    sys.exit(main())
