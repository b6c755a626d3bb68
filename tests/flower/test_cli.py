"""The command line on bad input: the ConfigError's message on stderr, exit code 2, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "simulations" / "configs" / "smoke.yaml"


def metafed(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "simulations.cli", *args], capture_output=True, text=True, cwd=cwd or ROOT,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "federation.roundz=3"], "unknown config key 'federation.roundz'"),
        (["--set", "federation.rounds=many"], "federation.rounds: expected an integer"),
        (["--set", "algorithm.name=sgd"], "algorithm.name must be one of"),
        (["--set", "nonsense"], "must look like section.key=value"),
    ],
)
def test_bad_override_exits_2_with_the_reason(args, message, tmp_path):
    proc = metafed("simulate", "--config", str(SMOKE), "--set", f"output_dir={tmp_path}", *args)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not any(tmp_path.iterdir())  # nothing was started


def test_unknown_key_lists_the_valid_ones():
    proc = metafed("simulate", "--config", str(SMOKE), "--set", "federation.roundz=3")
    assert "Valid keys:" in proc.stderr and "federation.rounds" in proc.stderr


def test_missing_config_file(tmp_path):
    proc = metafed("simulate", "--config", str(tmp_path / "nope.yaml"))
    assert proc.returncode == 2
    assert "config file not found" in proc.stderr and "Traceback" not in proc.stderr


def test_config_file_with_a_wrong_type(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("federation:\n  rounds: [1, 2]\n")
    proc = metafed("simulate", "--config", str(bad))
    assert proc.returncode == 2
    assert "federation.rounds: expected an integer" in proc.stderr and "Traceback" not in proc.stderr


def test_config_file_that_is_not_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("federation: [unclosed\n")
    proc = metafed("simulate", "--config", str(bad))
    assert proc.returncode == 2
    assert "not valid YAML" in proc.stderr and "Traceback" not in proc.stderr


def test_resume_needs_a_run_directory(tmp_path):
    proc = metafed("simulate", "--resume", str(tmp_path))
    assert proc.returncode == 2
    assert "not a run directory" in proc.stderr


def test_resume_without_checkpoint(tmp_path):
    (tmp_path / "config.yaml").write_text(SMOKE.read_text())
    proc = metafed("simulate", "--resume", str(tmp_path))
    assert proc.returncode == 2
    assert "nothing to resume" in proc.stderr and "Traceback" not in proc.stderr


def test_missing_data_without_generation(tmp_path):
    proc = metafed("simulate", "--config", str(SMOKE), "--set", f"data.root={tmp_path / 'none'}",
                   "--set", "data.generate=false", "--set", f"output_dir={tmp_path / 'runs'}")
    assert proc.returncode == 2, proc.stderr
    assert "data.generate" in proc.stderr and "Traceback" not in proc.stderr


def test_make_data_writes_the_site_directories(tmp_path, smoke_config):
    out = tmp_path / "bench"
    proc = metafed("make-data", "--config", str(SMOKE), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert f"{out / 'train'}: {smoke_config.data.num_train_sites} sites" in proc.stdout
    assert len([p for p in (out / "test").iterdir() if p.is_dir()]) == smoke_config.data.num_test_sites
    assert (out / "train" / "site-0000" / "manifest.yaml").is_file()
    # Other settings over an existing benchmark: refused with the reason, exit 2.
    proc = metafed("make-data", "--config", str(SMOKE), "--out", str(out), "--set", "data.num_classes=50")
    assert proc.returncode == 2 and "other settings" in proc.stderr and "Traceback" not in proc.stderr


def test_flower_run_config_defaults_mirror_the_config_schema():
    """Every schema key is in [tool.flwr.app.config] with its default (Flower refuses unknown overrides)."""
    import tomllib

    from client.sites import config_from_run_config
    from common.config import Config, flatten, load, valid_keys

    app = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "server.server_app:app", "clientapp": "client.shim_app:app"}

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    run_config = flat(app["config"])
    assert set(run_config) == set(valid_keys()) | {"config-file", "resume", "run-name"}
    # `flwr run .` alone trains the shipped default (make demo's schedule), not the bare schema.
    assert run_config["config-file"] == "simulations/configs/default.yaml"
    assert config_from_run_config(run_config) == load(ROOT / "simulations/configs/default.yaml")
    assert config_from_run_config({**run_config, "config-file": ""}) == Config()
    # A key given a non-default value overrides the file.
    assert config_from_run_config({**run_config, "federation.rounds": 7}).federation.rounds == 7
    defaults = flatten(Config())
    assert all(run_config[k] == (",".join(v) if isinstance(v, list) else v) for k, v in defaults.items())
