"""The site ledger: cumulative across restarts and runs, refuses over-budget rounds, never loses a file."""

from __future__ import annotations

import json
import math

import pytest

from common.privacy.accounting import compute_epsilon, record_level_round_steps
from common.privacy.ledger import (
    DEFAULT_FILENAME,
    BudgetExceeded,
    PrivacyLedger,
    PrivacyLedgerError,
    default_path,
)

DELTA = 1e-5
# Fast to account (small q), and one round costs a visible epsilon.
ROUND = record_level_round_steps(episodes=8, inner_steps=4, noise_multiplier=2.0, sample_rate=0.01)


def test_epsilon_continues_across_restarts_and_runs(tmp_path):
    ledger = PrivacyLedger.open(tmp_path, delta=DELTA)  # a site directory: its default file
    assert ledger.path == tmp_path / DEFAULT_FILENAME == default_path(tmp_path)
    assert ledger.epsilon == 0.0 and not ledger.path.exists()
    eps1 = ledger.record(run_id="run-a", round=1, steps=ROUND)
    eps2 = ledger.record(run_id="run-a", round=2, steps=ROUND)
    assert 0.0 < eps1 < eps2

    reopened = PrivacyLedger.open(ledger.path, delta=DELTA)  # a restart
    assert reopened.epsilon == eps2
    eps3 = reopened.record(run_id="run-b", round=1, steps=ROUND)  # another run on the same site
    assert eps3 == pytest.approx(compute_epsilon(steps=ROUND * 3, delta=DELTA), rel=1e-12)
    assert eps3 > eps2

    data = json.loads(ledger.path.read_text())
    assert data["accountant"] == "rdp" and data["delta"] == DELTA
    assert data["history"] == [[1.0, 0.01, 24]]
    assert [(e["run_id"], e["round"]) for e in data["entries"]] == [("run-a", 1), ("run-a", 2), ("run-b", 1)]
    assert data["entries"][-1]["epsilon"] == eps3 and data["entries"][0]["timestamp"]


def test_a_stale_handle_still_counts_what_others_recorded(tmp_path):
    """Two runs holding the ledger open: each record re-reads the file, nothing is lost."""
    a = PrivacyLedger.open(tmp_path / "l.json", delta=DELTA)
    b = PrivacyLedger.open(tmp_path / "l.json", delta=DELTA)
    a.record(run_id="a", round=1, steps=ROUND)
    eps = b.record(run_id="b", round=1, steps=ROUND)
    assert eps == pytest.approx(compute_epsilon(steps=ROUND * 2, delta=DELTA), rel=1e-12)
    assert len(PrivacyLedger.open(tmp_path / "l.json", delta=DELTA).entries) == 2


def test_would_exceed_and_budget_refusal(tmp_path):
    ledger = PrivacyLedger.open(tmp_path / "l.json", delta=DELTA)
    one = compute_epsilon(steps=ROUND, delta=DELTA)
    two = compute_epsilon(steps=ROUND * 2, delta=DELTA)
    assert ledger.would_exceed(max_epsilon=one + 1e-9, steps=ROUND) == (False, one)
    assert ledger.would_exceed(max_epsilon=one - 1e-9, steps=ROUND) == (True, one)
    ledger.record(run_id="r", round=1, steps=ROUND, max_epsilon=one + 1e-9)
    exceeds, after = ledger.would_exceed(max_epsilon=one + 1e-9, steps=ROUND)
    assert exceeds and after == pytest.approx(two, rel=1e-12)
    before = ledger.path.read_bytes()
    with pytest.raises(BudgetExceeded, match="raise privacy.record.max_epsilon"):
        ledger.record(run_id="r", round=2, steps=ROUND, max_epsilon=one + 1e-9)
    assert ledger.path.read_bytes() == before and ledger.epsilon == one
    assert ledger.would_exceed(max_epsilon=math.inf, steps=ROUND)[0] is False


def test_corrupt_file_is_an_error_that_keeps_the_file(tmp_path):
    path = tmp_path / "privacy_ledger.json"
    path.write_text('{"format": "metafed-privacy-ledger", "vers')
    with pytest.raises(PrivacyLedgerError) as err:
        PrivacyLedger.open(path, delta=DELTA)
    message = str(err.value)
    assert str(path) in message and "not valid JSON" in message
    assert "left exactly as it is" in message and "Restore it from a backup" in message
    assert path.read_text() == '{"format": "metafed-privacy-ledger", "vers'


def test_tampered_history_is_detected(tmp_path):
    path = tmp_path / "l.json"
    PrivacyLedger.open(path, delta=DELTA).record(run_id="r", round=1, steps=ROUND)
    data = json.loads(path.read_text())
    data["history"] = [[1.0, 0.01, 1]]  # someone "reset" the budget by hand
    path.write_text(json.dumps(data))
    with pytest.raises(PrivacyLedgerError, match="does not match the steps of its entries"):
        PrivacyLedger.open(path, delta=DELTA)


def test_other_accountant_or_delta_is_refused_and_says_what_to_do(tmp_path):
    path = tmp_path / "l.json"
    PrivacyLedger.open(path, delta=DELTA).record(run_id="r", round=1, steps=ROUND)
    before = path.read_bytes()
    with pytest.raises(PrivacyLedgerError, match="privacy.record.accountant=rdp and privacy.record.delta=1e-05"):
        PrivacyLedger.open(path, accountant="prv", delta=DELTA)
    with pytest.raises(PrivacyLedgerError, match="delta=1e-06"):
        PrivacyLedger.open(path, delta=1e-6)
    assert path.read_bytes() == before


def test_writes_are_atomic(tmp_path, monkeypatch):
    path = tmp_path / "l.json"
    ledger = PrivacyLedger.open(path, delta=DELTA)
    eps = ledger.record(run_id="r", round=1, steps=ROUND)
    before = path.read_bytes()

    def half_then_fail(obj, fp, **kwargs):
        fp.write('{"format": "metafed-privacy-ledger", "history": [[1.0, ')
        raise OSError("disk full")

    monkeypatch.setattr(json, "dump", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        ledger.record(run_id="r", round=2, steps=ROUND)
    monkeypatch.undo()
    assert path.read_bytes() == before  # the old ledger, whole
    # no temp file left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.json", "l.json.lock", "l.json.receipt"]
    assert ledger.epsilon == eps and len(ledger.entries) == 1  # nor a half-applied state
    assert PrivacyLedger.open(path, delta=DELTA).epsilon == eps


def test_a_ledger_that_went_backwards_is_refused_and_reset_starts_it_again(tmp_path):
    from common.privacy.ledger import LedgerRolledBack, reset

    path = tmp_path / "l.json"
    ledger = PrivacyLedger.open(path, delta=DELTA)
    ledger.record(run_id="r", round=1, steps=ROUND)
    one = path.read_bytes()
    two_eps = ledger.record(run_id="r", round=2, steps=ROUND)
    two = path.read_bytes()
    assert json.loads((tmp_path / "l.json.receipt").read_text())["entries"] == 2

    path.unlink()  # deleted
    with pytest.raises(LedgerRolledBack, match="vouches for 2 recorded rounds.*is missing.*reset-ledger"):
        PrivacyLedger.open(path, delta=DELTA)
    path.write_bytes(one)  # an older copy restored
    with pytest.raises(LedgerRolledBack, match="holds 1"):
        PrivacyLedger.open(path, delta=DELTA)
    emptied = json.loads(two)
    emptied.update(history=[], entries=[])
    path.write_text(json.dumps(emptied))
    with pytest.raises(LedgerRolledBack, match="holds 0"):
        PrivacyLedger.open(path, delta=DELTA)
    rewritten = json.loads(two)
    rewritten["entries"][0]["steps"] = [[9.0, 0.01, 1]]  # same length, other history: a forged past
    rewritten["history"] = [[9.0, 0.01, 1], *rewritten["entries"][1]["steps"]]
    path.write_text(json.dumps(rewritten))
    with pytest.raises(LedgerRolledBack, match="differ"):
        PrivacyLedger.open(path, delta=DELTA)

    path.write_bytes(two)  # the real ledger back: it goes on
    assert PrivacyLedger.open(path, delta=DELTA).epsilon == two_eps
    moved = reset(path)
    assert [old.name for old, _ in moved] == ["l.json", "l.json.receipt"]
    assert all(new.is_file() and ".reset-" in new.name for _, new in moved)  # kept aside, not deleted
    fresh = PrivacyLedger.open(path, delta=DELTA)
    assert fresh.epsilon == 0.0 and fresh.entries == []


def test_a_ledger_without_a_receipt_is_adopted(tmp_path):
    path = tmp_path / "l.json"
    ledger = PrivacyLedger.open(path, delta=DELTA)
    ledger.record(run_id="r", round=1, steps=ROUND)
    (tmp_path / "l.json.receipt").unlink()  # written before receipts existed
    again = PrivacyLedger.open(path, delta=DELTA)
    again.record(run_id="r", round=2, steps=ROUND)
    assert json.loads((tmp_path / "l.json.receipt").read_text())["entries"] == 2
