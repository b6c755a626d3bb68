"""Run a Flower simulation of a config in this process (Ray backend).

``flwr.simulation.run_simulation`` passes an empty run config to the apps, so
the resolved :class:`Config` is bound into them: the ServerApp runs in a thread
of this process, and the ClientApp object (with the config in its closure) is
shipped to the Ray workers. One worker per ``runtime.num_cpus`` cores, one
supernode per train site.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import threading
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
    return {
        "client_resources": {"num_cpus": float(rt.num_cpus), "num_gpus": float(rt.num_gpus)},
        "init_args": {"logging_level": "ERROR", "log_to_driver": False},
    }


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
    if resume_dir is not None:
        run_dir = Path(resume_dir).resolve()

    import ray  # the heavy imports, once the input is known to be good
    from flwr.simulation import run_simulation

    from client.client_app import make_client_app
    from server.run_files import make_run_dir
    from server.server_app import make_server_app
    from simulations import watchdog
    from simulations.ray_backend import resilient_backend

    if verbose:  # the workers' own output (a site's failure also comes back as an error reply)
        backend["init_args"]["log_to_driver"] = True
    if resume_dir is None:
        run_dir = make_run_dir(config)
    print(f"run directory: {run_dir}", flush=True)
    print(f"{len(train)} train sites, {config.federation.rounds} rounds", flush=True)

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
        config, run_dir=run_dir, resume=resume_dir is not None, on_round=progress, expected_nodes=len(train),
        on_exit=server_done.set,
    )
    client_app = (client_app_factory or make_client_app)(config)
    fed = config.federation
    # A call later than both timeouts is of no use to the server.
    call_timeout = max(fed.round_timeout, fed.discovery_timeout) + 10.0
    guard = watchdog.start()  # ends Ray's processes should this process be killed
    try:
        with resilient_backend(release=server_done, call_timeout=call_timeout):
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=len(train),
                backend_name="ray",
                backend_config=backend,
                verbose_logging=verbose,
            )
    except Exception as err:  # noqa: BLE001 - reported, and the exit code says so
        cause = err.__cause__ or err
        reason = f"{type(cause).__name__}: {cause}"
        print(f"error: the run failed: {reason}", file=sys.stderr, flush=True)
        record_failure(run_dir, reason=reason)
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


def record_failure(run_dir: Path, *, reason: str) -> None:
    """Write a failed summary.json for a run that died before writing its own (metrics.jsonl is kept)."""
    summary_path = run_dir / "summary.json"
    if summary_path.exists():
        return
    rounds = 0
    metrics_path = run_dir / "metrics.jsonl"
    if metrics_path.is_file():
        for line in metrics_path.read_text().splitlines():
            try:
                rounds = max(rounds, int(json.loads(line).get("round", 0)))
            except (ValueError, TypeError, AttributeError):
                continue  # a line cut short by the failure
    tmp = summary_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"status": "failed", "reason": reason, "rounds": rounds}, indent=2) + "\n")
    os.replace(tmp, summary_path)


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
    final = summary.get("final_meta_test") or {}
    if final.get("accuracy") is not None:
        ci = final.get("ci95")
        ci_text = f" ± {ci:.3f}" if isinstance(ci, (int, float)) else ""
        print(f"held-out accuracy after round {final['round']}: {final['accuracy']:.3f}{ci_text} (95% CI)")
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
