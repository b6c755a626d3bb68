"""Meta-learning on the procedural benchmark, in plain PyTorch (no Flower).

A short federated run of Reptile and of FedAvg from the same initialization,
on the same sites, rounds and seed, then the FedMeta protocol on held-out
sites with held-out classes: adapt on a 5-way 1-shot support set with the
same inner loop (steps, learning rate) for both, score the query set. A
meta-learned initialization must adapt clearly better than one trained
without the meta-objective. Prints the figures (``pytest -s``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.config import load
from simulations.local import train

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
COMPARE = ROOT / "simulations" / "configs" / "compare.yaml"


def short_run(root: Path, algorithm: str):
    config = load(COMPARE, overrides=[
        f"data.root={root}",
        f"algorithm.name={algorithm}",
        # 30 train sites, 10 held-out sites (compare.yaml's benchmark); a short
        # run: 60 rounds of 2 sites x 4 episodes, 5-shot training episodes
        # (Nichol et al. 2018 train Reptile with more shots than it is tested on).
        "federation.rounds=60",
        "federation.sites_per_round=2",
        "episodes.episodes_per_round=4",
        "episodes.train_shots=5",
        "algorithm.inner_lr=0.2",
        "model.fusion=late",
        "federation.eval_episodes=60",
    ])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the README's figures for this run were taken
    try:
        return train(config, log=lambda _line: None, ablate=False).meta_test
    finally:
        torch.set_num_threads(threads)


def test_reptile_initialization_adapts_clearly_better_than_fedavg(tmp_path_factory):
    root = tmp_path_factory.mktemp("benchmark")
    reptile = short_run(root, "reptile")
    fedavg = short_run(root, "fedavg")
    print(f"\nheld-out 5-way 1-shot: reptile {reptile['accuracy']:.3f} +- {reptile['ci95']:.3f}, "
          f"fedavg {fedavg['accuracy']:.3f} +- {fedavg['ci95']:.3f}; "
          f"1-NN on the raw inputs of the same episodes {reptile['raw_1nn']:.3f}")
    assert reptile["accuracy"] > 0.2 + 0.1  # well above chance (0.2)
    assert reptile["accuracy"] > fedavg["accuracy"] + 0.05
