"""What finding a node's site costs per message, at 100 / 1,000 / 10,000 sites.

Compares listing, stat-ing and sorting the train directories on every message
(how :func:`client.sites.site_ref` worked before the per-process index) with
the index built once (:func:`client.sites.site_index`), by partition id and by
the site id the server names. Empty site directories stand in for sites: the
cost measured is the look-up's, not the data's.

    python -m simulations.bench_site_lookup [--sizes 100,1000,10000] [--lookups 200]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from client import sites
from common.config import Config, DataConfig


def _per_message_listing(config: Config, pid: int) -> Path:
    dirs = sites.train_site_dirs(config.data.root)
    return dirs[pid].resolve()


def _time(fn, n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        fn(i)
    return (time.perf_counter() - start) / n


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100,1000,10000")
    parser.add_argument("--lookups", type=int, default=200)
    args = parser.parse_args(argv)
    print(f"{'sites':>7} {'listing per message':>20} {'index build (once)':>19} "
          f"{'by partition':>13} {'by site id':>11}")
    for size in (int(s) for s in args.sizes.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            train = Path(tmp) / "train"
            for i in range(size):
                (train / f"site-{i:05d}").mkdir(parents=True)
            config = Config(data=DataConfig(root=tmp))
            node = {sites.PARTITION_ID_KEY: 0}
            listing = _time(lambda i: _per_message_listing(config, i % size), max(3, args.lookups // max(1, size // 100)))
            t0 = time.perf_counter()
            sites.site_index(tmp)
            build = time.perf_counter() - t0
            by_pid = _time(lambda i: sites.site_ref(config, {**node, sites.PARTITION_ID_KEY: i % size}), args.lookups)
            by_name = _time(lambda i: sites.site_ref(config, node, site_id=f"site-{i % size:05d}"), args.lookups)
            print(f"{size:>7} {listing * 1e3:>17.2f} ms {build * 1e3:>16.1f} ms {by_pid * 1e6:>10.1f} us "
                  f"{by_name * 1e6:>8.1f} us", flush=True)


if __name__ == "__main__":
    main()
