"""``metafed report RUN_DIR...``: finished runs side by side.

A markdown table, one row per run: status, rounds, the final held-out
accuracy with its 95% CI, the baselines measured on the same episodes (raw
1-NN, the random initialization when the run measured it, chance = 1/ways),
the bytes sent and received and the wall time; and three plots of held-out
accuracy (with its CI) against rounds, cumulative bytes and seconds. Reads
only a run directory's files (``summary.json``, ``metrics.jsonl``,
``config.yaml``), whichever runner wrote them (:mod:`server.run_files`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from common.config import ConfigError
from server.run_files import CONFIG_FILE, METRICS_FILE, SUMMARY_FILE

# Keys of a meta-test report that are baselines on the same episodes, and their column titles.
BASELINES = (("raw_1nn", "raw 1-NN"), ("random_init", "random init"))


@dataclass(frozen=True)
class Run:
    label: str
    run_dir: Path
    summary: dict[str, Any]
    history: list[dict[str, Any]]
    ways: int | None


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: cannot read the run's {what} ({err})") from None


def load_run(run_dir: str | Path, *, label: str | None = None) -> Run:
    """A finished run's files; ``ConfigError`` naming what is missing."""
    run_dir = Path(run_dir)
    summary_path, metrics_path = run_dir / SUMMARY_FILE, run_dir / METRICS_FILE
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: no such run directory")
    if not summary_path.is_file():
        raise ConfigError(
            f"{run_dir} has no {SUMMARY_FILE}: not a finished run (a run writes it when it ends; "
            "a run still going or killed has none)"
        )
    summary = _read_json(summary_path, "summary")
    history = []
    if metrics_path.is_file():
        for number, raw in enumerate(metrics_path.read_text().splitlines(), start=1):
            if raw.strip():
                try:
                    history.append(json.loads(raw))
                except ValueError:
                    raise ConfigError(f"{metrics_path}, line {number}: not JSON") from None
    ways = None
    try:
        doc = yaml.safe_load((run_dir / CONFIG_FILE).read_text()) or {}
        ways = int(doc.get("episodes", {}).get("ways"))
    except (OSError, yaml.YAMLError, TypeError, ValueError, AttributeError):
        pass
    return Run(label=label or run_dir.name, run_dir=run_dir, summary=summary, history=history, ways=ways)


def load_runs(run_dirs: list[str | Path]) -> list[Run]:
    """The runs, labelled by folder name (with the parent's when two names clash)."""
    paths = [Path(p) for p in run_dirs]
    names = [p.resolve().name for p in paths]
    return [
        load_run(p, label=f"{p.resolve().parent.name}/{p.resolve().name}" if names.count(n) > 1 else n)
        for p, n in zip(paths, names)
    ]


def _final_meta_test(run: Run) -> dict[str, Any]:
    for line in reversed(run.history):
        if isinstance(line.get("meta_test"), dict):
            return line["meta_test"]
    return {}


def _total_bytes(run: Run) -> int | None:
    values = [line[k] for line in run.history for k in ("bytes_sent", "bytes_received")
              if isinstance(line.get(k), (int, float))]
    return int(sum(values)) if values else None


def _with_ci(value: Any, ci: Any) -> str:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return "-"
    return f"{value:.3f} ± {ci:.3f}" if isinstance(ci, (int, float)) and math.isfinite(ci) else f"{value:.3f}"


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return "-"


def table(runs: list[Run]) -> str:
    """The markdown table of the runs (one row each)."""
    baselines = [(key, title) for key, title in BASELINES
                 if any(isinstance(_final_meta_test(r).get(key), (int, float)) for r in runs)]
    head = ["run", "algorithm", "status", "rounds", "held-out accuracy (95% CI)",
            *[f"{title} (95% CI)" for _, title in baselines], "chance", "bytes", "wall time"]
    rows = []
    for run in runs:
        s = run.summary
        final = s.get("final_meta_test") or {}
        meta = _final_meta_test(run)
        accuracy = _with_ci(final.get("accuracy"), final.get("ci95"))
        if final.get("federated"):
            accuracy += " (at the sites)"
        wall = s.get("wall_time_s")
        rows.append([
            run.label, str(s.get("algorithm", "-")), str(s.get("status", "-")), str(s.get("rounds", "-")), accuracy,
            *[_with_ci(meta.get(key), meta.get(f"{key}_ci95")) for key, _ in baselines],
            f"{1 / run.ways:.3f}" if run.ways else "-",
            _bytes(_total_bytes(run)),
            f"{wall:.1f} s" if isinstance(wall, (int, float)) else "-",
        ])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def curves(run: Run) -> list[dict[str, float]]:
    """(round, cumulative bytes, seconds, accuracy, ci95) at each held-out meta-test of a run."""
    points, sent = [], 0.0
    for line in run.history:
        sent += sum(float(line.get(k) or 0) for k in ("bytes_sent", "bytes_received"))
        meta = line.get("meta_test") or {}
        if isinstance(meta.get("accuracy"), (int, float)):
            points.append({"round": line["round"], "bytes": sent, "seconds": float(line.get("elapsed") or 0.0),
                           "accuracy": float(meta["accuracy"]), "ci95": float(meta.get("ci95") or 0.0)})
    return points


def plot(runs: list[Run], out_dir: str | Path) -> list[Path]:
    """``accuracy_vs_rounds.png``, ``accuracy_vs_bytes.png``, ``accuracy_vs_seconds.png``; their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    chance = {1 / r.ways for r in runs if r.ways}
    written = []
    for axis, title in (("round", "round"), ("bytes", "bytes sent and received"), ("seconds", "wall time (s)")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for run in runs:
            pts = [p for p in curves(run) if axis != "bytes" or p["bytes"] > 0]
            if pts:
                ax.errorbar([p[axis] for p in pts], [p["accuracy"] for p in pts], yerr=[p["ci95"] for p in pts],
                            marker="o", capsize=3, label=run.label)
        if len(chance) == 1:
            ax.axhline(next(iter(chance)), color="grey", linestyle=":", label="chance")
        ax.set_xlabel(title)
        ax.set_ylabel("held-out accuracy (95% CI)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
        fig.tight_layout()
        path = out_dir / f"accuracy_vs_{'rounds' if axis == 'round' else axis}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def write_report(run_dirs: list[str | Path], *, out_dir: str | Path) -> tuple[str, list[Path]]:
    """Write ``out_dir/report.md`` and the plots; return the markdown and the files written."""
    if not run_dirs:
        raise ConfigError("give one or more run directories (e.g. runs/default-20261125-120000)")
    runs = load_runs(run_dirs)  # every run read before anything is written
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} is a file, not a folder: choose another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    markdown = table(runs)
    pngs = plot(runs, out_dir)
    doc = "# Runs\n\n" + markdown + "\n\n" + "\n".join(f"![{p.stem}]({p.name})" for p in pngs) + "\n"
    (out_dir / "report.md").write_text(doc)
    return markdown, [out_dir / "report.md", *pngs]
