"""Site updates per second: cohort mode, one site per node, a Flower-example baseline, the engine alone.

    python -m simulations.bench_throughput [--sites 20] [--per-round 10] [--rounds 6] [--repeats 1]

The same workload for all (``simulations/configs/default.yaml``: Reptile, the
default net; ``--sites`` train sites, ``--per-round`` of them per round, no
held-out sites and no evaluation until after the last round), each run as its
own process, interleaved (cohort, per-site, flower-example, engine, and again
with ``--repeats``) so that drift in the machine's load hits all alike:

- ``cohort``: ``metafed simulate --set runtime.cohort=true`` (one node per
  worker, each training its share of the round's sites);
- ``per-site``: ``metafed simulate`` (one node and one message per site);
- ``flower-example``: :mod:`simulations.baselines.flower_example` (one
  ClientApp per site, ``nn.Module`` + ``torch.optim.SGD``, Flower's FedAvg);
- ``engine``: the same rounds in this package's engine in one process, one
  core, no Flower (``Task.train_on_site`` per site, then the outer step).

Each process prints a line when a round ends; the benchmark timestamps them.
Steady state is the median time between round ends after the first;
start-up is the time from launch to the end of round 1 less one steady round.
Peak RSS is the largest sum over the process and all its descendants
(sampled every 0.2 s). GFLOP/s counts the useful work: FLOPs of one site
update as a plain per-episode loop (``torch.utils.flop_counter``), times the
updates per second; the limit is a 1-thread 2048x2048 ``torch.mm`` on each
core the mode uses (2 Ray workers, or 1 for the engine). The last line is
``cohort / flower-example: X.XXx``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "simulations" / "configs" / "default.yaml"
MODES = ("cohort", "per-site", "flower-example", "engine")


def _overrides(args, data: Path, out: Path) -> list[str]:
    sets = [f"data.root={data}", f"output_dir={out}", f"data.num_train_sites={args.sites}", "data.num_test_sites=0",
            f"federation.rounds={args.rounds}", f"federation.sites_per_round={args.per_round}",
            f"federation.eval_every={args.rounds}", f"federation.checkpoint_every={args.rounds}",
            f"runtime.num_cpus={args.worker_cpus}"]
    return [x for s in sets for x in ("--set", s)]


def _tree_rss(pid: int) -> int:
    from simulations.watchdog import descendants

    total = 0
    for p in [pid, *descendants(pid)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def run_mode(mode: str, args, data: Path, workdir: Path) -> dict:
    out = workdir / f"runs-{mode}-{time.monotonic_ns()}"
    sets = _overrides(args, data, out)
    if mode in ("cohort", "per-site"):
        cmd = [sys.executable, "-m", "simulations.cli", "simulate", "--config", str(DEFAULT), *sets]
        if mode == "cohort":
            cmd += ["--set", "runtime.cohort=true"]
    elif mode == "flower-example":
        cmd = [sys.executable, "-m", "simulations.baselines.flower_example", "--config", str(DEFAULT), *sets]
    else:
        cmd = [sys.executable, "-m", "simulations.bench_throughput", "--engine-only", "--config", str(DEFAULT), *sets]
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _tree_rss(proc.pid))
            done.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    ends: list[float] = []
    for line in proc.stdout:
        if line.startswith("round ") and "/" in line.split()[1]:
            ends.append(time.perf_counter() - t0)
    err = proc.stderr.read()
    proc.wait()
    done.set()
    sampler.join()
    if proc.returncode != 0 or len(ends) < 2:
        raise SystemExit(f"{mode} failed ({proc.returncode}, {len(ends)} rounds):\n{err[-3000:]}")
    steady = statistics.median(b - a for a, b in zip(ends, ends[1:]))
    return {"mode": mode, "updates_per_s": args.per_round / steady, "startup_s": ends[0] - steady,
            "peak_rss_gib": peak[0] / 2**30}


def engine_only(argv: list[str]) -> None:
    """The rounds in one process, no Flower: what ``simulations.local`` does, timed the same way."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    args = parser.parse_args(argv)
    import numpy as np
    import torch

    from client import sites
    from common import tree
    from common.algorithms import server_opt
    from common.config import load
    from common.task import Task
    from server.state import STREAM_SITE, derived_seed
    from server.strategy import sample_sites

    config = load(args.config, overrides=args.overrides)
    torch.set_num_threads(1)
    task = Task(config)
    index = sites.site_index(config.data.root)
    ids = sorted(index.by_name)
    fed = config.federation
    params = task.initial_parameters(seed=fed.seed)
    opt = server_opt.init_state(params, config=config.server_opt)
    for r in range(1, fed.rounds + 1):
        chosen = sample_sites([(s, i) for i, s in enumerate(ids)], config, r)
        results = [task.train_on_site(params, task.load_site(index.by_name[s]), round_config={"round": r},
                                      generator=torch.Generator().manual_seed(
                                          derived_seed(fed.seed, r, STREAM_SITE, s))) for s, _ in chosen]
        delta = tree.weighted_mean([tree.sub(res.params, params) for res in results],
                                   [res.num_episodes for res in results])
        params, opt = server_opt.apply(params, delta, opt, config=config.server_opt, round_index=r - 1,
                                       total_rounds=fed.rounds)
        print(f"round {r}/{fed.rounds} {np.mean([x.metrics['train_loss'] for x in results]):.4f}", flush=True)


def useful_flops(config_path: Path, overrides: list[str]) -> tuple[float, float]:
    """FLOPs of one site update: as a per-episode loop (useful), and as the engine runs it."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from client import sites
    from common.algorithms.reference import reptile_reference
    from common.config import load
    from common.task import Task

    config = load(config_path, overrides=[o for o in overrides if o != "--set"])
    task = Task(config)
    site = task.load_site(sites.site_index(config.data.root).paths[0])
    params = task.initial_parameters(seed=0)
    settings = task.round_settings(None)
    episodes = task.sample_episodes(site, num_episodes=settings["episodes"], shots=settings["shots"],
                                    query_shots=settings["query_shots"], generator=torch.Generator().manual_seed(0))
    counts = []
    for fn in (lambda: reptile_reference(model=task.model, params=params, episodes=episodes,
                                         hparams=task.hparams(settings)),
               lambda: task.train_on_site(params, site, generator=torch.Generator().manual_seed(0))):
        with FlopCounterMode(display=False) as counter:
            fn()
        counts.append(counter.get_total_flops())
    return float(counts[0]), float(counts[1])


def matmul_gflops() -> float:
    import torch

    torch.set_num_threads(1)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    torch.mm(a, b)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    return 2 * 2048**3 / min(times) / 1e9


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--engine-only"]:
        return engine_only(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, default=20)
    parser.add_argument("--per-round", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--worker-cpus", type=float, default=1.0, help="runtime.num_cpus (cores per Ray worker)")
    parser.add_argument("--modes", default=",".join(MODES))
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise SystemExit(f"--modes: unknown {unknown}; choose from {', '.join(MODES)}")
    workers = max(1, int((os.cpu_count() or 1) // args.worker_cpus))
    with tempfile.TemporaryDirectory(prefix="mf-bench-") as tmp:
        workdir = Path(tmp)
        data = workdir / "data"
        from common.config import load
        from common.data import ensure_benchmark

        sets = _overrides(args, data, workdir / "runs")
        config = load(DEFAULT, overrides=sets[1::2])
        ensure_benchmark(config.data)
        useful, executed = useful_flops(DEFAULT, sets)
        limit = matmul_gflops()
        results: dict[str, list[dict]] = {m: [] for m in modes}
        for _ in range(args.repeats):
            for mode in modes:
                results[mode].append(run_mode(mode, args, data, workdir))
                print(f"  {mode}: {results[mode][-1]['updates_per_s']:.2f} site updates/s", file=sys.stderr,
                      flush=True)
    print(f"{args.sites} train sites, {args.per_round} per round, {args.rounds} rounds, default net; "
          f"{os.cpu_count()} cores, {workers} Ray workers; median of {args.repeats}")
    print(f"one site update: {useful / 1e6:.0f} MFLOP as a loop ({executed / 1e6:.0f} MFLOP as the engine runs it); "
          f"matmul limit {limit:.1f} GFLOP/s per core")
    print("| mode | site updates/s | start-up (s) | peak RSS (GiB) | GFLOP/s | of matmul limit |")
    print("|---|---:|---:|---:|---:|---:|")
    med = {}
    for mode in modes:
        rows = results[mode]
        med[mode] = {k: statistics.median(r[k] for r in rows) for k in ("updates_per_s", "startup_s", "peak_rss_gib")}
        cores = 1 if mode == "engine" else workers
        gflops = med[mode]["updates_per_s"] * useful / 1e9
        print(f"| {mode} | {med[mode]['updates_per_s']:.2f} | {med[mode]['startup_s']:.1f} | "
              f"{med[mode]['peak_rss_gib']:.2f} | {gflops:.2f} | {100 * gflops / (limit * cores):.0f}% "
              f"({cores} core{'s' if cores > 1 else ''}) |")
    ups = {m: med[m]["updates_per_s"] for m in modes}
    if "cohort" in ups and "per-site" in ups:
        print(f"cohort / per-site: {ups['cohort'] / ups['per-site']:.2f}x")
    if "cohort" in ups and "engine" in ups:
        per_core = ups["cohort"] / workers
        print(f"cohort per worker / engine on one core: {per_core / ups['engine']:.2f}x "
              f"(Flower's overhead: {100 * (1 - per_core / ups['engine']):.0f}%)")
    if "cohort" in ups and "flower-example" in ups:
        print(f"cohort / flower-example: {ups['cohort'] / ups['flower-example']:.2f}x")


if __name__ == "__main__":
    main()
