"""Memory under load: many simulated sites, many rounds, resident memory sampled throughout.

    python -m simulations.bench_load [--sites 1000] [--rounds 200] [--sites-per-round 10]
        [--interval 1.0] [--out samples.jsonl]

Runs ``metafed simulate`` on the smoke config (small model) with ``--sites``
train sites, ``--sites-per-round`` sampled each round, no meta-test or
checkpoint until the last round, in a temporary folder. Every ``--interval``
seconds it adds up the resident set size (``VmRSS``) of the command's process
(the ServerApp and Flower's simulation engine run there) and, apart, of all its
descendants (Ray's GCS, raylet, agents and the site workers; ``--out`` keeps
them by process name too), tagged with the
number of rounds ``metrics.jsonl`` holds at that moment. It prints, for each
tenth of the rounds, the median of those samples, and the growth from the
second tenth to the last. Left out: the samples before the first round ends
(Ray's and the workers' start-up) and during the last one (the meta-test).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SMOKE = Path(__file__).parent / "configs" / "smoke.yaml"


def _rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _name(pid: int) -> str:
    """The process's name (``/proc/<pid>/comm``: e.g. ``raylet``, ``gcs_server``, ``ray::ClientAppA``)."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def _children() -> dict[int, list[int]]:
    """Parent pid -> its children's pids, from /proc."""
    out: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the command name may hold spaces
        out.setdefault(ppid, []).append(int(entry.name))
    return out


def descendants(pid: int) -> list[int]:
    tree, todo, found = _children(), [pid], []
    while todo:
        for child in tree.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def rounds_done(out: Path) -> int:
    for path in out.glob("*/metrics.jsonl"):
        try:
            return sum(1 for line in path.read_text().splitlines() if line.strip())
        except OSError:
            return 0
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--sites-per-round", type=int, default=10)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--out", default="", help="write every sample as a JSON line to this file")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "runs"
        cmd = [
            sys.executable, "-m", "simulations.cli", "simulate", "--config", str(SMOKE),
            "--set", f"data.root={Path(tmp) / 'data'}", "--set", f"output_dir={out}",
            "--set", f"data.num_train_sites={args.sites}", "--set", f"federation.rounds={args.rounds}",
            "--set", f"federation.sites_per_round={args.sites_per_round}",
            "--set", f"federation.eval_every={args.rounds}", "--set", f"federation.checkpoint_every={args.rounds}",
        ]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        samples: list[dict] = []
        done = threading.Event()

        def sample() -> None:
            while not done.wait(args.interval):
                kids = descendants(proc.pid)
                by_name: dict[str, float] = {}
                for p in kids:
                    by_name[_name(p)] = by_name.get(_name(p), 0.0) + _rss_kib(p) / 1024
                samples.append({"t": round(time.perf_counter() - t0, 2), "round": rounds_done(out),
                                "command_mib": _rss_kib(proc.pid) / 1024,
                                "descendants_mib": sum(by_name.values()), "processes": len(kids),
                                "by_name_mib": by_name})

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        log = proc.stdout.read()
        code = proc.wait()
        done.set()
        sampler.join()
        wall = time.perf_counter() - t0
    if code != 0:
        raise SystemExit(f"simulate failed ({code}):\n{log[-3000:]}")
    if args.out:
        Path(args.out).write_text("".join(json.dumps(s) + "\n" for s in samples))
    # While the last round runs, the meta-test's episodes are in memory too: left out, as Ray's start-up is.
    training = [s for s in samples if 0 < s["round"] < args.rounds - 1]
    print(f"{args.sites} sites, {args.rounds} rounds of {args.sites_per_round}: {wall:.0f} s, "
          f"{len(samples)} samples every {args.interval:g} s")
    print("| rounds done | command RSS MiB | descendants RSS MiB | processes |")
    print("|---|---:|---:|---:|")
    tenths = []
    step = max(1, args.rounds // 10)
    for lo in range(0, args.rounds, step):
        part = [s for s in training if lo <= s["round"] < lo + step]
        if not part:
            continue
        row = (statistics.median(s["command_mib"] for s in part), statistics.median(s["descendants_mib"] for s in part),
               statistics.median(s["processes"] for s in part))
        tenths.append(row)
        hi = min(lo + step, args.rounds - 1) - 1
        print(f"| {lo if hi == lo else f'{lo}-{hi}'} | {row[0]:.0f} | {row[1]:.0f} | {row[2]:.0f} |")
    if len(tenths) >= 3:
        print(f"growth from the second tenth to the last: command {tenths[-1][0] - tenths[1][0]:+.0f} MiB, "
              f"descendants {tenths[-1][1] - tenths[1][1]:+.0f} MiB")


if __name__ == "__main__":
    main()
