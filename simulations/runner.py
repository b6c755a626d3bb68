"""Run a Flower simulation of a config in this process (Ray backend).

Flower's in-process simulation engine (:mod:`simulations.flower_engine`) passes an empty run config to the apps, so
the resolved :class:`Config` is bound into them: the ServerApp runs in a thread
of this process, and the ClientApp object (with the config in its closure) is
shipped to the Ray workers. One worker per ``runtime.num_cpus`` cores; one
supernode per train site, or (``runtime.cohort``) one per worker, each
training its share of the round's sites. The server knows the sites (it sees
the same data root): no node is asked which site it serves.

``runtime.ray_address`` attaches to a running Ray cluster (``ray start
--head`` on one machine, ``ray start --address`` on the others; every machine
needs the code, the environment and the data root at the same paths) instead
of starting a local Ray.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from client import sites
from common.config import Config, ConfigError


class _DropDeprecationBanner(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "DEPRECATED FEATURE" not in record.getMessage() and "deprecated feature" not in record.getMessage()


def absolute_paths(config: Config) -> Config:
    """Paths resolved against the current directory (workers may run elsewhere)."""
    data = dataclasses.replace(config.data, root=str(Path(config.data.root).expanduser().resolve()))
    policy = config.site_privacy
    site_privacy = dataclasses.replace(policy, **{
        k: str(Path(getattr(policy, k)).expanduser().resolve())
        for k in ("ledger_dir", "state_dir") if getattr(policy, k)
    })
    return dataclasses.replace(config, data=data, output_dir=str(Path(config.output_dir).expanduser().resolve()),
                               site_privacy=site_privacy)


def prepare_data(config: Config) -> list[Path]:
    """Write the procedural benchmark if asked; return the train site directories."""
    if config.data.generate:
        from common.data import ensure_benchmark

        ensure_benchmark(config.data)
    train = sites.train_site_dirs(config.data.root)
    if not train:
        raise ConfigError(
            f"no site directories under {Path(config.data.root) / 'train'}: set data.root to a "
            "folder with train/<site>/ directories, or data.generate=true to write the benchmark"
        )
    return train


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """The complete checkpoints of a run (``checkpoints/round-NNNNNN``), without importing torch."""
    root = run_dir / "checkpoints"
    return sorted(p for p in root.glob("round-*") if p.is_dir()) if root.is_dir() else []


def backend_config(config: Config) -> dict[str, Any]:
    rt = config.runtime
    if rt.num_gpus > 0:
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(
                f"runtime.num_gpus={rt.num_gpus} but no CUDA device is visible: set runtime.num_gpus=0"
            )
    if rt.num_cpus <= 0:
        raise ConfigError(f"runtime.num_cpus must be > 0; got {rt.num_cpus}")
    init_args: dict[str, Any] = {"logging_level": "ERROR", "log_to_driver": False}
    if rt.ray_address:
        init_args["address"] = rt.ray_address
    return {
        "client_resources": {"num_cpus": float(rt.num_cpus), "num_gpus": float(rt.num_gpus)},
        "init_args": init_args,
    }


def check_ray_address(address: str) -> None:
    """A clear error, before anything starts, when no Ray cluster answers at ``address``."""
    if not address or address == "auto" or address.startswith("ray://"):
        return  # auto: Ray's own search and error; ray://: a client connection, checked by ray.init
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"runtime.ray_address={address!r}: expected host:port (the head's GCS, 6379 by default), "
                          "ray://host:10001 or auto")
    import socket

    try:
        with socket.create_connection((host, int(port)), timeout=5):
            pass
    except OSError as err:
        raise ConfigError(f"runtime.ray_address={address!r}: no Ray cluster answers there ({err}); start one "
                          "with `ray start --head`, or leave runtime.ray_address empty for a local Ray") from None


def cohort_nodes(config: Config) -> int:
    """How many nodes share the sites out in cohort mode: ``runtime.cohort_nodes``, or one per worker.

    Workers are counted as Flower's pool does (cores / ``runtime.num_cpus``), on
    this machine, or on the cluster once attached to one.
    """
    rt = config.runtime
    if rt.cohort_nodes > 0:
        return int(rt.cohort_nodes)
    if rt.ray_address:
        import ray
        from flwr.simulation.ray_transport.ray_actor import pool_size_from_resources

        if not ray.is_initialized():
            init_ray(config)
        return max(1, pool_size_from_resources({"num_cpus": rt.num_cpus, "num_gpus": rt.num_gpus}))
    return max(1, int((os.cpu_count() or 1) // rt.num_cpus))


def init_ray(config: Config) -> None:
    """``ray.init`` as Flower's backend does it (the workers get this process's import path)."""
    import ray

    pythonpath = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    os.environ["PYTHONPATH"] = pythonpath
    ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, include_dashboard=False,
             **backend_config(config)["init_args"])


def simulate(
    config: Config,
    *,
    resume_dir: str | Path | None = None,
    verbose: bool = False,
    client_app_factory: Callable[[Config], Any] | None = None,
) -> int:
    """Run the simulation in the foreground; 0 when the run completed, 1 when it failed.

    ``client_app_factory(config)`` builds the ClientApp (default: metafed's own,
    :func:`client.client_app.make_client_app`); one that wraps it can add
    behaviour around the real handlers.
    """
    from simulations import preflight

    config = absolute_paths(config)
    # Every input error is found here, before Ray, Flower or a run directory exists.
    checked = preflight.check(config, resume_dir=resume_dir)
    train, backend = checked.train_sites, checked.backend
    check_ray_address(config.runtime.ray_address)
    if resume_dir is not None:
        run_dir = Path(resume_dir).resolve()

    import ray  # the heavy imports, once the input is known to be good
    from client.client_app import make_client_app
    from server.run_files import make_run_dir
    from server.server_app import make_server_app
    from simulations import flower_engine, watchdog
    from simulations.ray_backend import resilient_backend

    if verbose:  # the workers' own output (a site's failure also comes back as an error reply)
        backend["init_args"]["log_to_driver"] = True
    if resume_dir is None:
        run_dir = make_run_dir(config)
    print(f"run directory: {run_dir}", flush=True)
    nodes = cohort_nodes(config) if config.runtime.cohort else len(train)
    how = f" in cohorts over {nodes} nodes" if config.runtime.cohort else ""
    print(f"{len(train)} train sites{how}, {config.federation.rounds} rounds", flush=True)

    flwr_logger = logging.getLogger("flwr")
    flwr_logger.addFilter(_DropDeprecationBanner())
    if not verbose:
        flwr_logger.setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"ray\..*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)

    def progress(text: str) -> None:
        print(text, flush=True)

    # Set once the ServerApp has finished: a site call still running then is stopped.
    server_done = threading.Event()
    server_app = make_server_app(
        config, run_dir=run_dir, resume=resume_dir is not None, on_round=progress, expected_nodes=nodes,
        on_exit=server_done.set, site_ids=[sites.manifest_site_id(p) or p.name for p in train],
    )
    client_app = (client_app_factory or make_client_app)(config)
    fed = config.federation
    # A call later than both timeouts is of no use to the server.
    call_timeout = max(fed.round_timeout, fed.discovery_timeout) + 10.0
    started = time.time()
    guard = watchdog.start()  # ends Ray's processes should this process be killed
    try:
        with resilient_backend(release=server_done, call_timeout=call_timeout):
            flower_engine.run_in_process(
                server_app=server_app, client_app=client_app, num_supernodes=nodes,
                backend_config=backend, verbose=verbose,
            )
    except Exception as err:  # noqa: BLE001 - reported, and the exit code says so
        cause = err.__cause__ or err
        reason = f"{type(cause).__name__}: {cause}"
        print(f"error: the run failed: {reason}", file=sys.stderr, flush=True)
        record_failure(run_dir, config=config, reason=reason, session_time_s=time.time() - started)
        if verbose:
            import traceback

            traceback.print_exc()
        return 1
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if guard is not None:
            guard.kill()
            guard.wait()
    return report_summary(run_dir)


def record_failure(run_dir: Path, *, config: Config, reason: str, session_time_s: float) -> None:
    """A failed summary.json for a run that died before writing its own (metrics.jsonl is kept)."""
    from server.run_files import RunFiles

    files = RunFiles(run_dir, config=config)
    if files.summary_path.exists():
        return
    done = files.lines()
    files.summary(done, rounds=len(done), wall_time_s=session_time_s, session_time_s=session_time_s, plots=[],
                  error=reason)


def report_summary(run_dir: Path) -> int:
    """Print how a finished run went; 0 when it completed, 1 when it failed or left no summary."""
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        print(f"error: the run ended without writing {summary_path}", file=sys.stderr, flush=True)
        return 1
    summary = json.loads(summary_path.read_text())
    if summary.get("status") != "completed":
        print(f"error: the run failed: {summary.get('reason', summary.get('status'))}", file=sys.stderr, flush=True)
        return 1
    from simulations.run_summary import summary_lines

    for line in summary_lines(summary.get("final_meta_test") or {}):
        print(line, flush=True)
    privacy = summary.get("privacy") or {}
    if privacy.get("not_private"):
        print(f"warning: this run is {privacy['not_private']}", flush=True)
    print(f"done in {summary['wall_time_s']:.1f}s: {run_dir}", flush=True)
    return 0


def make_data(
    config: Config,
    out: str | Path | None = None,
    *,
    workers: int = 1,
    progress: Callable[[int, int, str], None] | None = None,
) -> list[Path]:
    """Write the procedural benchmark's site directories; return the data root's children.

    ``workers`` processes render the sites (the files do not depend on it);
    ``progress(done, total, "sites")`` follows them.
    """
    from common.data import ensure_benchmark

    if out is not None:
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, root=str(out)))
    config = absolute_paths(config)
    ensure_benchmark(config.data, workers=workers, progress=progress)
    root = Path(config.data.root)
    return [p for p in (root / "train", root / "test") if p.is_dir()]
