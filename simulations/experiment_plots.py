"""PNG plots for multi-run experiments: algorithm comparison and privacy sweeps (Agg backend)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_comparison(rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Held-out accuracy against round and against bytes communicated, one line per algorithm."""
    written = []
    for index, (xlabel, name) in enumerate((("round", "accuracy_vs_round.png"),
                                            ("MB sent + received", "accuracy_vs_bytes.png"))):
        fig, ax = plt.subplots(figsize=(6, 4))
        for row in rows:
            if not row["curve"]:
                continue
            rounds, acc, total_bytes = zip(*row["curve"])
            xs = rounds if index == 0 else [b / 1e6 for b in total_bytes]
            ax.plot(xs, acc, marker="o", label=row["algorithm"])
        ax.set_xlabel(xlabel)
        ax.set_ylabel("held-out accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def plot_privacy_sweep(rows: list[dict[str, Any]], out_dir: Path) -> Path:
    """Accuracy against epsilon per privacy level, with the non-private accuracy as a line."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for level, marker in (("record", "o"), ("client", "s")):
        pts = sorted((r["epsilon"], r["accuracy"], r["ci95"]) for r in rows
                     if r["level"] == level and math.isfinite(r.get("epsilon", math.nan)))
        if pts:
            eps, acc, ci = zip(*pts)
            ax.errorbar(eps, acc, yerr=ci, marker=marker, capsize=3, label=f"{level}-level DP")
    for row in rows:
        if row["level"] == "none":
            ax.axhline(row["accuracy"], color="gray", linestyle="--", label="non-private")
    ax.set_xscale("log")
    ax.set_xlabel("epsilon (at the configured delta)")
    ax.set_ylabel("held-out accuracy")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    path = out_dir / "accuracy_vs_epsilon.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
