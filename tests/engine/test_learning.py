"""Meta-learning on the shipped default config, in plain PyTorch (no Flower).

``simulations/configs/default.yaml`` as shipped (the only change is where its
benchmark is written), trained with its algorithm (protonet: federated
prototypical networks) and with FedAvg from the same initialization, on the same sites, rounds and seed; then the
FedMeta protocol on its held-out sites with held-out classes: adapt on a
5-way 1-shot support set with the same inner loop for both, score the query
set. Every score is on the same episodes (``federation.eval_seed``).

* A meta-learned initialization must adapt clearly better than one trained
  without the meta-objective (FedAvg), and than the random initialization it
  started from, adapted the same way (``random_init``).
* 1-nearest-neighbour on the raw inputs of the same episodes must stay well
  below the meta-learned model: the benchmark must need learning.
* Fusing the modalities must clearly beat the best single one, scored on the
  same episodes with the other modalities removed.

Prints the figures (``pytest -s``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.config import load
from simulations.local import train

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
DEFAULT = ROOT / "simulations" / "configs" / "default.yaml"
THREADS = 2  # as the README's figures for this run were taken


def shipped_run(root: Path, algorithm: str | None, *, ablate: bool) -> dict:
    overrides = [f"data.root={root}"] + ([f"algorithm.name={algorithm}"] if algorithm else [])
    config = load(DEFAULT, overrides=overrides)
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        return train(config, log=lambda _line: None, ablate=ablate).meta_test
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("benchmark")
    reports = {"default": shipped_run(root, None, ablate=True), "fedavg": shipped_run(root, "fedavg", ablate=False)}
    meta, fedavg = reports["default"], reports["fedavg"]
    print(f"\nheld-out 5-way 1-shot: {load(DEFAULT).algorithm.name} {meta['accuracy']:.3f} +- {meta['ci95']:.3f}, "
          f"fedavg {fedavg['accuracy']:.3f} +- {fedavg['ci95']:.3f}, "
          f"random init {meta['random_init']:.3f}, raw 1-NN {meta['raw_1nn']:.3f}; "
          + ", ".join(f"{k} {v:.3f}" for k, v in meta.items() if k.startswith(("only_", "without_"))))
    return reports


def test_the_meta_learned_initialization_adapts_clearly_better_than_fedavg(runs):
    assert runs["default"]["accuracy"] > runs["fedavg"]["accuracy"] + 0.1


# Measured on this default (300 rounds): protonet 0.487 +- 0.023, its random
# initialization 0.242 (+0.245), raw 1-NN 0.347 (+0.140), best single
# modality 0.407 (+0.080).
def test_the_meta_learned_initialization_adapts_clearly_better_than_its_random_initialization(runs):
    report = runs["default"]
    assert report["accuracy"] > report["random_init"] + 0.2


def test_both_runs_are_scored_on_the_same_episodes(runs):
    # Raw 1-NN needs no model: equal only if the episodes are. (The random
    # initialization is scored the way each algorithm adapts, so it may differ:
    # by prototypes for protonet, by a fitted head for FedAvg.)
    assert runs["default"]["raw_1nn"] == runs["fedavg"]["raw_1nn"]
    assert runs["default"]["episodes"] == runs["fedavg"]["episodes"]


def test_raw_input_nearest_neighbour_stays_well_below_the_meta_learned_model(runs):
    report = runs["default"]
    assert report["accuracy"] > report["raw_1nn"] + 0.1


def test_fused_modalities_clearly_beat_the_best_single_one(runs):
    report = runs["default"]
    single = {k: v for k, v in report.items() if k.startswith("only_")}
    assert set(single) == {"only_image", "only_audio", "only_series"}
    assert report["accuracy"] > max(single.values()) + 0.03, single
