"""Checkpoints: exact round trip of parameters and optimizer state, atomic writes, no pickle."""

from __future__ import annotations

import json

import pytest
import torch

from common.algorithms import server_opt
from common.config import ServerOptConfig
from server import checkpoint
from server.state import ServerState, derived_seed, round_rng


def adam_state():
    params = {"enc.w": torch.randn(3, 4, generator=torch.Generator().manual_seed(0)), "head.b": torch.zeros(5)}
    cfg = ServerOptConfig(name="adam", lr=0.01)
    state = server_opt.init_state(params, config=cfg)
    delta = {k: torch.full_like(v, 0.3) for k, v in params.items()}
    params, state = server_opt.apply(params, delta, state, config=cfg, round_index=0, total_rounds=5)
    return ServerState(params=params, opt_state=state, round=4, history=[{"round": 1, "x": 0.5}],
                       aggregator_state={"epsilon": 1.25}, elapsed=12.5)


def test_round_trip_is_exact(tmp_path):
    state = adam_state()
    path = checkpoint.save(tmp_path, state, config={"federation": {"seed": 3}})
    assert path.name == "round-000004"
    loaded, config = checkpoint.load(path)
    assert config == {"federation": {"seed": 3}}
    assert list(loaded.params) == list(state.params)
    for k in state.params:
        assert torch.equal(loaded.params[k], state.params[k])
        assert torch.equal(loaded.opt_state["m"][k], state.opt_state["m"][k])
        assert torch.equal(loaded.opt_state["v"][k], state.opt_state["v"][k])
    assert loaded.opt_state["step"] == 1
    assert (loaded.round, loaded.history, loaded.aggregator_state, loaded.elapsed) == (
        4, state.history, {"epsilon": 1.25}, 12.5)


def test_files_are_tensors_and_json_only(tmp_path):
    path = checkpoint.save(tmp_path, adam_state(), config={})
    tensors = torch.load(path / "state.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in tensors.values())
    json.loads((path / "state.json").read_text())
    assert sorted(p.name for p in path.iterdir()) == ["state.json", "state.pt"]


def test_keeps_the_newest_and_leaves_no_temporary_files(tmp_path):
    state = adam_state()
    for r in range(1, 6):
        state.round = r
        checkpoint.save(tmp_path, state, config={}, keep=3)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["round-000003", "round-000004", "round-000005"]
    loaded, _ = checkpoint.load_latest(tmp_path)
    assert loaded.round == 5
    # Saving the same round again replaces it.
    checkpoint.save(tmp_path, state, config={"again": True}, keep=3)
    assert checkpoint.load_latest(tmp_path)[1] == {"again": True}
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == names


def test_a_half_written_checkpoint_is_ignored(tmp_path):
    state = adam_state()
    checkpoint.save(tmp_path, state, config={})
    (tmp_path / "checkpoints" / ".tmp-round-000009-abc").mkdir()  # a crash mid-write
    assert checkpoint.load_latest(tmp_path)[0].round == 4


def test_no_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="nothing to resume"):
        checkpoint.load_latest(tmp_path)


def test_per_round_randomness_depends_only_on_seed_round_and_site():
    assert derived_seed(1, 2, 0, "site-a") == derived_seed(1, 2, 0, "site-a")
    assert len({derived_seed(1, r, 0, s) for r in range(5) for s in "abc"}) == 15
    assert derived_seed(1, 2, 0, "a") < 2**63
    assert round_rng(5, 3, 0).random() == round_rng(5, 3, 0).random()


def test_the_servers_secret_key_is_kept_only_in_the_owner_readable_tensor_file(tmp_path):
    import os
    import stat

    state = adam_state()
    assert len(state.secret_key) == 32 and state.secret_key != adam_state().secret_key  # fresh per run
    path = checkpoint.save(tmp_path, state, config={"federation": {"seed": 3}})
    assert stat.S_IMODE(os.stat(path / "state.pt").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path).st_mode) & 0o077 == 0  # the folder too
    loaded, _ = checkpoint.load(path)
    assert loaded.secret_key == state.secret_key
    text = (path / "state.json").read_text()
    assert state.secret_key.hex() not in text and str(list(state.secret_key)) not in text
    assert state.secret_key.hex() not in repr(state)
