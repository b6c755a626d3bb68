"""How fast ``metafed make-data`` writes the procedural benchmark, serial against parallel.

    python -m simulations.bench_make_data [--sites 1000] [--full] [--workers N] [--repeats 1] [--dir DIR]

Writes ``--sites`` train sites of the default benchmark (the default data
settings otherwise) once with one process and once with ``--workers``
processes (default: the cores this process may use), into a scratch folder
that is deleted after each run, the two alternating ``--repeats`` times; ``--full`` adds both runs at 10,000 sites
(about 8 GB each, written and deleted in turn). Before that it profiles 50
sites in this process: CPU milliseconds per site spent rendering, validating,
writing the ``.npy`` files and writing the manifest.

Each row gives wall seconds, sites per second, CPU seconds per site (this
process and its workers), the cores it kept busy on average (CPU over wall
seconds: what a shared machine let it have), the 1-minute load average before and after (the
machine may be shared: CPU seconds per site are the steadier figure) and the
time projected for 10,000 sites at that rate.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import os
import pstats
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from common.config import DataConfig
from common.data import procedural

PROJECTED_SITES = 10_000


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its children that have ended."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _folder_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def profile_sites(config: DataConfig, *, sites: int, scratch: Path) -> dict[str, float]:
    """CPU milliseconds per site of each step of writing a site, from ``sites`` sites in this process."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as generate_benchmark runs
    try:
        protos = procedural._prototypes(config.seed, config.num_classes, tuple(config.modalities))
        out = Path(tempfile.mkdtemp(prefix="profile-", dir=scratch))
        (out / "train").mkdir()
        profiler = cProfile.Profile(time.process_time)
        profiler.enable()
        for index in range(sites):
            procedural._write_one_site(protos, config, out, "train", index)
        profiler.disable()
        shutil.rmtree(out)
    finally:
        torch.set_num_threads(threads)
    stats = pstats.Stats(profiler).stats  # (file, line, name) -> (calls, primitive, own, cumulative, callers)

    def cumulative(name: str, file_end: str = "") -> float:
        return sum(v[3] for (file, _, fn), v in stats.items() if fn == name and file.endswith(file_end))

    total = cumulative("_write_one_site")
    render = cumulative("_site_records")
    write = cumulative("write_site")
    validate = cumulative("_validate", "site.py")
    npy = cumulative("save", "_npyio_impl.py") or cumulative("save", "npyio.py")
    manifest = cumulative("dump_yaml") + cumulative("write_text", "pathlib.py")
    per_site = {
        "render": render,
        "validate": validate,
        "npy files": npy,
        "manifest": manifest,
        "rest of write_site": write - validate - npy - manifest,
        "other": total - render - write,
    }
    return {k: 1e3 * v / sites for k, v in per_site.items()}


def timed_run(config: DataConfig, *, sites: int, workers: int, scratch: Path) -> dict[str, float]:
    """Write ``sites`` train sites with ``workers`` processes; wall and CPU seconds, load, bytes."""
    cfg = dataclasses.replace(config, num_train_sites=sites, num_test_sites=0)
    root = Path(tempfile.mkdtemp(prefix=f"sites-{sites}-workers-{workers}-", dir=scratch)) / "bench"
    load_before = os.getloadavg()[0]
    cpu, start = _cpu_seconds(), time.perf_counter()
    try:
        procedural.generate_benchmark(root, config=cfg, workers=workers)
        wall = time.perf_counter() - start
        cpu = _cpu_seconds() - cpu
        size = _folder_bytes(root)
    finally:
        shutil.rmtree(root.parent, ignore_errors=True)
    return {"sites": sites, "workers": workers, "wall": wall, "cpu": cpu, "bytes": size,
            "load_before": load_before, "load_after": os.getloadavg()[0]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.bench_make_data",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, default=1000, help="sites per run (default 1000)")
    parser.add_argument("--full", action="store_true", help=f"also write {PROJECTED_SITES:,} sites each way")
    parser.add_argument("--workers", type=int, default=procedural.available_cores(),
                        help="processes of the parallel runs (default: the cores this process may use)")
    parser.add_argument("--repeats", type=int, default=1, help="serial/parallel pairs per size, alternating (default 1)")
    parser.add_argument("--dir", default=None, help="scratch folder (default: the system's temporary folder)")
    parser.add_argument("--profile-sites", type=int, default=50, help="sites of the per-step profile (0: none)")
    args = parser.parse_args(argv)
    if args.sites < 1 or args.workers < 1 or args.repeats < 1 or args.profile_sites < 0:
        parser.error("--sites, --workers and --repeats must be >= 1 and --profile-sites >= 0")
    config = DataConfig()
    scratch = Path(tempfile.mkdtemp(prefix="bench-make-data-", dir=args.dir))
    try:
        print(f"{procedural.available_cores()} cores usable, load average {os.getloadavg()[0]:.1f}; "
              f"default data settings ({config.classes_per_site} classes x {config.records_per_class} records "
              f"per site, {', '.join(config.modalities)})", flush=True)
        if args.profile_sites:
            profile = profile_sites(config, sites=args.profile_sites, scratch=scratch)
            total = sum(profile.values())
            print(f"\nCPU ms per site, {args.profile_sites} sites in one process (profiled):")
            for step, ms in profile.items():
                print(f"  {step:<20} {ms:7.2f}  {100 * ms / total:5.1f}%")
            print(f"  {'total':<20} {total:7.2f}", flush=True)
        print(f"\n| sites | workers | wall s | sites/s | CPU s/site | cores busy | load before/after | MB/site | "
              f"projected {PROJECTED_SITES:,} |")
        print("|---:|---:|---:|---:|---:|---:|---|---:|---:|", flush=True)
        ratios: list[float] = []
        parallel_rates: list[float] = []
        for sites in [args.sites] + ([PROJECTED_SITES] if args.full and args.sites != PROJECTED_SITES else []):
            ratios, parallel_rates = [], []  # the figures of the largest size are summed up below
            for _ in range(args.repeats):
                pair = []
                for workers in (1, args.workers):
                    row = timed_run(config, sites=sites, workers=workers, scratch=scratch)
                    rate = row["sites"] / row["wall"]
                    pair.append(rate)
                    print(f"| {sites:,} | {workers} | {row['wall']:.1f} | {rate:.1f} | {row['cpu'] / sites:.4f} | "
                          f"{row['cpu'] / row['wall']:.2f} | {row['load_before']:.1f} / {row['load_after']:.1f} | "
                          f"{row['bytes'] / sites / 1e6:.2f} | {PROJECTED_SITES / rate:.0f} s |", flush=True)
                ratios.append(pair[1] / pair[0])
                parallel_rates.append(pair[1])
        rate = statistics.median(parallel_rates)
        print(f"\nparallel / serial (median of {len(ratios)} back-to-back pairs): {statistics.median(ratios):.2f}x; "
              f"projected {PROJECTED_SITES:,} sites: {PROJECTED_SITES / rate:.0f} s with {args.workers} workers")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
