"""Which site a ClientApp serves, and the per-process caches behind it.

A ClientApp object is rebuilt for every message, but the worker process that
runs it lives on (a Ray actor in simulation, a SuperNode's app process in
deployment). So the engine (model, algorithm) and the loaded site data are kept
in module-level caches keyed by config and by path: each process builds a Task
once and reads a site directory once.

Where a node's site is:
- deployment: the ``data-path`` key of the node config
  (``flower-supernode --node-config 'data-path="/srv/site"'``);
- simulation: the site the server names in the message (``site-id`` in the
  round's config: in simulation every node sees the same data root, so the
  server assigns sites to nodes and no discovery round is needed), else the
  ``partition-id``-th directory (sorted by name) under ``data.root/train``.

The train directories are listed once per process and data root
(:func:`site_index`): a message costs a dictionary look-up, not a listing, a
``stat`` and a sort of every site directory.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.config import Config, flatten, from_run_config

DATA_PATH_KEY = "data-path"
SITE_ID_KEY = "site-id"
PARTITION_ID_KEY = "partition-id"
# Run-config keys about the run itself, not the experiment (not in the Config schema):
# ``resume`` names a run directory to continue (``flwr run . --run-config 'resume="runs/x"'``).
RESUME_KEY = "resume"
APP_KEYS = (RESUME_KEY,)

_lock = threading.Lock()
_tasks: dict[Config, Any] = {}
_configs: dict[tuple, Config] = {}
_threads_set = False
_indexes: dict[str, "SiteIndex"] = {}


class SiteLookupError(ValueError):
    """The node config does not lead to a site directory."""


def train_site_dirs(root: str | Path) -> list[Path]:
    """The train site directories of a data root, sorted by name (partition order)."""
    train = Path(root) / "train"
    if not train.is_dir():
        return []
    return sorted(p for p in train.iterdir() if p.is_dir() and not p.name.startswith("."))


def test_site_dirs(root: str | Path) -> list[Path]:
    """The held-out site directories of a data root, sorted by name."""
    test = Path(root) / "test"
    if not test.is_dir():
        return []
    return sorted(p for p in test.iterdir() if p.is_dir() and not p.name.startswith("."))


@dataclass(frozen=True)
class SiteIndex:
    """The train site directories of a data root, listed once: by partition and by name."""

    root: Path
    paths: tuple[Path, ...]
    by_name: Mapping[str, Path]

    @classmethod
    def build(cls, root: str | Path) -> "SiteIndex":
        paths = tuple(p.resolve() for p in train_site_dirs(root))
        return cls(Path(root) / "train", paths, {p.name: p for p in paths})

    def __len__(self) -> int:
        return len(self.paths)


def site_index(root: str | Path) -> SiteIndex:
    """This process's index of ``root``'s train sites (built on first use, then reused).

    A site directory added while a run goes on is not seen: the federation's
    sites are those present when it started.
    """
    key = str(root)
    index = _indexes.get(key)
    if index is None:
        with _lock:
            index = _indexes.get(key)
            if index is None:
                index = _indexes[key] = SiteIndex.build(root)
    return index


@dataclass(frozen=True)
class SiteRef:
    site_id: str
    path: Path | None  # None when the node config leads nowhere
    problem: str = ""  # why path is None


def site_ref(config: Config, node_config: Mapping[str, Any], *, site_id: str = "") -> SiteRef:
    """Find this node's site directory from its node config (never raises).

    ``site_id`` is the site the server named in the message; only a simulated
    node (one with a ``partition-id`` and no ``data-path``) serves the site it
    is told to. A deployed node always serves its own data.
    """
    if DATA_PATH_KEY in node_config and str(node_config[DATA_PATH_KEY]):
        path = Path(str(node_config[DATA_PATH_KEY])).expanduser().resolve()
        own_id = str(node_config.get(SITE_ID_KEY, "") or path.name)
        return SiteRef(own_id, path)
    if PARTITION_ID_KEY in node_config:
        index = site_index(config.data.root)
        if site_id:
            path = index.by_name.get(str(site_id))
            if path is not None:
                return SiteRef(path.name, path)
            return SiteRef(str(site_id), None, f"no site directory {site_id!r} under {index.root}")
        pid = int(node_config[PARTITION_ID_KEY])
        if 0 <= pid < len(index):
            return SiteRef(index.paths[pid].name, index.paths[pid])
        return SiteRef(
            f"partition-{pid}",
            None,
            f"partition-id {pid} has no site: {len(index)} site directories under "
            f"{index.root} (give the simulation one node per site)",
        )
    return SiteRef(
        "unknown",
        None,
        f"the node config has neither '{DATA_PATH_KEY}' nor '{PARTITION_ID_KEY}': start the "
        f"SuperNode with --node-config '{DATA_PATH_KEY}=\"/path/to/site\"'",
    )


def _same_as_default(value: Any, default: Any) -> bool:
    if isinstance(default, list):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        return list(value) == default
    if isinstance(default, (int, float)) and not isinstance(default, bool) and isinstance(value, (int, float)):
        return float(value) == float(default)
    return value == default


def config_from_run_config(run_config: Mapping[str, Any]) -> Config:
    """Flower's run config -> Config.

    Flower hands the app every key of ``[tool.flwr.app.config]`` (the schema's
    defaults) with ``--run-config`` overrides applied, and cannot say which keys
    were overridden. When ``config-file`` names a YAML file, the keys still at
    their default value are therefore left to the file, and the others override it.
    """
    flat = {k: v for k, v in run_config.items() if k not in APP_KEYS}
    if flat.get("config-file") or flat.get("config_file"):
        defaults = flatten(Config())
        flat = {
            k: v for k, v in flat.items()
            if k in ("config-file", "config_file")
            or not _same_as_default(v, defaults.get(k.replace("-", "_"), object()))
        }
    return from_run_config(flat)


def resolve_config(bound: Config | None, run_config: Mapping[str, Any]) -> Config:
    """The config bound into the app (simulate command) or parsed from Flower's run config."""
    if bound is not None:
        return bound
    key = tuple(sorted((str(k), repr(v)) for k, v in run_config.items()))
    with _lock:
        if key not in _configs:
            _configs[key] = config_from_run_config(run_config)
        return _configs[key]


def get_task(config: Config) -> Any:
    """One engine per process and config (the model and algorithm are built once)."""
    global _threads_set
    import torch

    from common.task import Task  # imported late: the engine pulls in the model code

    with _lock:
        if not _threads_set:
            torch.set_num_threads(max(1, int(config.runtime.torch_threads)))
            _threads_set = True
        if config not in _tasks:
            _tasks[config] = Task(config)
        return _tasks[config]


def load_site(task: Any, ref: SiteRef) -> Any:
    """The validated site data (the Task caches it per path); raises ValueError."""
    if ref.path is None:
        raise SiteLookupError(ref.problem)
    return task.load_site(ref.path)
