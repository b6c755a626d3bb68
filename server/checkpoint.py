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
pickle anywhere. ``state.json`` records the size and SHA-256 of ``state.pt``, so
a file damaged after the fact is named as such; resume then falls back to the
newest intact checkpoint, with a warning. Temporary folders left by a write
that was killed midway are removed on the next save or resume.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from common.algorithms import server_opt
from server.state import ServerState

FORMAT = 1
_NAME = re.compile(r"^round-(\d{6,})$")
_LEFTOVER = re.compile(r"^\.(tmp|old)-round-\d{6,}-")
_META_KEYS = ("round", "opt_scalars", "history", "config", "param_keys")
_log = logging.getLogger("metafed.checkpoint")


class CheckpointError(ValueError):
    """A checkpoint cannot be written or read; the message says why in words."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _describe(err: OSError) -> str:
    """An OSError in words (its strerror and file), not "[Errno 28] ..."."""
    what = err.strerror or type(err).__name__
    return f"{what.lower()}" + (f" ({err.filename})" if err.filename else "")


def remove_leftovers(run_dir: str | Path) -> list[Path]:
    """Remove the temporary folders of checkpoint writes that did not finish; return them."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    leftovers = [p for p in root.iterdir() if _LEFTOVER.match(p.name) and p.is_dir()]
    for p in leftovers:
        shutil.rmtree(p, ignore_errors=True)
    return leftovers


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def save(run_dir: str | Path, state: ServerState, *, config: dict[str, Any], keep: int = 3) -> Path:
    """Write ``state`` as ``checkpoints/round-NNNNNN``; keep the newest ``keep`` checkpoints."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"round-{state.round:06d}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        remove_leftovers(run_dir)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    except OSError as err:
        raise CheckpointError(f"cannot write checkpoint {final}: {_describe(err)}") from None
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
            f.flush()
            os.fsync(f.fileno())
        meta = {
            "format": FORMAT,
            "round": state.round,
            "elapsed": state.elapsed,
            "opt_scalars": opt_scalars,
            "aggregator_state": state.aggregator_state,
            "history": state.history,
            "config": config,
            "param_keys": list(state.params),
            "state_pt": {"bytes": (tmp / "state.pt").stat().st_size, "sha256": _sha256(tmp / "state.pt")},
            "rng": {
                "scheme": "per-round draws derive from (federation.seed, round, stream[, site id])",
                "seed": config.get("federation", {}).get("seed"),
                "torch_global": "rng/torch in state.pt",
                "client_dp": "noise and Poisson site sampling from the secret key secret/key in state.pt",
            },
        }
        (tmp / "state.json").write_text(json.dumps(meta, indent=1, allow_nan=True))
        _fsync_file(tmp / "state.json")
        if final.exists():  # a rerun of the same round: swap it out
            old = root / f".old-{final.name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"cannot write checkpoint {final}: {_describe(err)}") from None
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


def _read_meta(path: Path) -> dict[str, Any]:
    meta_path = path / "state.json"
    if not meta_path.is_file():
        raise CheckpointError(f"checkpoint {path} is damaged: state.json is missing")
    try:
        meta = json.loads(meta_path.read_text())
    except OSError as err:
        raise CheckpointError(f"checkpoint {path}: state.json cannot be read: {_describe(err)}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(
            f"checkpoint {path} is damaged: state.json is not valid JSON (truncated or overwritten; "
            f"{type(err).__name__} at character {getattr(err, 'pos', getattr(err, 'start', '?'))})"
        ) from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {path} is damaged: state.json does not hold a mapping")
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"checkpoint {path} has format {meta.get('format')!r}, this version reads format {FORMAT}"
        )
    missing = [k for k in _META_KEYS if k not in meta]
    if missing:
        raise CheckpointError(f"checkpoint {path} is damaged: state.json lacks {', '.join(missing)}")
    return meta


def _read_tensors(path: Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    pt = path / "state.pt"
    if not pt.is_file():
        raise CheckpointError(f"checkpoint {path} is damaged: state.pt is missing")
    recorded = meta.get("state_pt")
    if isinstance(recorded, dict):  # checkpoints written before sizes were recorded have none
        size = pt.stat().st_size
        if size != recorded.get("bytes"):
            raise CheckpointError(
                f"checkpoint {path} is damaged: state.pt has {size} bytes, {recorded.get('bytes')} were written "
                "(the file was truncated or overwritten)"
            )
        if _sha256(pt) != recorded.get("sha256"):
            raise CheckpointError(
                f"checkpoint {path} is damaged: state.pt does not match the checksum written with it"
            )
    try:
        tensors = torch.load(pt, weights_only=True, map_location="cpu")
    except OSError as err:
        if err.filename:  # the file system refused (permissions, I/O): not the file's content
            raise CheckpointError(f"checkpoint {path}: state.pt cannot be read: {_describe(err)}") from None
        raise CheckpointError(  # torch's zip reader reports a cut file as "[Errno 22] Invalid argument"
            f"checkpoint {path} is damaged: state.pt is not a readable tensor file (truncated or overwritten)"
        ) from None
    except Exception as err:  # noqa: BLE001 - torch reports damage as RuntimeError, EOFError, UnpicklingError...
        raise CheckpointError(
            f"checkpoint {path} is damaged: state.pt is not a readable tensor file "
            f"(truncated or overwritten; torch says {type(err).__name__})"
        ) from None
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise CheckpointError(f"checkpoint {path} is damaged: state.pt does not hold named tensors")
    absent = [k for k in meta["param_keys"] if f"params/{k}" not in tensors]
    if absent:
        raise CheckpointError(
            f"checkpoint {path} is damaged: state.pt lacks the parameters {', '.join(map(str, absent[:5]))}"
        )
    return tensors


def load(path: str | Path) -> tuple[ServerState, dict[str, Any]]:
    """Read one checkpoint directory -> (state, saved config dict); CheckpointError says what is wrong."""
    path = Path(path)
    meta = _read_meta(path)
    tensors = _read_tensors(path, meta)
    params = {k: tensors[f"params/{k}"] for k in meta["param_keys"]}  # saved order
    opt_tensors = {k[len("opt/"):]: v for k, v in tensors.items() if k.startswith("opt/")}
    try:
        state = ServerState(
            params=params,
            opt_state=server_opt.state_from_arrays(opt_tensors, meta["opt_scalars"]),
            round=int(meta["round"]),
            history=list(meta["history"]),
            aggregator_state=dict(meta.get("aggregator_state") or {}),
            elapsed=float(meta.get("elapsed", 0.0)),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(
            f"checkpoint {path} is damaged: its optimizer state or round does not fit together ({type(err).__name__}: "
            f"{str(err)[:200]})"
        ) from None
    if "secret/key" in tensors:
        state.secret_key = bytes(tensors["secret/key"].numpy().tobytes())
    if "rng/torch" in tensors:
        torch.set_rng_state(tensors["rng/torch"])
    return state, meta["config"]


def load_latest(
    run_dir: str | Path, *, on_damaged: Callable[[Path, str], None] | None = None
) -> tuple[ServerState, dict[str, Any]]:
    """The newest intact checkpoint of a run.

    A damaged checkpoint is skipped: ``on_damaged(path, reason)`` is called for
    it (default: a logged warning) and the one before is tried. Raises
    :class:`CheckpointError` when none is intact, with each one's reason.
    """
    remove_leftovers(run_dir)
    found = list_checkpoints(run_dir)
    if not found:
        raise CheckpointError(
            f"no checkpoint under {Path(run_dir) / 'checkpoints'}: nothing to resume "
            "(checkpoints are written every federation.checkpoint_every rounds)"
        )
    reasons: list[str] = []
    for path in reversed(found):
        try:
            return load(path)
        except CheckpointError as err:
            reasons.append(str(err))
            if on_damaged is not None:
                on_damaged(path, str(err))
            else:
                _log.warning("skipping a damaged checkpoint: %s", err)
    raise CheckpointError(
        f"no intact checkpoint under {Path(run_dir) / 'checkpoints'}: " + "; ".join(reasons)
    )


def check_fits(state: ServerState, *, shapes: dict[str, tuple[int, ...]], run_dir: str | Path) -> None:
    """Raise :class:`CheckpointError` unless the checkpoint's parameters have these names and shapes."""
    got = {k: tuple(v.shape) for k, v in state.params.items()}
    if got != dict(shapes):
        raise CheckpointError(
            f"the checkpoint in {run_dir} does not fit this model config "
            "(parameter names or shapes differ): resume with the run's own config.yaml"
        )
