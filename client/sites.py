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
# The site's compute device (auto | cpu | cuda | cuda:N): the site's choice, over the run's runtime.device.
DEVICE_KEY = "device"
PARTITION_ID_KEY = "partition-id"
# Run-config keys about the run itself, not the experiment (not in the Config schema):
# ``resume`` names a run directory to continue (``flwr run . --run-config 'resume="runs/x"'``).
RESUME_KEY = "resume"
# ``run-name`` names the run directory under ``output_dir`` (``metafed deploy run``
# sets it, so that a resubmission can resume the same directory).
RUN_NAME_KEY = "run-name"
APP_KEYS = (RESUME_KEY, RUN_NAME_KEY)
CONFIG_FILE_KEYS = ("config-file", "config_file")
# The app's own folder (where its pyproject.toml is): a relative ``config-file``
# is read from here, wherever Flower runs the app from.
APP_ROOT = Path(__file__).resolve().parents[1]

# Re-entrant: building the site index reads each manifest's site_id through the same cache.
_lock = threading.RLock()
_tasks: dict[Config, Any] = {}
_configs: dict[tuple, Config] = {}
_site_ids: dict[Path, str | None] = {}
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

    ids: tuple[str, ...] = ()  # each path's site id (its manifest's site_id)

    @classmethod
    def build(cls, root: str | Path) -> "SiteIndex":
        paths = tuple(p.resolve() for p in train_site_dirs(root))
        ids = tuple(manifest_site_id(p) or p.name for p in paths)
        by_name: dict[str, Path] = {}
        for site_id, path in zip(ids, paths):
            by_name.setdefault(site_id, path)  # preflight refuses two folders with one site_id
        return cls(Path(root) / "train", paths, by_name, ids)

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


def manifest_site_id(path: Path) -> str | None:
    """The ``site_id`` a site folder's manifest declares (None when it cannot be read)."""
    from common.data.site import SiteDataError, read_manifest

    with _lock:
        if path in _site_ids:
            return _site_ids[path]
    try:
        site_id: str | None = str(read_manifest(path)["site_id"])
    except (SiteDataError, OSError, KeyError):
        site_id = None  # loading the site then says what is wrong
    with _lock:
        _site_ids[path] = site_id
    return site_id


def site_ref(config: Config, node_config: Mapping[str, Any], *, site_id: str = "") -> SiteRef:
    """Find this node's site directory from its node config (never raises).

    A site has one identifier everywhere (sampling, seeds, ledgers, metrics):
    the ``site_id`` of its manifest; the folder name only stands in when the
    manifest cannot be read. A node config ``site-id`` must agree with it.
    ``site_id`` is the site the server named in the message; only a simulated
    node (one with a ``partition-id`` and no ``data-path``) serves the site it
    is told to. A deployed node always serves its own data.
    """
    if DATA_PATH_KEY in node_config and str(node_config[DATA_PATH_KEY]):
        path = Path(str(node_config[DATA_PATH_KEY])).expanduser().resolve()
        declared = str(node_config.get(SITE_ID_KEY, "") or "")
        found = manifest_site_id(path)
        if declared and found is not None and declared != found:
            return SiteRef(declared, None, f"the node config says {SITE_ID_KEY}={declared!r} but {path}/manifest.yaml "
                           f"declares site_id {found!r}: one site has one identifier; fix either")
        return SiteRef(found or declared or path.name, path)
    if PARTITION_ID_KEY in node_config:
        index = site_index(config.data.root)
        if site_id:
            path = index.by_name.get(str(site_id))
            if path is not None:
                return SiteRef(str(site_id), path)
            return SiteRef(str(site_id), None, f"no site directory with site_id {site_id!r} under {index.root}")
        pid = int(node_config[PARTITION_ID_KEY])
        if 0 <= pid < len(index):
            return SiteRef(index.ids[pid], index.paths[pid])
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


def app_path(path: str) -> Path:
    """A path from the run config: as given when absolute, else inside the app's folder."""
    given = Path(path).expanduser()
    return given if given.is_absolute() else APP_ROOT / given


def config_from_run_config(run_config: Mapping[str, Any]) -> Config:
    """Flower's run config -> Config.

    Flower hands the app every key of ``[tool.flwr.app.config]`` (the schema's
    defaults) with ``--run-config`` overrides applied, and cannot say which keys
    were overridden. When ``config-file`` names a YAML file, the keys still at
    their default value are therefore left to the file, and the others override it.
    """
    flat = {k: v for k, v in run_config.items() if k not in APP_KEYS}
    for key in CONFIG_FILE_KEYS:
        if flat.get(key):
            flat[key] = str(app_path(str(flat[key])))
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


def with_node_device(config: Config, node_config: Mapping[str, Any]) -> Config:
    """``config`` with the node config's ``device`` (when set) as ``runtime.device``."""
    device = str(node_config.get(DEVICE_KEY, "") or "")
    if not device or device == config.runtime.device:
        return config
    import dataclasses

    return dataclasses.replace(config, runtime=dataclasses.replace(config.runtime, device=device))


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
