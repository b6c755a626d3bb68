"""A small sweep of training schedules: which one learns within a budget.

    python -m simulations.sweep_schedule --config simulations/configs/default.yaml --out runs/sweep
    python -m simulations.sweep_schedule --config my.yaml --point "base:" --point "lr0.4:algorithm.inner_lr=0.4"

Each point is the base config plus a few dotted overrides, trained with
:func:`simulations.local.train` (the engine the Flower runs use, in one
process) and scored on the same held-out episodes (``federation.eval_seed``)
by the final report: held-out accuracy, raw-input 1-NN, the random
initialization adapted the same way, and (with ``--ablate``) each modality
alone. The table ranks the points by their margin over the stronger of the two
baselines, with each run's seconds, so that a schedule is chosen by what it
learns per second, not by hand.

The default grid changes one knob at a time around the base: fusion (late /
attention), the head's initialization (prototypes / shared), inner learning
rate, training shots, sites per round, rounds, inner steps, embedding size, and
the benchmark's interference (how much raw-input similarity is defeated). For
one's own data, point ``--config`` at a config whose ``data.root`` holds the
sites (``data.generate: false``); the points that change ``data.*`` only make
sense on the procedural benchmark and are dropped with ``--no-data-points``.

One thread per run (``runtime.torch_threads``), runs one after another: the
seconds are comparable between points, and a loaded machine shows as the load
average printed beside them.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import time
from pathlib import Path

import torch

from common.config import Config, load

# name -> overrides on top of the base config.
DEFAULT_POINTS: dict[str, tuple[str, ...]] = {
    "base": (),
    "attention fusion": ("model.fusion=attention",),
    "shared head": ("algorithm.head_init=shared",),
    "inner lr 0.1": ("algorithm.inner_lr=0.1",),
    "inner lr 0.4": ("algorithm.inner_lr=0.4",),
    "train shots 1": ("episodes.train_shots=1",),
    "4 sites per round": ("federation.sites_per_round=4",),
    "half the rounds": ("federation.rounds=HALF",),
    "10 inner steps": ("algorithm.inner_steps=10",),
    "embed 64": ("model.embed_dim=64",),
    "interference 0": ("data.interference=0",),
    "interference 1": ("data.interference=1",),
}


def parse_point(text: str) -> tuple[str, tuple[str, ...]]:
    """``"name:key=value,key=value"`` -> (name, overrides)."""
    name, _, rest = text.partition(":")
    if not name.strip():
        raise SystemExit(f"--point {text!r}: give it a name, as in 'lr0.4:algorithm.inner_lr=0.4'")
    return name.strip(), tuple(o.strip() for o in rest.split(",") if o.strip())


def resolve(overrides: tuple[str, ...], base: Config) -> list[str]:
    """``federation.rounds=HALF`` -> half of the base's rounds."""
    return [f"federation.rounds={max(1, base.federation.rounds // 2)}" if o == "federation.rounds=HALF" else o
            for o in overrides]


def data_root(config: Config, out: Path) -> str:
    """One benchmark folder per distinct data setting (the benchmark file pins its settings)."""
    if not config.data.generate:
        return config.data.root
    settings = json.dumps(dataclasses.asdict(dataclasses.replace(config.data, root="")), sort_keys=True)
    return str(out / "data" / hashlib.sha256(settings.encode()).hexdigest()[:10])


def run_point(config_path: str | None, base_overrides: list[str], overrides: list[str], *, out: Path,
              ablate: bool) -> dict:
    from simulations.local import train

    config = load(config_path, overrides=[*base_overrides, *overrides])
    config = load(config_path, overrides=[*base_overrides, *overrides, f"data.root={data_root(config, out)}"])
    torch.set_num_threads(max(1, config.runtime.torch_threads))
    load_before = os.getloadavg()[0]
    t0, cpu0 = time.perf_counter(), time.process_time()
    run = train(config, log=lambda _line: None, ablate=ablate)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
    report = run.meta_test
    intervals = report.get("ablation_ci95", {})
    row = {
        "overrides": overrides,
        "accuracy": report["accuracy"], "ci95": report["ci95"],
        "raw_1nn": report["raw_1nn"], "raw_1nn_ci95": intervals.get("raw_1nn"),
        "random_init": report["random_init"], "random_init_ci95": intervals.get("random_init"),
        # cpu_seconds: this process's CPU time, about the wall time on an idle core.
        "seconds": seconds, "cpu_seconds": cpu_seconds, "load_average": (load_before + os.getloadavg()[0]) / 2,
        "rounds": config.federation.rounds,
    }
    row["over_raw_1nn"] = row["accuracy"] - row["raw_1nn"]
    row["over_random_init"] = row["accuracy"] - row["random_init"]
    single = {k: v for k, v in report.items() if k.startswith("only_") and isinstance(v, float)}
    if single:
        row["best_single"] = max(single.values())
        row["over_best_single"] = row["accuracy"] - row["best_single"]
    return row


def table(rows: dict[str, dict], *, command: str) -> list[str]:
    def fmt(x):
        return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"

    def fmt_int(x):
        return "" if x is None else f"{x:.0f}"

    ranked = sorted(rows.items(), key=lambda kv: -min(kv[1]["over_raw_1nn"], kv[1]["over_random_init"]))
    lines = [
        f"`{command}`", "",
        "Held-out 5-way accuracy after training; raw 1-NN and the random initialization (adapted the same "
        "way) on the same episodes. Ranked by the smaller of the two margins.", "",
        "| point | overrides | accuracy | 95% CI | raw 1-NN | random init | over raw 1-NN | over random init "
        "| over best single | rounds | seconds (1 thread) | CPU seconds | load avg |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in ranked:
        lines.append(
            f"| {name} | {' '.join(f'`{o}`' for o in r['overrides']) or '(base)'} | {fmt(r['accuracy'])} | "
            f"± {fmt(r['ci95'])} | {fmt(r['raw_1nn'])} | {fmt(r['random_init'])} | {fmt(r['over_raw_1nn'])} | "
            f"{fmt(r['over_random_init'])} | {fmt(r.get('over_best_single'))} | {r['rounds']} | "
            f"{r['seconds']:.0f} | {fmt_int(r.get('cpu_seconds'))} | {r['load_average']:.1f} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="simulations/configs/default.yaml")
    parser.add_argument("--set", action="append", default=[], dest="overrides", help="applied to every point")
    parser.add_argument("--point", action="append", default=[], help="NAME:key=value,... (default: the grid)")
    parser.add_argument("--only", default="", help="comma-separated names of the default grid to run")
    parser.add_argument("--no-data-points", action="store_true", help="drop the points that change data.*")
    parser.add_argument("--ablate", action="store_true", help="also score each modality alone")
    parser.add_argument("--out", default="runs/sweep")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    base = load(args.config, overrides=args.overrides)
    points = dict(parse_point(p) for p in args.point) if args.point else dict(DEFAULT_POINTS)
    if args.only:
        wanted = [n.strip() for n in args.only.split(",")]
        points = {n: points[n] for n in wanted}
    if args.no_data_points:
        points = {n: o for n, o in points.items() if not any(x.startswith("data.") for x in o)}
    results_path = out / "sweep.json"
    rows: dict[str, dict] = {}
    for name, overrides in points.items():
        row = run_point(args.config, args.overrides, resolve(overrides, base), out=out, ablate=args.ablate)
        # Re-read before writing: several sweeps may share an --out (points split across processes).
        rows = json.loads(results_path.read_text()) if results_path.is_file() else {}
        rows[name] = row
        tmp = results_path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(rows, indent=2))
        os.replace(tmp, results_path)
        print(f"{name}: accuracy {row['accuracy']:.3f} ± {row['ci95']:.3f}, raw 1-NN {row['raw_1nn']:.3f}, "
              f"random init {row['random_init']:.3f}, {row['seconds']:.0f}s (load {row['load_average']:.1f})",
              flush=True)
    command = "python -m simulations.sweep_schedule --config " + args.config + "".join(
        f" --set {o}" for o in args.overrides)
    (out / "sweep.md").write_text("\n".join(table(rows, command=command)) + "\n")
    print(f"written: {out / 'sweep.md'}")


if __name__ == "__main__":
    main()
