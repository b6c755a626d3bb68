"""A site's privacy ledger: the budget it has spent, across rounds and across runs.

Epsilon is cumulative over everything a site has ever released about its
records, not per round or per run. The ledger is a JSON file kept next to the
site's data (``<site_dir>/privacy_ledger.json`` by default) holding the
accountant kind, delta, the full composition history and one entry per
recorded round::

    {
      "format": "metafed-privacy-ledger", "version": 1,
      "accountant": "rdp", "delta": 1e-05,
      "history": [[noise_multiplier, sample_rate, count], ...],
      "entries": [{"run_id": "...", "round": 3, "steps": [[sigma, q, count], ...],
                   "epsilon": 1.23, "timestamp": "2026-01-01T00:00:00+00:00"}, ...]
    }

Writes are atomic (temporary file in the same folder, fsync, ``os.replace``),
and :meth:`PrivacyLedger.record` re-reads the file under an exclusive lock
before appending, so two runs sharing a site never lose each other's spending.
A ledger that is unreadable, inconsistent, or was written with another
accountant or delta is an error that names the file and what to do; the file
is never reset or overwritten in that case.

A missing ledger reads as an empty one, so a deleted, emptied or restored
ledger would silently give a site its budget back. Each :meth:`PrivacyLedger.record`
therefore also writes a receipt (``<ledger>.receipt`` by default, or a file in
another folder): the number of rounds recorded and a SHA-256 digest of them.
A ledger that does not begin with the rounds its receipt vouches for has gone
backwards: :class:`LedgerRolledBack`, and the site refuses to train until an
operator puts the ledger back or resets it with :func:`reset`
(``metafed reset-ledger LEDGER --yes``).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .accounting import ACCOUNTANTS, PrivacyAccountant, Step, validate_steps

try:  # POSIX advisory locks; without them (Windows) concurrent runs are not serialised.
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

FORMAT = "metafed-privacy-ledger"
VERSION = 1
DEFAULT_FILENAME = "privacy_ledger.json"
RECEIPT_FORMAT = "metafed-privacy-ledger-receipt"
RECEIPT_SUFFIX = ".receipt"

__all__ = ["PrivacyLedger", "PrivacyLedgerError", "BudgetExceeded", "LedgerRolledBack", "DEFAULT_FILENAME",
           "default_path", "default_receipt_path", "reset"]


class PrivacyLedgerError(RuntimeError):
    """The ledger file cannot be used as it is; the message says why and what to do."""


class BudgetExceeded(PrivacyLedgerError):
    """Recording these releases would take the site past its maximum epsilon."""


class LedgerRolledBack(PrivacyLedgerError):
    """The ledger holds fewer rounds than its receipt vouches for (deleted, emptied or restored)."""


def default_path(site_dir: str | os.PathLike) -> Path:
    """``<site_dir>/privacy_ledger.json``."""
    return Path(site_dir) / DEFAULT_FILENAME


def default_receipt_path(ledger_path: str | os.PathLike) -> Path:
    """``<ledger>.receipt``, next to the ledger."""
    path = Path(ledger_path)
    return path.with_name(path.name + RECEIPT_SUFFIX)


def _digest(entries: Sequence[Any]) -> str:
    return hashlib.sha256(json.dumps(entries, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def reset(path: str | os.PathLike, *, receipt: str | os.PathLike | None = None) -> list[tuple[Path, Path]]:
    """Start a site's budget again, knowingly: move the ledger and its receipt aside.

    Both are renamed to ``<name>.reset-<UTC time>`` (kept, no longer counted).
    Returns the ``(old, new)`` paths moved; nothing is deleted.
    """
    path = Path(path)
    if path.is_dir():
        path = default_path(path)
    receipt_file = Path(receipt) if receipt is not None else default_receipt_path(path)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    moved = []
    with _locked(path):
        for old in (path, receipt_file):
            if old.exists():
                new = old.with_name(f"{old.name}.reset-{stamp}")
                os.replace(old, new)
                moved.append((old, new))
    return moved


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Exclusive lock on ``<path>.lock`` for a read-modify-write of the ledger."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _atomic_write_json(path: Path, data: Any) -> None:
    """Write JSON to ``path`` so that it is either the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _merged(steps: Iterable[Step]) -> list[Step]:
    acc = PrivacyAccountant("rdp")
    acc.step_many(steps)
    return acc.history


class PrivacyLedger:
    """The spent privacy budget of one site, saved in a JSON file.

    Open with :meth:`open`; check a round with :meth:`would_exceed` before its
    releases and account it with :meth:`record` after them. ``steps`` are step
    lists ``[(noise_multiplier, sample_rate, count), ...]`` as returned by
    :func:`common.privacy.accounting.record_level_round_steps`.
    """

    def __init__(self, path: Path, *, accountant: str, delta: float, receipt: Path | None = None) -> None:
        self.path = Path(path)
        self.receipt = Path(receipt) if receipt is not None else default_receipt_path(self.path)
        self.kind = accountant
        self.delta = float(delta)
        self._accountant = PrivacyAccountant(accountant)
        self._entries: list[dict[str, Any]] = []
        self._epsilon: float = 0.0

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(
        cls, path: str | os.PathLike, *, accountant: str = "rdp", delta: float,
        receipt: str | os.PathLike | None = None,
    ) -> "PrivacyLedger":
        """Open the ledger at ``path`` (a site directory means its default file).

        A missing file is an empty ledger; it is created by the first
        :meth:`record`, unless its receipt (``receipt``, default
        ``<ledger>.receipt``) says rounds were recorded: then
        :class:`LedgerRolledBack`. An existing file must have been written
        with the same ``accountant`` and ``delta``.
        """
        if accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {', '.join(ACCOUNTANTS)}; got {accountant!r}")
        if not 0.0 < float(delta) < 1.0:
            raise ValueError(f"delta must be in (0, 1); got {delta}")
        path = Path(path)
        if path.is_dir():
            path = default_path(path)
        ledger = cls(path, accountant=accountant, delta=delta,
                     receipt=Path(receipt) if receipt is not None else None)
        ledger._reload()
        return ledger

    def _corrupt(self, why: str) -> PrivacyLedgerError:
        return PrivacyLedgerError(
            f"privacy ledger {self.path} is unusable: {why}. It records the privacy budget this "
            "site has already spent, so it was left exactly as it is and nothing was reset. "
            "Restore it from a backup, or repair it by hand; starting a fresh ledger (moving this "
            "file aside) forgets the spent budget and voids the site's privacy guarantee."
        )

    def _read(self) -> dict[str, Any] | None:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as err:
            raise PrivacyLedgerError(f"cannot read privacy ledger {self.path}: {err}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise self._corrupt(f"not valid JSON ({err})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise self._corrupt(f"not a metafed privacy ledger (expected \"format\": \"{FORMAT}\")")
        if data.get("version") != VERSION:
            raise self._corrupt(f"ledger version {data.get('version')!r}, this code reads version {VERSION}")
        for key in ("accountant", "delta", "history", "entries"):
            if key not in data:
                raise self._corrupt(f"the key {key!r} is missing")
        return data

    def _reload(self) -> None:
        """Load the file's state into memory (or the empty state if it does not exist)."""
        data = self._read()
        self._check_receipt(data)
        if data is None:
            self._accountant = PrivacyAccountant(self.kind)
            self._entries = []
            self._epsilon = 0.0
            return
        if data["accountant"] != self.kind or data["delta"] != self.delta:
            raise PrivacyLedgerError(
                f"privacy ledger {self.path} was written with accountant={data['accountant']!r}, "
                f"delta={data['delta']!r}; this run asks for accountant={self.kind!r}, "
                f"delta={self.delta!r}. A site's budget must be accounted one way: run with "
                f"privacy.record.accountant={data['accountant']} and privacy.record.delta="
                f"{data['delta']} (the file was left unchanged)."
            )
        accountant = PrivacyAccountant(self.kind)
        try:
            accountant.load_state_dict({"mechanism": self.kind, "history": data["history"]})
        except (ValueError, TypeError) as err:
            raise self._corrupt(f"bad history ({err})") from None
        entries = data["entries"]
        if not isinstance(entries, list):
            raise self._corrupt("'entries' is not a list")
        logged: list[Step] = []
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or not {"run_id", "round", "steps"} <= entry.keys():
                raise self._corrupt(f"entry {i} lacks run_id, round or steps")
            try:
                logged.extend(validate_steps(entry["steps"]))
            except (ValueError, TypeError) as err:
                raise self._corrupt(f"entry {i} has bad steps ({err})") from None
        if _merged(logged) != _merged(accountant.history):
            raise self._corrupt("the history does not match the steps of its entries")
        if accountant.history != self._accountant.history or not self._entries:
            self._epsilon = accountant.epsilon(delta=self.delta)  # else: unchanged since last read
        self._accountant = accountant
        self._entries = [dict(e) for e in entries]

    def _check_receipt(self, data: dict[str, Any] | None) -> None:
        """Refuse a ledger that does not begin with the rounds its receipt vouches for."""
        try:
            text = self.receipt.read_text(encoding="utf-8")
        except FileNotFoundError:
            return  # no round recorded yet (or a ledger from before receipts: adopted on the next record)
        except OSError as err:
            raise PrivacyLedgerError(
                f"cannot read the receipt {self.receipt} of privacy ledger {self.path}: {err}"
            ) from None
        reset_hint = f"metafed reset-ledger {self.path} --receipt {self.receipt} --yes"
        try:
            receipt = json.loads(text)
            count, digest = int(receipt["entries"]), str(receipt["digest"])
            if receipt.get("format") != RECEIPT_FORMAT:
                raise ValueError("wrong format")
        except (ValueError, KeyError, TypeError):
            raise PrivacyLedgerError(
                f"the receipt {self.receipt} of privacy ledger {self.path} is unreadable, so the site cannot "
                f"tell whether its ledger is complete; it refuses to train. Restore the receipt, or reset "
                f"the site's budget knowingly: {reset_hint}"
            ) from None
        entries = data["entries"] if data is not None and isinstance(data.get("entries"), list) else []
        if len(entries) >= count and _digest(entries[:count]) == digest:
            return
        if data is None:
            state = "is missing"
        elif len(entries) < count:
            state = f"holds {len(entries)}"
        else:
            state = f"holds {len(entries)} rounds whose first {count} differ from them"
        raise LedgerRolledBack(
            f"privacy ledger {self.path} went backwards: its receipt {self.receipt} vouches for {count} "
            f"recorded rounds (epsilon {receipt.get('epsilon', float('nan')):.4g} at delta="
            f"{receipt.get('delta', self.delta):g}, last at {receipt.get('timestamp', '?')}), but the ledger "
            f"{state}. A deleted, emptied or restored ledger forgets budget this site has spent, so it refuses "
            f"to train. Put the ledger back from a copy of its latest state, or, to start this site's budget "
            f"again knowingly: {reset_hint}"
        )

    def _write_receipt(self, entries: list[dict[str, Any]], epsilon: float) -> None:
        written = json.loads(json.dumps(entries))  # digest what the file holds
        _atomic_write_json(self.receipt, {
            "format": RECEIPT_FORMAT, "version": VERSION, "ledger": str(self.path.resolve()),
            "entries": len(written), "digest": _digest(written), "epsilon": epsilon, "delta": self.delta,
            "timestamp": written[-1]["timestamp"] if written else _now(),
        })

    # ------------------------------------------------------------------ queries
    @property
    def epsilon(self) -> float:
        """Epsilon spent so far (at the ledger's delta), as of the last open or record."""
        return self._epsilon

    @property
    def entries(self) -> list[dict[str, Any]]:
        return [dict(e) for e in self._entries]

    @property
    def history(self) -> list[Step]:
        return self._accountant.history

    def accountant(self) -> PrivacyAccountant:
        """A copy of the ledger's accountant."""
        return self._accountant.copy()

    def epsilon_after(self, *, steps: Sequence[Sequence[Any]]) -> float:
        return self._accountant.epsilon_after(delta=self.delta, steps=steps)

    def would_exceed(self, *, max_epsilon: float, steps: Sequence[Sequence[Any]]) -> tuple[bool, float]:
        """Whether recording ``steps`` more would take epsilon past ``max_epsilon``.

        Returns ``(exceeds, epsilon_after)``; the ledger is not changed.
        """
        eps_after = self.epsilon_after(steps=steps)
        return eps_after > max_epsilon, eps_after

    # ------------------------------------------------------------------ recording
    def record(
        self,
        *,
        run_id: str,
        round: int,
        steps: Sequence[Sequence[Any]],
        max_epsilon: float = math.inf,
        not_private: str = "",
    ) -> float:
        """Account one round's releases, save the ledger, and return epsilon after it.

        ``not_private`` (why the releases give no guarantee, e.g. noise the
        server can rebuild) is written into the entry, so the ledger says so.

        The file is re-read under an exclusive lock first, so releases recorded
        meanwhile by another run on the same site are kept and counted. With
        ``max_epsilon`` set, a round that would exceed it raises
        :class:`BudgetExceeded` and nothing is recorded. If saving fails, the
        file and this object are left as they were.
        """
        checked = validate_steps(steps)
        with _locked(self.path):
            self._reload()
            accountant = self._accountant.copy()
            accountant.step_many(checked)
            eps_after = accountant.epsilon(delta=self.delta)
            if eps_after > max_epsilon:
                raise BudgetExceeded(
                    f"site budget: recording these releases would take epsilon from "
                    f"{self._epsilon:.4g} to {eps_after:.4g} at delta={self.delta:g}, past the "
                    f"maximum {max_epsilon:g}. Skip this round, or raise privacy.record.max_epsilon"
                )
            entry = {
                "run_id": str(run_id),
                "round": int(round),
                "steps": [list(s) for s in checked],
                "epsilon": eps_after,
                "timestamp": _now(),
            }
            if not_private:
                entry["not_private"] = str(not_private)
            entries = self._entries + [entry]
            data = {
                "format": FORMAT,
                "version": VERSION,
                "accountant": self.kind,
                "delta": self.delta,
                "history": accountant.state_dict()["history"],
                "entries": entries,
            }
            _atomic_write_json(self.path, data)
            self._write_receipt(entries, eps_after)  # after the ledger: a crash between leaves it behind, not ahead
            self._accountant, self._entries, self._epsilon = accountant, entries, eps_after
        return eps_after
