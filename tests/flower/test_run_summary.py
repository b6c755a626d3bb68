"""The final report: the same held-out episodes for every run, the baselines beside the model, the warnings.

Runs of the ServerApp's logic in one process (the stand-in Grid of
test_server_app: the real ClientApp, no Ray) and of ``simulations.local``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from client.client_app import make_client_app
from common.config import load
from common.task import meta_test_generator
from server.server_app import MetaRun, estimate_eta, format_progress
from simulations.local import train
from simulations.run_summary import final_report, summary_lines, warnings_for
from simulations.runner import report_summary
from tests.flower.test_server_app import InProcessGrid

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def config(smoke_config, smoke_data):
    return dataclasses.replace(
        smoke_config, data=dataclasses.replace(smoke_config.data, root=str(smoke_data), generate=False)
    )


def with_(config, **sections):
    out = config
    for section, changes in sections.items():
        out = dataclasses.replace(out, **{section: dataclasses.replace(getattr(out, section), **changes)})
    return out


def server_run(config, run_dir):
    summary = MetaRun(config, run_dir, on_round=lambda _line: None).execute(InProcessGrid(make_client_app(config), 3))
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return summary, lines


def test_untrained_runs_of_any_length_and_runner_score_the_same_episodes(config, tmp_path):
    """``algorithm.name: none`` keeps theta_0, so equal scores mean equal episodes.

    Before the meta-test seed, the episodes were drawn with the final round's
    seed (and simulations.local used yet another), so these differed.
    """
    untrained = with_(config, algorithm={"name": "none"})
    one, lines_one = server_run(with_(untrained, federation={"rounds": 1}), tmp_path / "one")
    three, lines_three = server_run(with_(untrained, federation={"rounds": 3, "eval_every": 1}), tmp_path / "three")
    local = train(with_(untrained, federation={"rounds": 2}), log=lambda _line: None, ablate=False).meta_test
    finals = [lines_one[-1]["meta_test"], lines_three[-1]["meta_test"], local]
    for key in ("accuracy", "raw_1nn", "random_init", "per_site"):
        assert all(report[key] == finals[0][key] for report in finals), key
    # Every meta-test of one run: the same episodes too (theta_0 throughout).
    assert len({line["meta_test"]["accuracy"] for line in lines_three}) == 1
    # Untrained, the model is its initialization: the report says so.
    final = three["final_meta_test"]
    assert final["accuracy"] == final["baselines"]["random_init"]["accuracy"]
    assert any("does not clearly beat its own random initialization" in w for w in final["warnings"])


def test_the_meta_test_seed_alone_chooses_the_episodes():
    assert meta_test_generator(0, "site-0100").initial_seed() == meta_test_generator(0, "site-0100").initial_seed()
    assert meta_test_generator(0, "site-0100").initial_seed() != meta_test_generator(1, "site-0100").initial_seed()
    assert meta_test_generator(0, "site-0100").initial_seed() != meta_test_generator(0, "site-0101").initial_seed()


def test_the_summary_has_each_baseline_with_its_interval_and_prints_them(config, tmp_path, capsys):
    summary, _ = server_run(config, tmp_path / "run")
    final = json.loads((tmp_path / "run" / "summary.json").read_text())["final_meta_test"]
    assert final == json.loads(json.dumps(summary["final_meta_test"]))
    names = set(final["baselines"])
    assert {"raw_1nn", "random_init", "raw_1nn_image", "raw_1nn_audio", "raw_1nn_series"} == names
    for entry in [*final["baselines"].values(), *final["single_modalities"].values()]:
        assert 0.0 <= entry["accuracy"] <= 1.0 and entry["ci95"] >= 0.0
    assert set(final["fused_minus_single"]) == {"image", "audio", "series"}
    assert report_summary(tmp_path / "run") == 0
    out = capsys.readouterr().out
    assert "held-out accuracy after round 2:" in out and "raw 1-NN, same episodes: fused" in out
    assert "random initialization, adapted the same way:" in out and "fused against each modality alone" in out
    assert all(w in out for w in final["warnings"])


def test_a_run_that_cannot_learn_ends_with_a_warning(config, tmp_path, capsys):
    """No outer step (server_opt.lr tiny): the model stays at theta_0 and cannot beat it."""
    frozen = with_(config, server_opt={"lr": 1e-12})
    summary, _ = server_run(frozen, tmp_path / "run")
    assert report_summary(tmp_path / "run") == 0
    out = capsys.readouterr().out
    assert "WARNING: the model" in out and "does not clearly beat its own random initialization" in out


def test_warnings_only_when_a_baseline_is_not_clearly_beaten():
    def report(accuracy, ci, raw, init):
        return final_report({"accuracy": accuracy, "ci95": ci, "raw_1nn": raw, "random_init": init,
                             "ablation_ci95": {"raw_1nn": 0.01, "random_init": 0.01}}, round_index=5)

    assert report(0.6, 0.02, 0.3, 0.25)["warnings"] == []
    beaten_by_raw = report(0.31, 0.02, 0.3, 0.2)["warnings"]
    assert len(beaten_by_raw) == 1 and "raw 1-NN (0.300)" in beaten_by_raw[0]
    assert len(report(0.2, 0.02, 0.3, 0.25)["warnings"]) == 2
    assert warnings_for({"accuracy": None}) == []
    lines = summary_lines(report(0.2, 0.02, 0.3, 0.25))
    assert lines[0].startswith("held-out accuracy after round 5: 0.200 ± 0.020")
    assert sum(line.startswith("WARNING") for line in lines) == 2


def test_the_progress_line_shows_the_query_loss_after_adaptation():
    line = {"round": 3, "sites_replied": 2, "sites_sampled": 2, "sites_failed": 0, "sites_invalid": 0,
            "train": {"train_loss": 2.5, "query_loss": 0.75}, "elapsed": 10.0}
    text = format_progress(line, 10, eta=None)
    assert "query loss after adaptation 0.7500" in text and "2.5" not in text
    del line["train"]["query_loss"]
    assert "train loss 2.5000" in format_progress(line, 10, eta=None)


def test_the_eta_comes_from_steady_rounds_not_start_up():
    assert estimate_eta([30.0], 9) is None  # start-up only: no estimate yet
    assert estimate_eta([30.0, 1.0, 3.0], 10) == pytest.approx(20.0)
    assert estimate_eta([30.0, 1.0], 0) == 0.0


def test_the_shipped_configs_name_their_meta_test_seed():
    for name in ("default", "compare"):
        config = load(ROOT / "simulations" / "configs" / f"{name}.yaml")
        assert config.federation.eval_seed == 0
