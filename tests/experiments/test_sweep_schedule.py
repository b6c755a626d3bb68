"""The schedule sweep: each point trained and scored against both baselines on the same episodes."""

import json
from pathlib import Path

import pytest

from simulations.sweep_schedule import main, parse_point

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "simulations" / "configs" / "smoke.yaml"


def test_points_parse_and_a_nameless_one_is_refused():
    assert parse_point("lr0.4:algorithm.inner_lr=0.4, model.fusion=late") == (
        "lr0.4", ("algorithm.inner_lr=0.4", "model.fusion=late"))
    assert parse_point("base:") == ("base", ())
    with pytest.raises(SystemExit, match="give it a name"):
        parse_point(":algorithm.inner_lr=0.4")


def test_a_small_sweep_writes_its_table_with_the_margins(tmp_path):
    out = tmp_path / "sweep"
    main(["--config", str(SMOKE), "--set", "federation.rounds=1", "--set", "federation.eval_episodes=4",
          "--set", "runtime.device=cpu", "--point", "base:", "--point", "untrained:algorithm.name=none",
          "--out", str(out)])
    rows = json.loads((out / "sweep.json").read_text())
    assert set(rows) == {"base", "untrained"}
    for row in rows.values():
        assert row["over_raw_1nn"] == pytest.approx(row["accuracy"] - row["raw_1nn"])
        assert row["over_random_init"] == pytest.approx(row["accuracy"] - row["random_init"])
    # Untrained, the model is its initialization, scored on the same episodes.
    assert rows["untrained"]["over_random_init"] == 0.0
    assert rows["untrained"]["random_init"] == rows["base"]["random_init"]
    table = (out / "sweep.md").read_text()
    assert "| base | (base) |" in table and "`algorithm.name=none`" in table
