"""The Flower ServerApp: builds theta_0 and the strategy, runs Flower's round loop.

``strategy.start`` runs the rounds; its per-round ``evaluate_fn`` hook is where
the run's bookkeeping happens after each round: meta-test on held-out sites
(every ``federation.eval_every`` rounds and after the last), one line in
``metrics.jsonl``, a checkpoint every ``federation.checkpoint_every`` rounds,
and a progress line. At the end: ``summary.json`` and plots.

Two ways in:
- ``metafed simulate`` builds the app with :func:`make_server_app` bound to a
  resolved :class:`Config` and a run directory;
- ``flwr run .`` loads the module-level ``app``, which reads Flower's run config
  (``[tool.flwr.app.config]`` plus ``--run-config`` overrides; a ``config-file``
  key may name a YAML file, a ``resume`` key a run directory to continue).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from client import sites as site_dirs
from client import wire
from common import tree
from common.algorithms import server_opt
from common.config import Config, ConfigError, to_dict
from common.task import NOT_PRIVATE_REPRODUCIBLE, REPRODUCIBLE_NOISE_METRIC
from server import checkpoint
from server.aggregation import make_aggregator
# Also imported from here: failed_rounds, jsonable, privacy_summary.
from server.run_files import RunFiles, failed_rounds, jsonable, make_run_dir, privacy_summary  # noqa: F401
from server.state import ServerState
from server.strategy import MetaStrategy, is_due

RESUME_KEY = site_dirs.RESUME_KEY


def scalar_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    return {
        k: float(v) for k, v in report.items()
        if isinstance(v, (int, float, np.generic)) and not isinstance(v, bool) and math.isfinite(float(v))
    }


# The loss shown in the progress line: the first of these a round reports, and
# its label. query_loss is the meta-objective: the query's loss after adaptation.
LOSS_KEYS = ("query_loss", "train_loss", "support_loss", "loss")
_LOSS_LABELS = {"query_loss": "query loss after adaptation"}


def estimate_eta(round_seconds: list[float], rounds_left: int) -> float | None:
    """Seconds left, from this session's steady rounds: the first (which pays for
    start-up: Ray, the workers, the first site loads) is left out. ``None``
    until a steady round has been seen."""
    steady = round_seconds[1:]
    if rounds_left <= 0:
        return 0.0
    if not steady:
        return None
    return sum(steady) / len(steady) * rounds_left


def format_progress(line: dict[str, Any], total: int, *, eta: float | None) -> str:
    """One status line: round, sites, train loss, last meta-test accuracy, epsilon, time."""
    r = line["round"]
    train = line.get("train", {})
    key = next((k for k in LOSS_KEYS if isinstance(train.get(k), float)), None)
    loss = train[key] if key else None
    acc = line.get("last_meta_test_accuracy")
    parts = [
        f"round {r}/{total}",
        f"sites {line['sites_replied']}/{line['sites_sampled']}"
        + (f" ({line['sites_failed']} failed)" if line["sites_failed"] else "")
        + (f" ({line['sites_invalid']} invalid)" if line["sites_invalid"] else ""),
        f"{_LOSS_LABELS.get(key, 'train loss')} {loss:.4f}" if isinstance(loss, float) else "train loss -",
        f"meta-test acc {acc:.3f}" if isinstance(acc, float) else "meta-test acc -",
    ]
    if isinstance(train.get("epsilon_max"), float):
        parts.append(f"record epsilon max {_epsilon(train['epsilon_max'])}")
    client_epsilon = line.get("privacy", {}).get("client_epsilon")
    if isinstance(client_epsilon, float):
        parts.append(f"client epsilon {_epsilon(client_epsilon)}")
    if line.get("not_private"):
        parts.append("NOT PRIVATE (reproducible DP noise)")
    parts += [
        f"elapsed {_clock(line['elapsed'])}",
        f"ETA {_clock(eta)}" if eta is not None else "ETA -",
    ]
    return " | ".join(parts)


def _epsilon(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.3g}"


def _clock(seconds: float | None) -> str:
    seconds = int(round(seconds or 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def _log_progress(line: dict[str, Any], total: int, eta: float | None = None) -> None:
    log(INFO, "%s", format_progress(line, total, eta=eta))


class StartupGrace:
    """A Grid whose first exchange may take ``first_timeout``: the workers start during it.

    With a site query first (deployment), the query waits for the nodes to start
    (``federation.discovery_timeout``). A simulation that knows its sites sends
    round 1 straight away, so round 1 gets that allowance instead of
    ``federation.round_timeout``; later rounds keep theirs.
    """

    def __init__(self, grid: Grid, *, first_timeout: float) -> None:
        self._grid = grid
        self._first_timeout = first_timeout
        self._first = True

    def send_and_receive(self, messages, *, timeout: float | None = None):
        if self._first:
            self._first = False
            timeout = None if timeout is None else max(timeout, self._first_timeout)
        return self._grid.send_and_receive(messages, timeout=timeout)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


class MetaRun:
    """One federated meta-learning run on a Grid: state, strategy, bookkeeping."""

    def __init__(
        self,
        config: Config,
        run_dir: str | Path | None = None,
        *,
        resume: bool = False,
        on_round: Callable[[str], None] | None = None,
        expected_nodes: int | None = None,
        site_ids: list[str] | None = None,
    ) -> None:
        self.config = config
        self.site_ids = site_ids
        self.run_dir = Path(run_dir) if run_dir is not None else make_run_dir(config)
        self.files = RunFiles(self.run_dir, config=config)
        self.resume = resume
        self.on_round = on_round
        self.metrics_path = self.files.metrics_path
        self.expected_nodes = expected_nodes
        self.session_start = time.time()

    # ----------------------------------------------------------------- set-up
    @property
    def deployment(self) -> bool:
        return self.config.federation.mode == "deployment"

    def _prepare_data(self) -> None:
        data = self.config.data
        if self.deployment:
            if data.generate:
                log(INFO, "federation.mode=deployment: data.generate is ignored (the sites hold the data)")
            return
        if data.generate:
            from common.data import ensure_benchmark

            ensure_benchmark(data)

    def _initial_state(self, task: Any) -> ServerState:
        theta0 = tree.clone(task.initial_parameters(seed=self.config.federation.seed))
        if self.resume and self.deployment and not checkpoint.list_checkpoints(self.run_dir):
            # Resubmitted after the ServerApp died before its first checkpoint.
            log(INFO, "resume: %s holds no checkpoint yet: starting the run from round 0", self.run_dir)
            self.resume = False
        if not self.resume:
            return ServerState(params=theta0, opt_state=server_opt.init_state(theta0, config=self.config.server_opt))
        state, _saved = checkpoint.load_latest(
            self.run_dir,
            on_damaged=lambda path, reason: log(WARNING, "resume: skipping a damaged checkpoint: %s", reason),
        )
        checkpoint.check_fits(state, shapes={k: tuple(v.shape) for k, v in theta0.items()}, run_dir=self.run_dir)
        log(INFO, "resuming %s after round %d", self.run_dir, state.round)
        return state

    # ------------------------------------------------------------------ round
    def after_round(self, server_round: int, arrays: Any) -> MetricRecord | None:
        """Flower's per-round ``evaluate_fn`` hook (round 0 = before training)."""
        r = self.strategy.true_round(server_round)
        if server_round == 0:
            return None
        fed = self.config.federation
        rec = self.strategy.record(r)
        self.state.round = r
        line: dict[str, Any] = {
            "round": r,
            **{k: rec[k] for k in ("sites_sampled", "sites_replied", "sites_failed", "sites_invalid", "sites_missing")},
            "train": rec.get("train", {}),
        }
        result: MetricRecord | None = None
        if self.test_sites and is_due(r, fed.eval_every, fed.rounds):
            t0 = time.time()
            # The same episodes at every meta-test of every run (federation.eval_seed
            # alone). The per-modality ablations and the baselines cost more
            # scoring passes: only for the final report.
            last = r == fed.rounds
            report = jsonable(
                self.task.meta_test(
                    self.state.params, self.test_sites, num_episodes=fed.eval_episodes, seed=fed.eval_seed,
                    ablate_modalities=last, raw_baseline=last,
                    initial_params=self.task.initial_parameters(seed=fed.seed) if last else None,
                )
            )
            report["seconds"] = time.time() - t0
            line["meta_test"] = report
            result = MetricRecord(scalar_metrics(report))
        if "federated_eval" in rec:
            line["federated_eval"] = rec["federated_eval"]
        if "privacy" in rec:
            line["privacy"] = rec["privacy"]
        if line["train"].get(REPRODUCIBLE_NOISE_METRIC, 0.0) > 0 or self.config.site_privacy.reproducible_noise:
            line["not_private"] = NOT_PRIVATE_REPRODUCIBLE
        # What the reply checks refused or cut (server.reply_checks), and the robust rule's report.
        line["bounds"] = {"rejected": dict(rec.get("rejected", {})), "clipped": rec.get("clipped", 0),
                          "metrics_dropped": rec.get("metrics_dropped", 0),
                          "median_update_norm": rec.get("median_update_norm", 0.0)}
        if "aggregation" in rec:
            line["aggregation"] = rec["aggregation"]
        last_acc = self._last_accuracy(self.state.history + [line])
        line["last_meta_test_accuracy"] = last_acc
        self.state.elapsed = self.elapsed_before + (time.time() - self.session_start)
        line["elapsed"] = self.state.elapsed
        line["round_seconds"] = time.time() - self.round_start
        line["bytes_sent"] = rec["bytes_sent"]
        line["bytes_received"] = rec["bytes_received"]
        if rec["failures"]:
            line["failures"] = rec["failures"]
        if line["sites_replied"] == 0 and line["sites_missing"]:
            log(WARNING, "round %d: none of the %d sampled sites replied within federation.round_timeout=%.0fs; "
                "raise it if the sites need longer", r, line["sites_sampled"], fed.round_timeout)
        self.state.history.append(line)
        self.files.append(line)
        if is_due(r, fed.checkpoint_every, fed.rounds):
            checkpoint.save(self.run_dir, self.state, config=to_dict(self.config))
        # ETA from this session's steady rounds (the first pays for start-up).
        self.session_round_seconds.append(time.time() - self.round_start)
        eta = estimate_eta(self.session_round_seconds, fed.rounds - r)
        if self.on_round is not None:
            self.on_round(format_progress(line, fed.rounds, eta=eta))
        else:
            _log_progress(line, fed.rounds, eta)
        self.round_start = time.time()
        return result

    @staticmethod
    def _last_accuracy(history: list[dict[str, Any]]) -> float | None:
        for line in reversed(history):
            for key in ("meta_test", "federated_eval"):
                acc = line.get(key, {}).get("accuracy")
                if isinstance(acc, (int, float)):
                    return float(acc)
        return None

    # -------------------------------------------------------------------- run
    def execute(self, grid: Grid) -> dict[str, Any]:
        from common.task import Task

        config = self.config
        fed = config.federation
        # Threads for the meta-test: more than the cores left free by the
        # sites' workers slows it down by an order of magnitude on a small machine.
        torch.set_num_threads(max(1, int(config.runtime.torch_threads)))
        self._prepare_data()
        self.files.write_config()
        self.task = Task(config)
        self.state = self._initial_state(self.task)
        self.elapsed_before = self.state.elapsed
        self.files.rewrite_metrics(self.state.history)

        test_dirs = [Path(p).expanduser() for p in config.data.test_paths]
        if not test_dirs and not self.deployment:
            test_dirs = site_dirs.test_site_dirs(config.data.root)
        held_out = "data.test_paths" if self.deployment or config.data.test_paths else f"{config.data.root}/test"
        self.test_sites = []
        for path in test_dirs:
            try:
                self.test_sites.append(self.task.load_site(path))
            except ValueError as err:  # SiteDataError: one bad held-out site must not stop the run
                log(WARNING, "held-out site %s left out of the meta-test: %s", path.name, err)
        federated_eval = not self.test_sites and not config.privacy.record.enabled
        if federated_eval:
            log(INFO, "no held-out sites in %s: evaluating at the sites that allow it instead", held_out)
        elif not self.test_sites:  # private sites release no statistic of their records
            log(INFO, "no held-out sites in %s and record-level DP is on: no evaluation (name held-out "
                "site folders in data.test_paths for a meta-test)", held_out)
        expected = self.expected_nodes
        if expected is None and self.deployment:  # the sites that register: at least min_sites
            expected = fed.min_sites
        if expected is None:
            expected = len(site_dirs.train_site_dirs(config.data.root)) or fed.min_sites
        if config.runtime.cohort and self.site_ids is None:
            log(WARNING, "runtime.cohort is for `metafed simulate`, where the server knows the sites: here each "
                "node serves its own site")
        self.strategy = MetaStrategy(
            config, self.state, expected_nodes=expected, round_offset=self.state.round,
            federated_eval=federated_eval, run_id=self.run_dir.name,
            aggregator=make_aggregator(config, secret_key=self.state.secret_key),
            site_ids=self.site_ids, cohort=config.runtime.cohort and self.site_ids is not None,
        )
        self.session_round_seconds: list[float] = []
        self.round_start = self.session_start = time.time()
        remaining = fed.rounds - self.state.round
        if self.site_ids is not None:  # no site query waits for the workers to start: round 1 does
            grid = StartupGrace(grid, first_timeout=max(fed.round_timeout, fed.discovery_timeout))
        if remaining > 0:
            self.strategy.start(
                grid,
                initial_arrays=wire.tree_to_record(self.state.params),
                num_rounds=remaining,
                timeout=fed.round_timeout,
                train_config=ConfigRecord(),
                evaluate_config=ConfigRecord(),
                evaluate_fn=self.after_round,
            )
        else:
            log(INFO, "the run already has %d of %d rounds: nothing to train", self.state.round, fed.rounds)
        return self.finish()

    def finish(self) -> dict[str, Any]:
        torch.save({k: v.detach().cpu() for k, v in self.state.params.items()}, self.run_dir / "final_params.pt")
        plots = self.files.plots(self.state.history, on_error=lambda err: log(INFO, "plots not written: %s", err))
        summary = self.files.summary(
            self.state.history, rounds=self.state.round, wall_time_s=self.state.elapsed,
            session_time_s=time.time() - self.session_start, plots=plots,
            extra_paths={
                "final_params": str(self.run_dir / "final_params.pt"),
                "checkpoints": [str(p) for p in checkpoint.list_checkpoints(self.run_dir)],
            },
        )
        self.files.close()
        if summary["status"] == "failed":
            log(WARNING, "%s", summary["reason"])
        return summary


class RunFailedError(RuntimeError):
    """The run ended without completing (summary.json says why)."""


def run_dir_from_run_config(config: Config, run_config: Mapping[str, Any]) -> tuple[Path | None, bool]:
    """The run directory a submitted run writes to, and whether it resumes it.

    ``resume`` names a run directory to continue and ``run-name`` one to start
    (or, in deployment mode, to continue when it has a checkpoint). A
    ``run-name``, and in deployment mode a relative ``resume``, is a folder
    under ``output_dir`` (in a simulation a relative ``resume`` is taken as
    given). Neither: a fresh ``output_dir/NAME-<time>``.
    """
    base = Path(config.output_dir).expanduser()
    resume_dir = str(run_config.get(RESUME_KEY, "") or "")
    if resume_dir:
        path = Path(resume_dir).expanduser()
        if not path.is_absolute() and config.federation.mode == "deployment":
            path = base / path
        return path, True
    name = str(run_config.get(site_dirs.RUN_NAME_KEY, "") or "")
    if name:
        if Path(name).name != name or name in (".", ".."):
            raise ConfigError(f"run-name must be a folder name, not a path; got {name!r}")
        return base / name, False
    return None, False


def make_server_app(
    config: Config | None = None,
    *,
    run_dir: str | Path | None = None,
    resume: bool = False,
    on_round: Callable[[str], None] | None = None,
    expected_nodes: int | None = None,
    on_exit: Callable[[], None] | None = None,
    site_ids: list[str] | None = None,
) -> ServerApp:
    """A ServerApp bound to ``config`` (simulate command), or (None) reading the run config.

    ``on_exit()`` is called when the app's main returns or raises. ``site_ids``
    (simulation) are the sites, known without asking the nodes; with them,
    ``runtime.cohort`` has each node train a cohort of sites per round.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg, where, again = config, run_dir, resume
        if cfg is None:
            run_config = dict(context.run_config)
            cfg = site_dirs.config_from_run_config(run_config)
            where, again = run_dir_from_run_config(cfg, run_config)
        try:
            summary = MetaRun(cfg, where, resume=again, on_round=on_round, expected_nodes=expected_nodes,
                              site_ids=site_ids).execute(grid)
        finally:
            if on_exit is not None:
                on_exit()
        if config is None and summary["status"] != "completed":
            # Flower then lists the run as finished:failed, with this reason.
            raise RunFailedError(summary.get("reason", summary["status"]))

    return app


# `flwr run .` loads this object: the config comes from the run config.
app = make_server_app()
