"""Checkpoints tolerate damage: resume falls back to the newest intact one, leftovers go, errors are words."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.algorithms import server_opt
from common.config import ServerOptConfig
from server import checkpoint
from server.state import ServerState

ROOT = Path(__file__).resolve().parents[2]


def make_state(round_: int) -> ServerState:
    gen = torch.Generator().manual_seed(round_)
    params = {"enc.w": torch.randn(16, 32, generator=gen), "head.b": torch.randn(5, generator=gen)}
    cfg = ServerOptConfig(name="adam", lr=0.01)
    return ServerState(params=params, opt_state=server_opt.init_state(params, config=cfg), round=round_,
                       history=[{"round": r} for r in range(1, round_ + 1)])


def three_checkpoints(run_dir: Path) -> list[Path]:
    return [checkpoint.save(run_dir, make_state(r), config={"r": r}) for r in (1, 2, 3)]


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


DAMAGE = {
    "state.pt truncated": lambda p: truncate(p / "state.pt"),
    "state.pt emptied": lambda p: (p / "state.pt").write_bytes(b""),
    "state.pt missing": lambda p: (p / "state.pt").unlink(),
    "state.pt bytes flipped": lambda p: (p / "state.pt").write_bytes(
        bytes(b ^ 0xFF if i == 200 else b for i, b in enumerate((p / "state.pt").read_bytes()))),
    "state.json truncated": lambda p: truncate(p / "state.json"),
    "state.json missing": lambda p: (p / "state.json").unlink(),
    "state.json not a mapping": lambda p: (p / "state.json").write_text("[1, 2]"),
    "state.json lacks keys": lambda p: (p / "state.json").write_text(json.dumps({"format": 1})),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path, damage):
    paths = three_checkpoints(tmp_path)
    DAMAGE[damage](paths[-1])
    warned: list[tuple[Path, str]] = []
    state, config = checkpoint.load_latest(tmp_path, on_damaged=lambda p, why: warned.append((p, why)))
    assert (state.round, config) == (2, {"r": 2})
    expected = make_state(2)
    assert all(torch.equal(state.params[k], expected.params[k]) for k in expected.params)
    assert [p for p, _ in warned] == [paths[-1]]
    reason = warned[0][1]
    assert str(paths[-1]) in reason and ("damaged" in reason or "missing" in reason)
    assert "Errno" not in reason


def test_the_default_warning_names_the_damaged_checkpoint(tmp_path, caplog):
    paths = three_checkpoints(tmp_path)
    truncate(paths[-1] / "state.pt")
    with caplog.at_level("WARNING", logger="metafed.checkpoint"):
        assert checkpoint.load_latest(tmp_path)[0].round == 2
    assert str(paths[-1]) in caplog.text and "truncated" in caplog.text


def test_none_intact_is_one_error_naming_each(tmp_path):
    paths = three_checkpoints(tmp_path)
    for p in paths:
        truncate(p / "state.pt")
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.load_latest(tmp_path, on_damaged=lambda p, why: None)
    text = str(info.value)
    assert "no intact checkpoint" in text and all(str(p) in text for p in paths) and "Errno" not in text


def test_a_checkpoint_without_recorded_size_still_loads_and_its_damage_is_worded(tmp_path):
    """Checkpoints written before the size and checksum were recorded."""
    path = checkpoint.save(tmp_path, make_state(1), config={})
    meta = json.loads((path / "state.json").read_text())
    del meta["state_pt"]
    (path / "state.json").write_text(json.dumps(meta))
    assert checkpoint.load(path)[0].round == 1
    truncate(path / "state.pt", keep=0.3)
    with pytest.raises(checkpoint.CheckpointError, match="not a readable tensor file") as info:
        checkpoint.load(path)
    assert "Errno" not in str(info.value)


def test_a_write_killed_midway_leaves_nothing_behind_after_the_next_save_or_resume(tmp_path):
    checkpoint.save(tmp_path, make_state(1), config={})
    # A real process killed while it writes round 2 (after state.pt, before the rename).
    script = (
        "import os, sys; sys.path.insert(0, sys.argv[2])\n"
        "from server import checkpoint\n"
        "from tests.reliability.test_checkpoint_damage import make_state\n"
        "checkpoint._fsync_file = lambda path: os._exit(9)\n"
        "checkpoint.save(sys.argv[1], make_state(2), config={})\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path), str(ROOT)], capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    root = tmp_path / "checkpoints"
    assert [p.name[:17] for p in root.iterdir() if p.name.startswith(".tmp-")] == [".tmp-round-000002"]
    state, _ = checkpoint.load_latest(tmp_path)
    assert state.round == 1
    assert sorted(p.name for p in root.iterdir()) == ["round-000001"]
    # The next save also clears them.
    (root / ".tmp-round-000005-xyz").mkdir()
    checkpoint.save(tmp_path, make_state(2), config={})
    assert sorted(p.name for p in root.iterdir()) == ["round-000001", "round-000002"]


def test_a_write_that_cannot_happen_says_why_in_words(tmp_path):
    (tmp_path / "checkpoints").write_text("a file where the folder should be")
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.save(tmp_path, make_state(1), config={})
    text = str(info.value)
    assert text.startswith("cannot write checkpoint") and "file exists" in text and "Errno" not in text


def test_the_command_refuses_a_run_whose_checkpoints_are_all_damaged(tmp_path, capsys):
    """`metafed simulate --resume` exits 2 with the reasons, before any simulation starts."""
    from common.config import load, save
    from simulations.cli import EXIT_USAGE, main

    run_dir = tmp_path / "run"
    config = load(ROOT / "simulations" / "configs" / "smoke.yaml",
                  overrides={"data.root": str(tmp_path / "no-data"), "data.generate": False})
    run_dir.mkdir()
    save(config, run_dir / "config.yaml")
    # An empty site so that the data check passes; the checkpoint check comes next.
    (tmp_path / "no-data" / "train" / "site-0000").mkdir(parents=True)
    checkpoint.save(run_dir, make_state(1), config={})
    truncate(run_dir / "checkpoints" / "round-000001" / "state.pt")
    assert main(["simulate", "--resume", str(run_dir)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "no intact checkpoint" in err and "truncated" in err and "Traceback" not in err
