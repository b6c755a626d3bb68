"""Bad configs and bad data are refused before Ray or Flower starts: exit code 2, no run directory.

Every case runs ``metafed simulate`` (``simulations.cli.main``) in one child
process, which reports its exit code, its stderr and whether any Ray, Flower or
gRPC module was ever imported (a simulation cannot start without importing them).
One process for all cases: torch is imported once.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from common.config import load
from common.data import load_site, write_site
from common.data.schema import ModalitySpec

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "simulations" / "configs" / "smoke.yaml"

CHILD = textwrap.dedent("""
    import contextlib, io, json, sys
    from simulations.cli import main

    results = {}
    for name, argv in json.loads(sys.argv[1]).items():
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main(argv)
        started = sorted({m.split(".")[0] for m in sys.modules if m.split(".")[0] in ("ray", "flwr", "grpc")})
        results[name] = {"code": code, "stderr": err.getvalue(), "started": started}
    print(json.dumps(results))
""")


def _rewrite(site_dir: Path, out: Path, *, change) -> None:
    """``out``: the site at ``site_dir`` with ``change(specs, arrays)`` applied, written by the format's writer."""
    site = load_site(site_dir)
    specs, arrays = dict(site.specs), {k: np.array(v) for k, v in site.arrays.items()}
    change(specs, arrays)
    write_site(out, arrays=arrays, labels=np.array(site.labels), class_names=site.class_names,
               masks={m: site.masks[m] for m in arrays if m in site.masks}, specs=specs, site_id=out.name,
               provenance={"test": "preflight"})


def _copy(smoke_data: Path, root: Path, *, sites: bool = True) -> Path:
    """A copy of the benchmark root: its benchmark.yaml (the schema) and, unless ``sites=False``, its sites."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(smoke_data / "benchmark.yaml", root / "benchmark.yaml")
    if sites:
        shutil.copytree(smoke_data / "train", root / "train")
        shutil.copytree(smoke_data / "test", root / "test")
    return root


def _resize_image(specs, arrays):
    image = arrays["image"]
    arrays["image"] = np.pad(image, ((0, 0), (0, 0), (2, 2), (2, 2)))  # [n, 1, 32, 32]
    specs["image"] = dataclasses.replace(specs["image"], shape=(1, 32, 32))


def _add_depth(specs, arrays):
    n = arrays["image"].shape[0]
    arrays["depth"] = np.zeros((n, 4), dtype=np.float32)
    specs["depth"] = ModalitySpec(name="depth", kind="series", shape=(4,), dtype="float32")


@pytest.fixture(scope="module")
def results(smoke_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("preflight")
    # A fourth train site whose images are 32x32 (the schema says 28x28).
    shape = _copy(smoke_data, tmp / "shape")
    _rewrite(smoke_data / "train" / "site-0000", shape / "train" / "site-0003", change=_resize_image)
    # Every train site with a modality the schema does not have.
    extra = _copy(smoke_data, tmp / "extra", sites=False)
    for part in ("train", "test"):
        for site in sorted((smoke_data / part).iterdir()):
            if site.is_dir():
                _rewrite(site, extra / part / site.name, change=_add_depth if part == "train" else lambda s, a: None)
    # No benchmark.yaml, so the schema is inferred from the manifests: one site's images disagree.
    disagree = tmp / "disagree"
    shutil.copytree(shape / "train", disagree / "train")
    shutil.copytree(shape / "test", disagree / "test")
    # A modality the model cannot take (a series needs [C, L]).
    bad_spec = tmp / "bad_spec"
    for part in ("train", "test"):
        for site in sorted((smoke_data / part).iterdir()):
            if site.is_dir():
                _rewrite(site, bad_spec / part / site.name, change=_add_depth)
    # A held-out site whose labels were cut short.
    held_out = _copy(smoke_data, tmp / "held_out")
    labels = held_out / "test" / "site-0000" / "labels.npy"
    np.save(labels, np.load(labels)[:-2])
    # A run to resume whose checkpoint holds a smaller model.
    resume = _resumable(tmp / "resume", smoke_data)

    def simulate(name: str, data: Path, *sets: str) -> list[str]:
        out = tmp / "runs" / name
        args = ["simulate", "--config", str(SMOKE), "--set", f"data.root={data}", "--set", "data.generate=false",
                "--set", f"output_dir={out}"]
        return args + [x for s in sets for x in ("--set", s)]

    cases = {
        "shape": simulate("shape", shape),
        "unknown_modality": simulate("unknown_modality", extra),
        "disagree": simulate("disagree", disagree),
        "bad_spec": simulate("bad_spec", bad_spec),
        "query_shots": simulate("query_shots", smoke_data, "episodes.query_shots=6"),
        "support_shots": simulate("support_shots", smoke_data, "episodes.shots=6"),
        "min_sites": simulate("min_sites", smoke_data, "federation.min_sites=4"),
        "held_out": simulate("held_out", held_out),
        "resume_other_model": ["simulate", "--resume", str(resume), "--set", "model.hidden=4"],
        # Record-level DP whose first round already costs more than the sites' budget.
        "first_round_budget": simulate("first_round_budget", smoke_data, "privacy.record.enabled=true",
                                       "site_privacy.require_record_dp=true", "site_privacy.max_epsilon=0.01",
                                       "privacy.record.max_epsilon=0.01", f"site_privacy.ledger_dir={tmp / 'ledgers'}"),
    }
    import torch

    if not torch.cuda.is_available():
        cases["cuda"] = simulate("cuda", smoke_data, "runtime.device=cuda")
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cases)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), tmp / "runs", resume


def _resumable(run_dir: Path, smoke_data: Path) -> Path:
    """A run directory with config.yaml and one checkpoint of the smoke model."""
    from common.algorithms import server_opt
    from common.config import save, to_dict
    from common.task import Task
    from server import checkpoint
    from server.state import ServerState

    config = load(SMOKE, overrides={"data.root": str(smoke_data), "data.generate": False,
                                    "output_dir": str(run_dir.parent / "unused")})
    run_dir.mkdir(parents=True)
    save(config, run_dir / "config.yaml")
    params = Task(config, device="cpu").initial_parameters(seed=0)
    state = ServerState(params=params, opt_state=server_opt.init_state(params, config=config.server_opt))
    state.round = 1
    checkpoint.save(run_dir, state, config=to_dict(config))
    return run_dir


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("shape", "modality 'image' is"),
        ("unknown_modality", "unknown modality 'depth'"),
        ("disagree", "site-0003"),
        ("bad_spec", "needs shape [C, L]"),
        ("query_shots", "records an episode needs (shots + query_shots)"),
        ("support_shots", "records an episode needs (shots + query_shots)"),
        ("min_sites", "federation.min_sites=4 but there are 3 train sites"),
        ("held_out", "labels"),
        ("resume_other_model", "does not fit this model config"),
        ("first_round_budget", "past its site_privacy.max_epsilon=0.01"),
        ("cuda", "no CUDA device"),
    ],
)
def test_bad_input_exits_2_before_ray_or_flower_starts(results, case, message):
    outcome, runs, _ = results
    if case not in outcome:
        pytest.skip("this machine has CUDA")
    got = outcome[case]
    assert got["code"] == 2, got["stderr"]
    assert message in got["stderr"] and "Traceback" not in got["stderr"]
    assert got["started"] == [], f"imported before the error: {got['started']}"
    assert not (runs / case).exists() or not any((runs / case).iterdir())  # no run directory


def test_the_message_names_the_site_and_the_fix(results):
    outcome, _, _ = results
    shape = outcome["shape"]["stderr"]
    assert "1 of 6 sites fail validation" in shape and "site-0003" in shape and "image.npy" in shape
    assert "[1, 32, 32]" in shape and "[1, 28, 28]" in shape and "data.on_invalid_site=warn" in shape
    extra = outcome["unknown_modality"]["stderr"]
    assert "3 of 5 sites fail validation" in extra and "The same at train/site-0001, train/site-0002" in extra


def test_a_refused_resume_leaves_the_run_as_it_was(results):
    _, runs, resume = results
    assert sorted(p.name for p in resume.iterdir()) == ["checkpoints", "config.yaml"]
    assert not (runs.parent / "ledgers").exists()  # the budget check spends nothing


def test_warn_lets_a_run_start_without_its_invalid_sites(smoke_data, tmp_path):
    """``data.on_invalid_site=warn``: reported, not refused, as long as min_sites valid train sites are left."""
    from simulations import preflight
    from simulations.runner import absolute_paths

    root = _copy(smoke_data, tmp_path / "data")
    _rewrite(smoke_data / "train" / "site-0000", root / "train" / "site-0003", change=_resize_image)

    def config(**sets):
        return absolute_paths(load(SMOKE, overrides={"data.root": str(root), "data.generate": False,
                                                      "data.on_invalid_site": "warn", **sets}))

    lines: list[str] = []
    checked = preflight.check(config(), ray=False, warn=lines.append)
    assert [p.name for p, _ in checked.invalid_sites] == ["site-0003"]
    assert len(checked.train_sites) == 4 and "site-0003" in lines[0] and "on_invalid_site=warn" in lines[0]
    with pytest.raises(ValueError, match="only 3 of 4 train sites are valid, fewer than federation.min_sites=4"):
        preflight.check(config(**{"federation.min_sites": "4"}), ray=False, warn=lines.append)
