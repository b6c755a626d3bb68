"""A run directory: the files every runner writes, in one format.

    runs/NAME-YYYYmmdd-HHMMSS/
      config.yaml     the resolved config
      metrics.jsonl   one JSON line per round
      summary.json    how the run ended (written atomically at the end)
      *.png           plots of the metrics
      tensorboard/    event files, with ``runtime.tensorboard: true``

``metafed simulate`` (the Flower ServerApp, :mod:`server.server_app`) and
``python -m simulations.local`` (plain PyTorch) both write it through
:class:`RunFiles`, so that ``metafed report`` and the plots read either.
Plain Python: no Flower, no torch import of its own.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from common.config import Config, save

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
TENSORBOARD_DIR = "tensorboard"


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
    torch = sys.modules.get("torch")  # a tensor can only come from a process that imported torch
    if torch is not None and isinstance(value, torch.Tensor):
        return jsonable(value.detach().cpu().tolist())
    np = sys.modules.get("numpy")
    if np is not None:
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


def final_evaluation(history: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The last evaluation of a run: held-out meta-test, else federated evaluation at the sites."""
    for line in reversed(history):
        if "meta_test" in line:  # with its baselines, single modalities and warnings
            from simulations.run_summary import final_report

            return final_report(line["meta_test"], round_index=line["round"])
        if "federated_eval" in line and "accuracy" in line["federated_eval"]:
            return {"round": line["round"], "accuracy": line["federated_eval"]["accuracy"], "ci95": None,
                    "federated": True}
    return None


def run_status(history: list[dict[str, Any]], config: Config, *, metrics_path: Path) -> tuple[str, str | None]:
    """("completed", None), or ("failed", why) when too many rounds had no valid site update."""
    failed = failed_rounds(history, poisson=config.federation.poisson)
    share = config.federation.max_failed_round_share
    if history and len(failed) > share * len(history):
        shown = ", ".join(map(str, failed[:10])) + (" ..." if len(failed) > 10 else "")
        return "failed", (
            f"{len(failed)} of {len(history)} rounds had no valid site update (rounds {shown}), "
            f"more than federation.max_failed_round_share={share:g}: see the failures in {metrics_path}"
        )
    return "completed", None


class RunFiles:
    """The files of one run directory; ``runtime.tensorboard`` also mirrors each round to TensorBoard."""

    def __init__(self, run_dir: str | Path, *, config: Config) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.config_path = self.run_dir / CONFIG_FILE
        self.metrics_path = self.run_dir / METRICS_FILE
        self.summary_path = self.run_dir / SUMMARY_FILE
        self._events = None  # the TensorBoard writer, opened at the session's first round

    def write_config(self) -> None:
        save(self.config, self.config_path)

    def rewrite_metrics(self, history: list[dict[str, Any]]) -> None:
        """``metrics.jsonl`` holds exactly ``history`` (on resume: the rounds the checkpoint has)."""
        tmp = self.metrics_path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(jsonable(line)) + "\n" for line in history))
        os.replace(tmp, self.metrics_path)

    def lines(self) -> list[dict[str, Any]]:
        """The rounds already in ``metrics.jsonl`` (a line cut short by a crash is left out)."""
        if not self.metrics_path.is_file():
            return []
        out = []
        for text in self.metrics_path.read_text().splitlines():
            try:
                out.append(json.loads(text))
            except ValueError:
                continue
        return [line for line in out if isinstance(line, dict)]

    def append(self, line: dict[str, Any]) -> None:
        """One round's line, written as soon as the round ends."""
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(jsonable(line)) + "\n")
        if self.config.runtime.tensorboard:
            if self._events is None:
                from server.tensorboard_events import RoundEvents

                # A resumed run repeats the rounds after its checkpoint: their old events are dropped.
                self._events = RoundEvents(self.run_dir / TENSORBOARD_DIR, ways=self.config.episodes.ways,
                                           purge_step=int(line["round"]))
            self._events.write(line)

    def plots(self, history: list[dict[str, Any]], *, on_error=None) -> list[str]:
        """The PNG plots of ``history``; a plot that fails is reported to ``on_error`` and skipped."""
        try:
            from simulations.plots import plot_run

            return [str(p) for p in plot_run(history, self.run_dir, chance=1.0 / self.config.episodes.ways)]
        except Exception as err:  # noqa: BLE001 - a plot failure must not lose the run
            if on_error is not None:
                on_error(err)
            return []

    def summary(
        self,
        history: list[dict[str, Any]],
        *,
        rounds: int,
        wall_time_s: float,
        session_time_s: float,
        plots: list[str],
        extra_paths: Mapping[str, Any] | None = None,
        error: str | None = None,
    ) -> dict[str, Any]:
        """``summary.json`` of the run (written atomically), returned; ``error``: why the run stopped early."""
        config = self.config
        status, reason = ("failed", error) if error else run_status(history, config, metrics_path=self.metrics_path)
        privacy = privacy_summary(history, config)
        summary = {
            "name": config.name,
            "status": status,
            **({"reason": reason} if reason else {}),
            "rounds": rounds,
            "algorithm": config.algorithm.name,
            "final_meta_test": final_evaluation(history),
            **({"privacy": privacy} if privacy else {}),
            "wall_time_s": wall_time_s,
            "session_time_s": session_time_s,
            "paths": {
                "run_dir": str(self.run_dir),
                "config": str(self.config_path),
                "metrics": str(self.metrics_path),
                **dict(extra_paths or {}),
                "plots": plots,
                **({"tensorboard": str(self.run_dir / TENSORBOARD_DIR)} if config.runtime.tensorboard else {}),
            },
        }
        tmp = self.summary_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(jsonable(summary), indent=2))
        os.replace(tmp, self.summary_path)
        return summary

    def close(self) -> None:
        if self._events is not None:
            self._events.close()
            self._events = None
