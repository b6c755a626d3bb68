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

import json
import math
import os
import time
from collections.abc import Callable, Mapping
from datetime import datetime
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
from common.config import Config, ConfigError, save, to_dict
from common.task import NOT_PRIVATE_REPRODUCIBLE, REPRODUCIBLE_NOISE_METRIC
from server import checkpoint
from server.aggregation import make_aggregator
from server.state import STREAM_META_TEST, ServerState, derived_seed
from server.strategy import MetaStrategy, is_due

RESUME_KEY = site_dirs.RESUME_KEY

def make_run_dir(config: Config) -> Path:
    """``output_dir/NAME-YYYYmmdd-HHMMSS`` (a suffix when that exists already)."""
    base = Path(config.output_dir).expanduser().resolve()
    base.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for i in range(1000):
        path = base / (f"{config.name}-{stamp}" + (f"-{i}" if i else ""))
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"cannot create a run directory under {base}")


def jsonable(value: Any) -> Any:
    """Tensors, numpy scalars and nested containers -> plain JSON values."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return jsonable(value.detach().cpu().tolist())
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    return value


def failed_rounds(history: list[dict[str, Any]], *, poisson: bool) -> list[int]:
    """The rounds that had no valid site update.

    Under Poisson sampling a round may sample no site by design; that is not a failure.
    """
    return [
        line["round"] for line in history
        if line.get("sites_replied", 0) == 0 and (line.get("sites_sampled", 0) > 0 or not poisson)
    ]


def scalar_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    return {
        k: float(v) for k, v in report.items()
        if isinstance(v, (int, float, np.generic)) and not isinstance(v, bool) and math.isfinite(float(v))
    }


# The train loss shown in the progress line: the first of these a round reports.
LOSS_KEYS = ("query_loss", "train_loss", "support_loss", "loss")


def format_progress(line: dict[str, Any], total: int, *, eta: float | None) -> str:
    """One status line: round, sites, train loss, last meta-test accuracy, epsilon, time."""
    r = line["round"]
    train = line.get("train", {})
    loss = next((train[k] for k in LOSS_KEYS if isinstance(train.get(k), float)), None)
    acc = line.get("last_meta_test_accuracy")
    parts = [
        f"round {r}/{total}",
        f"sites {line['sites_replied']}/{line['sites_sampled']}"
        + (f" ({line['sites_failed']} failed)" if line["sites_failed"] else "")
        + (f" ({line['sites_invalid']} invalid)" if line["sites_invalid"] else ""),
        f"train loss {loss:.4f}" if isinstance(loss, float) else "train loss -",
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


def privacy_summary(history: list[dict[str, Any]], config: Config) -> dict[str, Any] | None:
    """What summary.json says about privacy: the worst epsilons over the run, and whether it is private.

    ``record_epsilon_max`` is the largest any site reported (infinity when a
    site has no guarantee); ``client_epsilon`` the server's after the last
    round. ``private`` is False when an epsilon is infinite or the run used
    reproducible DP noise (``not_private`` says why).
    """
    record = [line["train"]["epsilon_max"] for line in history if "epsilon_max" in line.get("train", {})]
    client = [line["privacy"]["client_epsilon"] for line in history if "client_epsilon" in line.get("privacy", {})]
    dp = config.privacy
    if not (record or client or dp.record.enabled or dp.client.enabled):
        return None
    report: dict[str, Any] = {}
    if record or dp.record.enabled:
        report["record_epsilon_max"] = max(record) if record else None
        report["record_delta"] = dp.record.delta
    if client or dp.client.enabled:
        report["client_epsilon"] = client[-1] if client else None
        report["client_delta"] = dp.client.delta
    reasons = sorted({line["not_private"] for line in history if line.get("not_private")})
    if reasons:
        report["not_private"] = "; ".join(reasons)
    epsilons = [v for v in (report.get("record_epsilon_max"), report.get("client_epsilon")) if v is not None]
    report["private"] = not reasons and bool(epsilons) and all(math.isfinite(v) for v in epsilons)
    return report


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
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.resume = resume
        self.on_round = on_round
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.expected_nodes = expected_nodes
        self.session_start = time.time()

    # ----------------------------------------------------------------- set-up
    def _prepare_data(self) -> None:
        data = self.config.data
        if data.generate:
            from common.data import ensure_benchmark

            ensure_benchmark(data)

    def _initial_state(self, task: Any) -> ServerState:
        theta0 = tree.clone(task.initial_parameters(seed=self.config.federation.seed))
        if not self.resume:
            return ServerState(params=theta0, opt_state=server_opt.init_state(theta0, config=self.config.server_opt))
        state, _saved = checkpoint.load_latest(
            self.run_dir,
            on_damaged=lambda path, reason: log(WARNING, "resume: skipping a damaged checkpoint: %s", reason),
        )
        if state.params.keys() != theta0.keys() or any(
            state.params[k].shape != theta0[k].shape for k in theta0
        ):
            raise ConfigError(
                f"the checkpoint in {self.run_dir} does not fit this model config "
                "(parameter names or shapes differ): resume with the run's own config.yaml"
            )
        log(INFO, "resuming %s after round %d", self.run_dir, state.round)
        return state

    def _rewrite_metrics(self, history: list[dict[str, Any]]) -> None:
        tmp = self.metrics_path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(line) + "\n" for line in history))
        os.replace(tmp, self.metrics_path)

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
            gen = torch.Generator().manual_seed(derived_seed(fed.seed, r, STREAM_META_TEST))
            # The per-modality ablations cost one more scoring pass per modality:
            # only for the final report.
            report = jsonable(
                self.task.meta_test(
                    self.state.params, self.test_sites, num_episodes=fed.eval_episodes, generator=gen,
                    ablate_modalities=r == fed.rounds, raw_baseline=r == fed.rounds,
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
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(line) + "\n")
        if is_due(r, fed.checkpoint_every, fed.rounds):
            checkpoint.save(self.run_dir, self.state, config=to_dict(self.config))
        # ETA from the rounds after this session's first (which pays for start-up).
        done = r - self.first_round + 1
        left = fed.rounds - r
        if done == 1:
            self.first_round_end = time.time()
            eta = (time.time() - self.session_start) * left
        else:
            eta = (time.time() - self.first_round_end) / (done - 1) * left
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
        save(config, self.run_dir / "config.yaml")
        self.task = Task(config)
        self.state = self._initial_state(self.task)
        self.elapsed_before = self.state.elapsed
        self._rewrite_metrics(self.state.history)

        test_dirs = site_dirs.test_site_dirs(config.data.root)
        self.test_sites = []
        for path in test_dirs:
            try:
                self.test_sites.append(self.task.load_site(path))
            except ValueError as err:  # SiteDataError: one bad held-out site must not stop the run
                log(WARNING, "held-out site %s left out of the meta-test: %s", path.name, err)
        federated_eval = not self.test_sites and not config.privacy.record.enabled
        if federated_eval:
            log(INFO, "no held-out sites under %s/test: evaluating at the sites instead", config.data.root)
        elif not self.test_sites:  # private sites release no statistic of their records
            log(INFO, "no held-out sites under %s/test and record-level DP is on: no evaluation (hold out "
                "sites under data.root/test for a meta-test)", config.data.root)
        expected = self.expected_nodes
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
        self.first_round = self.state.round + 1
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
        final = None
        for line in reversed(self.state.history):
            if "meta_test" in line:
                final = {"round": line["round"], **{k: line["meta_test"].get(k) for k in ("accuracy", "ci95")}}
                break
            if "federated_eval" in line and "accuracy" in line["federated_eval"]:
                final = {"round": line["round"], "accuracy": line["federated_eval"]["accuracy"], "ci95": None,
                         "federated": True}
                break
        plots: list[str] = []
        try:
            from simulations.plots import plot_run

            plots = [str(p) for p in plot_run(self.state.history, self.run_dir)]
        except Exception as err:  # noqa: BLE001 - a plot failure must not lose the run
            log(INFO, "plots not written: %s", err)
        failed = failed_rounds(self.state.history, poisson=self.config.federation.poisson)
        share = self.config.federation.max_failed_round_share
        status, reason = "completed", None
        if self.state.history and len(failed) > share * len(self.state.history):
            status = "failed"
            shown = ", ".join(map(str, failed[:10])) + (" ..." if len(failed) > 10 else "")
            reason = (
                f"{len(failed)} of {len(self.state.history)} rounds had no valid site update (rounds {shown}), "
                f"more than federation.max_failed_round_share={share:g}: see the failures in {self.metrics_path}"
            )
            log(WARNING, "%s", reason)
        summary = {
            "name": self.config.name,
            "status": status,
            **({"reason": reason} if reason else {}),
            "rounds": self.state.round,
            "algorithm": self.config.algorithm.name,
            "final_meta_test": final,
            **({"privacy": privacy} if (privacy := privacy_summary(self.state.history, self.config)) else {}),
            "wall_time_s": self.state.elapsed,
            "session_time_s": time.time() - self.session_start,
            "paths": {
                "run_dir": str(self.run_dir),
                "config": str(self.run_dir / "config.yaml"),
                "metrics": str(self.metrics_path),
                "final_params": str(self.run_dir / "final_params.pt"),
                "checkpoints": [str(p) for p in checkpoint.list_checkpoints(self.run_dir)],
                "plots": plots,
            },
        }
        tmp = self.run_dir / "summary.json.tmp"
        tmp.write_text(json.dumps(jsonable(summary), indent=2))
        os.replace(tmp, self.run_dir / "summary.json")
        return summary


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
            resume_dir = str(run_config.get(RESUME_KEY, "") or "")
            cfg = site_dirs.config_from_run_config(run_config)
            if resume_dir:
                where, again = Path(resume_dir), True
        try:
            MetaRun(cfg, where, resume=again, on_round=on_round, expected_nodes=expected_nodes,
                    site_ids=site_ids).execute(grid)
        finally:
            if on_exit is not None:
                on_exit()

    return app


# `flwr run .` loads this object: the config comes from the run config.
app = make_server_app()
