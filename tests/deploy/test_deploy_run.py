"""``metafed deploy run``: what it submits, and bad input found before anything is submitted."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import pytest

from client.sites import config_from_run_config
from common.config import from_dict
from simulations import deploy_run
from simulations.cli import main

ROOT = Path(__file__).resolve().parents[2]


def flatten_toml(doc, prefix=""):
    """As Flower flattens a run-config file (nested tables -> dotted keys)."""
    out = {}
    for key, value in doc.items():
        out.update(flatten_toml(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
    return out


def test_the_submitted_run_config_is_the_whole_config():
    """Written as run-config overrides and read back as the ServerApp reads it: the same Config."""
    config = from_dict({}, {
        "name": 'with "quotes" and \\ slashes', "federation.mode": "deployment", "output_dir": "/srv/runs",
        "data.modalities": ["image", "series"], "data.test_paths": ["/srv/held-out/a", "/srv/held-out/b"],
        "privacy.record.max_epsilon": math.inf, "server_opt.eps": 1e-8, "federation.poisson": True,
    })
    text = deploy_run.run_config_toml(config, {"run-name": "r1"})
    flat = flatten_toml(tomllib.loads(text))
    assert flat["run-name"] == "r1"
    assert config_from_run_config(flat) == config
    # As Flower hands it to the app: pyproject's defaults (whose config-file names the
    # shipped default) under the overrides. Keys left at the schema's default stay so.
    declared = flatten_toml(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])
    assert declared["config-file"]
    assert config_from_run_config({**declared, **flat}) == config


def test_every_key_written_is_one_the_app_declares():
    """``flwr run`` refuses a run-config key that pyproject's [tool.flwr.app.config] does not have."""
    declared = flatten_toml(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])
    written = flatten_toml(tomllib.loads(deploy_run.run_config_toml(
        from_dict({}, {"federation.mode": "deployment", "output_dir": "/srv/runs"}), {"run-name": "r", "resume": "r"})))
    assert set(written) <= set(declared)


@pytest.fixture
def flwr_home(tmp_path, monkeypatch):
    home = tmp_path / "flwr-home"
    home.mkdir()
    monkeypatch.setenv("FLWR_HOME", str(home))
    return home


def run_cli(*args):
    return main(["deploy", "run", *args])


def test_no_connection_config_is_bad_input(flwr_home, capsys, tmp_path):
    assert run_cli("metafed", "--set", f"output_dir={tmp_path}") == 2
    assert "no Flower connection config" in capsys.readouterr().err


def test_an_unknown_connection_is_bad_input(flwr_home, capsys, tmp_path):
    (flwr_home / "config.toml").write_text('[superlink.other]\naddress = "127.0.0.1:9093"\n')
    assert run_cli("metafed", "--set", f"output_dir={tmp_path}") == 2
    err = capsys.readouterr().err
    assert "no SuperLink connection 'metafed'" in err and "other" in err


def test_a_missing_ca_certificate_is_bad_input(flwr_home, capsys, tmp_path):
    (flwr_home / "config.toml").write_text(
        f'[superlink.metafed]\naddress = "127.0.0.1:9093"\nroot-certificates = "{tmp_path / "none.crt"}"\n')
    assert run_cli("metafed", "--set", f"output_dir={tmp_path}") == 2
    assert "root-certificates" in capsys.readouterr().err


def test_a_relative_output_dir_is_bad_input(flwr_home, capsys):
    assert run_cli("metafed") == 2
    assert "absolute output_dir" in capsys.readouterr().err


def test_a_folder_that_is_no_flower_app_is_bad_input(flwr_home, capsys, tmp_path):
    (flwr_home / "config.toml").write_text('[superlink.metafed]\naddress = "127.0.0.1:9093"\n')
    assert run_cli("metafed", "--set", f"output_dir={tmp_path}", "--app", str(tmp_path)) == 2
    assert "not a Flower app" in capsys.readouterr().err


def test_a_run_name_that_is_a_path_is_bad_input(flwr_home, capsys, tmp_path):
    (flwr_home / "config.toml").write_text('[superlink.metafed]\naddress = "127.0.0.1:9093"\n')
    assert run_cli("metafed", "--set", f"output_dir={tmp_path}", "--run-name", "../x") == 2
    assert "folder name" in capsys.readouterr().err
