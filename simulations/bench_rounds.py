"""Round cost of the Flower simulation: first round (Ray start-up) and later rounds.

    python -m simulations.bench_rounds [--sites 3,30] [--rounds 4] [--sites-per-round 3]

Runs ``metafed simulate`` on the smoke config (small model) with the given
numbers of train sites, in a temporary folder, and prints a markdown table
from each run's ``metrics.jsonl``: seconds for round 1 (includes starting Ray
and the workers' imports), the median of the later rounds, and the whole
command's wall time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SMOKE = Path(__file__).parent / "configs" / "smoke.yaml"


def run_once(sites: int, rounds: int, per_round: int, workdir: Path) -> dict:
    out = workdir / f"runs-{sites}"
    cmd = [
        sys.executable, "-m", "simulations.cli", "simulate", "--config", str(SMOKE),
        "--set", f"data.root={workdir / f'data-{sites}'}", "--set", f"output_dir={out}",
        "--set", f"data.num_train_sites={sites}", "--set", f"federation.rounds={rounds}",
        "--set", f"federation.sites_per_round={min(per_round, sites)}",
        "--set", f"federation.eval_every={rounds}", "--set", f"federation.checkpoint_every={rounds}",
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"simulate failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    run_dir = next(out.iterdir())
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    later = [line["round_seconds"] for line in lines[1:]]
    return {
        "sites": sites,
        "first": lines[0]["round_seconds"],
        "later": statistics.median(later) if later else float("nan"),
        "wall": wall,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", default="3,30")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--sites-per-round", type=int, default=3)
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in [int(s) for s in args.sites.split(",") if s]:
            rows.append(run_once(n, args.rounds, args.sites_per_round, Path(tmp)))
    print("| train sites | round 1 (s) | later rounds, median (s) | command wall (s) |")
    print("|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['sites']} | {r['first']:.2f} | {r['later']:.2f} | {r['wall']:.1f} |")
    print(f"\n{args.sites_per_round} sites per round, smoke model; round time includes meta-test rounds "
          "only at the last round.")


if __name__ == "__main__":
    main()
