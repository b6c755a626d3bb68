"""PNG plots of a run: train loss and held-out accuracy against round (Agg backend)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


# The final meta-test's baselines drawn as lines: key, label, line style.
BASELINE_LINES = (("raw_1nn", "raw 1-NN", "--"), ("random_init", "random initialization", "-."))


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The lines of a ``metrics.jsonl``."""
    lines = []
    for raw in Path(path).read_text().splitlines():
        if raw.strip():
            lines.append(json.loads(raw))
    return lines


def plot_run(history: list[dict[str, Any]], out_dir: str | Path, *, chance: float | None = None) -> list[Path]:
    """Write ``train_loss.png`` and ``meta_test_accuracy.png``; return their paths.

    The accuracy plot draws ``chance`` (1 / ways) and the last meta-test's
    baselines on the same episodes (raw 1-NN, the random initialization) as
    horizontal lines.
    """
    out_dir = Path(out_dir)
    written = []

    fig, ax = plt.subplots(figsize=(6, 4))
    keys = sorted({k for line in history for k in line.get("train", {}) if k == "loss" or k.endswith("_loss")})
    for key in keys:  # whatever losses the algorithm reports (train_loss, adapted_loss, query_loss, ...)
        pts = [(line["round"], line["train"][key]) for line in history if key in line.get("train", {})]
        if pts:
            ax.plot(*zip(*pts), marker=".", label=key.replace("_", " "))
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("train loss (sampled sites)")
    ax.set_title("Training")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    path = out_dir / "train_loss.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)

    fig, ax = plt.subplots(figsize=(6, 4))
    pts = [
        (line["round"], line["meta_test"]["accuracy"], line["meta_test"].get("ci95") or 0.0)
        for line in history if isinstance(line.get("meta_test", {}).get("accuracy"), (int, float))
    ]
    if pts:
        rounds, acc, ci = zip(*pts)
        ax.errorbar(rounds, acc, yerr=ci, marker="o", capsize=3, label="held-out sites (95% CI)")
    fed = [
        (line["round"], line["federated_eval"]["accuracy"])
        for line in history if isinstance(line.get("federated_eval", {}).get("accuracy"), (int, float))
    ]
    if fed:
        ax.plot(*zip(*fed), marker="s", label="federated evaluation")
    for name, label, style in BASELINE_LINES:
        value = next((line["meta_test"][name] for line in reversed(history)
                      if isinstance(line.get("meta_test", {}).get(name), (int, float))), None)
        if value is not None:
            ax.axhline(value, linestyle=style, color="gray", label=f"{label}, same episodes ({value:.3f})")
    if chance is not None:
        ax.axhline(chance, linestyle=":", color="black", label=f"chance ({chance:.2f})")
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("accuracy")
    ax.set_title("Meta-test (adapt on support, score query)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    path = out_dir / "meta_test_accuracy.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)
    return written
