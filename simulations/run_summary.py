"""What a finished run says about itself: the final report of summary.json and its printed lines.

The held-out accuracy alone does not say whether a run learned anything. Beside
it, on the same episodes, stand the two references of the few-shot literature
that need no meta-learning: 1-NN on the raw inputs (the "pixels" baseline of
Vinyals et al., "Matching Networks for One Shot Learning", NeurIPS 2016), fused
and per modality, and the run's own random initialization adapted exactly like
the model (``random_init``; the fixed-feature baselines of Chen et al., "A
Closer Look at Few-shot Classification", ICLR 2019). The fused model is also
set against each modality alone. A model not clearly above a baseline (by more
than its own 95% interval) gets a WARNING line.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

BASELINES = ("raw_1nn", "random_init")
_LABELS = {"raw_1nn": "raw 1-NN", "random_init": "its own random initialization, adapted the same way,"}


def _number(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def final_report(meta_test: Mapping[str, Any], *, round_index: int) -> dict[str, Any]:
    """summary.json's ``final_meta_test`` from the last meta-test's report.

    ``baselines`` holds ``raw_1nn``, ``raw_1nn_<m>`` and ``random_init``,
    ``single_modalities`` each ``only_<m>``, each as ``{accuracy, ci95}``;
    ``fused_minus_single`` the fused accuracy less each one; ``warnings`` the
    lines :func:`warnings_for` gives.
    """
    intervals = meta_test.get("ablation_ci95") or {}

    def entry(name: str) -> dict[str, float | None]:
        return {"accuracy": _number(meta_test.get(name)), "ci95": _number(intervals.get(name))}

    report: dict[str, Any] = {"round": round_index, "accuracy": meta_test.get("accuracy"),
                              "ci95": meta_test.get("ci95")}
    for key in ("episodes", "sites", "worst_decile"):
        if key in meta_test:
            report[key] = meta_test[key]
    baselines = {name: entry(name) for name in meta_test
                 if name in BASELINES or name.startswith("raw_1nn_")}
    if baselines:
        report["baselines"] = dict(sorted(baselines.items(), key=lambda kv: (kv[0] != "raw_1nn", kv[0])))
    single = {name.removeprefix("only_"): entry(name) for name in meta_test if name.startswith("only_")}
    if single:
        report["single_modalities"] = single
        accuracy = _number(report["accuracy"])
        if accuracy is not None:
            report["fused_minus_single"] = {m: accuracy - v["accuracy"] for m, v in single.items()
                                            if v["accuracy"] is not None}
    report["warnings"] = warnings_for(report)
    return report


def warnings_for(report: Mapping[str, Any]) -> list[str]:
    """A line for each baseline the model does not beat by more than its 95% interval."""
    accuracy, ci = _number(report.get("accuracy")), _number(report.get("ci95")) or 0.0
    if accuracy is None:
        return []
    lines = []
    for name in BASELINES:
        base = (report.get("baselines") or {}).get(name, {}).get("accuracy")
        if base is not None and accuracy - base <= ci:
            lines.append(
                f"WARNING: the model ({accuracy:.3f} ± {ci:.3f}) does not clearly beat {_LABELS[name]} "
                f"({base:.3f}) on the same episodes: it has learned little or nothing that the "
                + ("raw inputs do not already give" if name == "raw_1nn" else "untrained network does not")
                + "; train longer or change the schedule (python -m simulations.sweep_schedule)")
    return lines


def _with_ci(entry: Mapping[str, Any]) -> str:
    acc, ci = _number(entry.get("accuracy")), _number(entry.get("ci95"))
    if acc is None:
        return "-"
    return f"{acc:.3f}" + (f" ± {ci:.3f}" if ci is not None else "")


def summary_lines(final: Mapping[str, Any]) -> list[str]:
    """The end-of-run lines: accuracy, baselines, fused against each modality, warnings."""
    if _number(final.get("accuracy")) is None:
        return []
    where = f" after round {final['round']}" if final.get("round") is not None else ""
    lines = [f"held-out accuracy{where}: {_with_ci(final)} (95% CI"
             + (f", {final['episodes']} episodes" if final.get("episodes") else "") + ")"]
    baselines = final.get("baselines") or {}
    if "raw_1nn" in baselines:
        per = [f"{name.removeprefix('raw_1nn_')} {_with_ci(v)}" for name, v in baselines.items()
               if name.startswith("raw_1nn_")]
        lines.append(f"  raw 1-NN, same episodes: fused {_with_ci(baselines['raw_1nn'])}"
                     + (f"; {', '.join(per)}" if per else ""))
    if "random_init" in baselines:
        lines.append(f"  random initialization, adapted the same way: {_with_ci(baselines['random_init'])}")
    single = final.get("single_modalities") or {}
    if single:
        gaps = final.get("fused_minus_single") or {}
        lines.append("  fused against each modality alone: " + ", ".join(
            f"{m} {_with_ci(v)} ({gaps[m]:+.3f})" if m in gaps else f"{m} {_with_ci(v)}"
            for m, v in single.items()))
    lines += list(final.get("warnings") or [])
    return lines
