"""Fault injection in a real Flower simulation: one site of four corrupts its reply, one way per round.

One run (``tests/reliability/faulty_run.py``, the project's ServerApp and its
ClientApp wrapped by an attacking one; about 40 s on 2 cores), then per round:
the bad reply is refused and counted under the check that caught it (or, for
the sign flip and the out-of-range metrics, accepted as the rules say), and the
next global model is ``torch.equal`` to the server's rule applied to the replies
it should have accepted, recomputed from what each site sent.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common import tree
from common.algorithms import server_opt
from common.data import ensure_benchmark
from server.aggregation import make_aggregator
from tests.flower.test_simulation import assert_ray_gone, ray_tmpdir
from tests.reliability.faulty_run import ATTACKER, REJECTED, ROUNDS, SCHEDULE, fault_config

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.integration]


@pytest.fixture(scope="module")
def faulty_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("faults")
    data, run_dir, records = base / "data", base / "runs" / "faulty", base / "records"
    config = fault_config(data, run_dir)
    import dataclasses

    ensure_benchmark(dataclasses.replace(config.data, generate=True))
    tmpdir = ray_tmpdir()
    proc = subprocess.run(
        [sys.executable, "-m", "tests.reliability.faulty_run", str(data), str(run_dir), str(records)],
        capture_output=True, text=True, cwd=ROOT, timeout=600, env={**os.environ, "RAY_TMPDIR": tmpdir},
    )
    assert_ray_gone(tmpdir)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return config, run_dir, records, {line["round"]: line for line in lines}


def sent(records: Path, r: int) -> dict[str, dict]:
    """What each site sent in round ``r`` (site id -> theta received, phi sent, episodes, case)."""
    return {p.stem.split("-", 1)[1]: torch.load(p) for p in sorted(records.glob(f"r{r:02d}-*.pt"))}


def test_every_bad_reply_is_refused_and_the_model_is_the_good_replies_aggregate(faulty_run):
    config, run_dir, records, lines = faulty_run
    assert sorted(lines) == list(range(1, ROUNDS + 1))
    final = torch.load(run_dir / "final_params.pt")
    aggregator = make_aggregator(config)
    for r, case in SCHEDULE.items():
        line = lines[r]
        replies = sent(records, r)
        refused = REJECTED.get(case)
        # Counted where it belongs.
        assert line["bounds"]["rejected"] == ({refused: 1} if refused else {}), (r, case, line.get("failures"))
        assert line["sites_invalid"] == (1 if refused else 0), (r, case)
        assert line["sites_failed"] == (1 if case == "raises" else 0), (r, case)
        good = {s: rep for s, rep in replies.items() if not (s == ATTACKER and refused)}
        assert line["sites_replied"] == len(good) == (3 if refused or case == "raises" else 4), (r, case)
        # The next model is the rule applied to the good replies, in site order.
        theta = next(iter(replies.values()))["theta"]
        deltas = [tree.sub(good[s]["phi"], theta) for s in sorted(good)]
        delta = aggregator.aggregate(deltas, [float(good[s]["episodes"]) for s in sorted(good)], template=theta,
                                     server_round=r, num_sampled=4, expected_sampled=4)
        want, _ = server_opt.apply(theta, delta, server_opt.init_state(theta, config=config.server_opt),
                                   config=config.server_opt, round_index=r - 1, total_rounds=ROUNDS)
        got = next(iter(sent(records, r + 1).values()))["theta"] if r < ROUNDS else final
        for k in want:
            assert torch.equal(got[k], want[k]), (r, case, k)


def test_reasons_and_metrics_of_the_bad_rounds(faulty_run):
    config, run_dir, records, lines = faulty_run
    by_case = {case: lines[r] for r, case in SCHEDULE.items()}
    reason = lambda case: by_case[case]["failures"][0]["reason"]  # noqa: E731
    assert by_case["finite_1e30"]["failures"][0]["site"] == ATTACKER
    assert "replies.max_update_norm" in reason("finite_1e30")
    assert "median" in reason("scaled_x100")
    assert "repeats an earlier reply" in reason("stale_replay")
    assert "not for round 5" in reason("wrong_round")
    assert "over the cap" in reason("oversized_extra_array")
    # A site's exception: type, message and file, no ANSI codes or Ray's header, bounded.
    raised = reason("raises")
    assert raised.startswith("ValueError: cannot read ") and "labels.npy: injected fault" in raised, raised
    assert "\x1b" not in raised and "pid=" not in raised and "actor_id" not in raised and len(raised) <= 400
    assert raised.endswith(")") and "tests/reliability/faulty_run.py:" in raised  # the file that raised
    # Out-of-range metrics are dropped before metrics.jsonl: the line's train loss is the honest sites' mean.
    line = by_case["metrics_out_of_range"]
    assert line["bounds"]["metrics_dropped"] == 3
    r = next(r for r, c in SCHEDULE.items() if c == "metrics_out_of_range")
    honest = {s: rep for s, rep in sent(records, r).items() if s != ATTACKER}
    want = sum(rep["episodes"] * rep["metrics"]["train_loss"] for rep in honest.values()) / sum(
        rep["episodes"] for rep in honest.values())
    assert math.isclose(line["train"]["train_loss"], want, rel_tol=1e-9)
    assert "adapted_loss" in line["train"] and "query_accuracy" not in line["train"]  # Reptile reports no accuracy
    # Honest rounds report nothing refused.
    assert by_case["honest"]["bounds"] == {"rejected": {}, "clipped": 0, "metrics_dropped": 0,
                                           "median_update_norm": by_case["honest"]["bounds"]["median_update_norm"]}
    assert by_case["honest"]["bounds"]["median_update_norm"] > 0
