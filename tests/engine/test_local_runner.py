"""The plain-PyTorch runner (``simulations.local``) treats a diverged site as the Flower server does."""

from __future__ import annotations

from pathlib import Path

from common import tree
from common.config import load
from common.task import Task
from simulations.local import train

SMOKE = Path(__file__).resolve().parents[2] / "simulations" / "configs" / "smoke.yaml"


def _config(tmp_path, inner_lr: float):
    return load(SMOKE, overrides={
        "data.root": str(tmp_path / "data"), "algorithm.inner_lr": inner_lr, "federation.eval_episodes": 3,
        "runtime.device": "cpu",
    })


def test_a_site_whose_inner_loop_diverges_is_dropped_and_the_model_stays_finite(tmp_path):
    config = _config(tmp_path, inner_lr=1e30)  # the inner loop overflows to NaN / Inf
    task = Task(config)
    initial = task.initial_parameters(seed=config.federation.seed)
    lines: list[str] = []
    run = train(config, task=task, log=lines.append, ablate=False)
    assert tree.is_finite(run.params)
    assert tree.max_abs_diff(run.params, initial) == 0  # every reply dropped: unchanged
    sites = config.federation.sites_per_round
    assert [record["sites_invalid"] for record in run.history] == [sites] * config.federation.rounds
    dropped = [line for line in lines if "NaN or Inf weights, dropped" in line]
    assert len(dropped) == sites * config.federation.rounds
    assert all("lower algorithm.inner_lr" in line for line in dropped)
    assert sum("no valid site update; the model is unchanged" in line for line in lines) == config.federation.rounds


def test_finite_site_updates_are_all_kept(tmp_path):
    config = _config(tmp_path, inner_lr=0.1)
    task = Task(config)
    initial = task.initial_parameters(seed=config.federation.seed)
    run = train(config, task=task, log=lambda _: None, ablate=False)
    assert tree.max_abs_diff(run.params, initial) > 0
    assert all(record["sites_invalid"] == 0 for record in run.history)
