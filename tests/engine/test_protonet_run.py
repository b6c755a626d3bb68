"""A protonet run end to end on the plain-PyTorch runner (the smoke benchmark), alignment on."""

from __future__ import annotations

from pathlib import Path

import torch

from common.config import load
from common.task import Task
from simulations.local import train

SMOKE = Path(__file__).resolve().parents[2] / "simulations" / "configs" / "smoke.yaml"


def test_a_protonet_run_trains_the_encoders_and_is_scored_by_prototypes(tmp_path):
    config = load(SMOKE, overrides={
        "data.root": str(tmp_path / "data"), "algorithm.name": "protonet", "algorithm.align_weight": 0.1,
        "federation.eval_episodes": 6, "runtime.device": "cpu",
    })
    task = Task(config)
    initial = task.initial_parameters(seed=config.federation.seed)
    run = train(config, task=task, log=lambda _: None, ablate=False)
    moved = {k: float((run.params[k] - initial[k]).abs().max()) for k in initial}
    assert all(v < 1e-6 for k, v in moved.items() if k.startswith("fusion.head."))  # not in the objective
    for m in config.data.modalities:
        assert max(v for k, v in moved.items() if k.startswith(f"encoders.{m}.")) > 1e-4
    report = run.meta_test
    assert 0.0 <= report["accuracy"] <= 1.0 and report["episodes"] >= 6 and "raw_1nn" in report
    assert all(torch.isfinite(v).all() for v in run.params.values())
