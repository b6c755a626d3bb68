"""Atomic checkpoints of the server state: tensors with torch.save, the rest as JSON.

Layout, under a run directory::

    checkpoints/round-000004/state.pt    global parameters, optimizer tensors, torch RNG state,
                                         the server's secret key (SECRET: file mode 0600)
    checkpoints/round-000004/state.json  round, optimizer scalars, aggregator state,
                                         metrics so far, resolved config, seeds

``state.pt`` holds the key of the client-level DP noise and site sampling
(:attr:`server.state.ServerState.secret_key`): whoever reads it can rebuild
that noise and subtract it from the released models. Keep checkpoints where
only the server's operator can read them; share ``final_params.pt``, the
metrics and the config instead.

A checkpoint directory is written under a temporary name, flushed, and renamed
into place with ``os.replace``: a directory named ``round-*`` is always complete.
``state.pt`` holds only tensors and is read back with ``weights_only=True``; no
pickle anywhere.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from common.algorithms import server_opt
from server.state import ServerState

FORMAT = 1
_NAME = re.compile(r"^round-(\d{6,})$")


class CheckpointError(ValueError):
    """A run directory has no usable checkpoint."""


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def save(run_dir: str | Path, state: ServerState, *, config: dict[str, Any], keep: int = 3) -> Path:
    """Write ``state`` as ``checkpoints/round-NNNNNN``; keep the newest ``keep`` checkpoints."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"round-{state.round:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    try:
        opt_tensors, opt_scalars = server_opt.state_to_arrays(state.opt_state)
        tensors: dict[str, torch.Tensor] = {}
        tensors.update({f"params/{k}": v.detach().cpu().contiguous() for k, v in state.params.items()})
        tensors.update({f"opt/{k}": v.detach().cpu().contiguous() for k, v in opt_tensors.items()})
        tensors["rng/torch"] = torch.get_rng_state()
        tensors["secret/key"] = torch.frombuffer(bytearray(state.secret_key), dtype=torch.uint8).clone()
        # Created 0600 before anything is written: the key is never readable by others.
        with os.fdopen(os.open(tmp / "state.pt", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
            torch.save(tensors, f)
        meta = {
            "format": FORMAT,
            "round": state.round,
            "elapsed": state.elapsed,
            "opt_scalars": opt_scalars,
            "aggregator_state": state.aggregator_state,
            "history": state.history,
            "config": config,
            "param_keys": list(state.params),
            "rng": {
                "scheme": "per-round draws derive from (federation.seed, round, stream[, site id])",
                "seed": config.get("federation", {}).get("seed"),
                "torch_global": "rng/torch in state.pt",
                "client_dp": "noise and Poisson site sampling from the secret key secret/key in state.pt",
            },
        }
        (tmp / "state.json").write_text(json.dumps(meta, indent=1, allow_nan=True))
        _fsync_file(tmp / "state.pt")
        _fsync_file(tmp / "state.json")
        if final.exists():  # a rerun of the same round: swap it out
            old = root / f".old-{final.name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old_ckpt in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old_ckpt, ignore_errors=True)
    return final


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def load(path: str | Path) -> tuple[ServerState, dict[str, Any]]:
    """Read one checkpoint directory -> (state, saved config dict)."""
    path = Path(path)
    try:
        meta = json.loads((path / "state.json").read_text())
        tensors = torch.load(path / "state.pt", weights_only=True, map_location="cpu")
    except (OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"checkpoint {path} cannot be read: {err}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {meta.get('format')}, expected {FORMAT}")
    params = {k[len("params/"):]: v for k, v in tensors.items() if k.startswith("params/")}
    params = {k: params[k] for k in meta["param_keys"]}  # saved order
    opt_tensors = {k[len("opt/"):]: v for k, v in tensors.items() if k.startswith("opt/")}
    state = ServerState(
        params=params,
        opt_state=server_opt.state_from_arrays(opt_tensors, meta["opt_scalars"]),
        round=int(meta["round"]),
        history=list(meta["history"]),
        aggregator_state=dict(meta.get("aggregator_state") or {}),
        elapsed=float(meta.get("elapsed", 0.0)),
    )
    if "secret/key" in tensors:
        state.secret_key = bytes(tensors["secret/key"].numpy().tobytes())
    if "rng/torch" in tensors:
        torch.set_rng_state(tensors["rng/torch"])
    return state, meta["config"]


def load_latest(run_dir: str | Path) -> tuple[ServerState, dict[str, Any]]:
    """The newest complete checkpoint of a run."""
    found = list_checkpoints(run_dir)
    if not found:
        raise CheckpointError(
            f"no checkpoint under {Path(run_dir) / 'checkpoints'}: nothing to resume "
            "(checkpoints are written every federation.checkpoint_every rounds)"
        )
    return load(found[-1])
