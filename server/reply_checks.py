"""What a site's train reply must pass before its update counts.

The strategy (:mod:`server.strategy`) checks each reply in this order, from
cheapest to dearest, and drops it with a reason at the first failure:

1. size: the bytes its records carry, read from each ``Array``'s serialized
   buffer without decoding it, against a cap that follows from the model's size
   (:func:`reply_byte_cap`);
2. round binding: the reply answers the instruction sent to that node this
   round (Flower's ``reply_to`` message id) and echoes the round number and
   the round's nonce (:data:`client.wire.REPLY`);
3. structure: names, shapes, dtypes, finite values, ``num-examples``
   (``MetaStrategy.validate_train_reply``); metrics outside their plausible
   range are dropped from the reply and counted (:func:`check_metrics`);
4. replay: a reply whose arrays are byte-identical to an accepted reply of the
   last ``replies.replay_window`` rounds is stale (:class:`ReplayGuard`); an
   unchanged model (phi = theta) is exempt;
5. update bound: ``|phi - theta|`` against ``replies.max_update_norm`` and
   ``replies.max_update_ratio`` x the round's median update norm; past it the
   update is rejected or clipped (``replies.on_excess``, :func:`bound_updates`).

Then the aggregation rule (:mod:`server.aggregation`) runs on what is left.
"""

from __future__ import annotations

import hashlib
import math
import re
import statistics
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, RecordDict

from common import tree
from common.tree import Tree

# A reply may carry this much beyond the model's own bytes (npy headers, config).
REPLY_MARGIN_BYTES = 64 * 1024
REPLY_SIZE_FACTOR = 1.5


def reply_byte_cap(params: Tree, max_bytes: int = 0) -> int:
    """``replies.max_bytes``, or (0) 1.5 x the model's bytes plus 64 KiB."""
    if max_bytes > 0:
        return int(max_bytes)
    return int(REPLY_SIZE_FACTOR * tree.num_bytes(params)) + REPLY_MARGIN_BYTES


def reply_nbytes(content: RecordDict) -> int:
    """Bytes a reply's records carry: serialized arrays, plus bytes and strings in config records.

    ``Array.data`` is the buffer as received; its length is read without decoding.
    """
    total = 0
    for record in content.array_records.values():
        total += sum(len(arr.data) for arr in record.values())
    for record in content.config_records.values():
        for value in record.values():
            items = value if isinstance(value, list) else [value]
            total += sum(len(v) for v in items if isinstance(v, (bytes, str)))
    return total


def record_digest(record: ArrayRecord, keys: Iterable[str]) -> bytes:
    """SHA-256 over the serialized arrays of ``keys``, in that order (no decoding)."""
    h = hashlib.sha256()
    for key in keys:
        h.update(key.encode())
        h.update(record[key].data)
    return h.digest()


class ReplayGuard:
    """Digests of the replies accepted in the last ``window`` rounds.

    A site that sends back what it (or anyone) already sent is not answering
    this round's model: Reptile's update would be computed against a stale
    theta. Memory: one 32-byte digest per accepted reply, over ``window`` rounds.
    The window starts empty in a resumed session.
    """

    def __init__(self, window: int) -> None:
        self.window = window
        self._rounds: deque[set[bytes]] = deque(maxlen=max(window, 1))

    def seen(self, digest: bytes) -> bool:
        return self.window > 0 and any(digest in accepted for accepted in self._rounds)

    def commit(self, digests: set[bytes]) -> None:
        if self.window > 0:
            self._rounds.append(set(digests))


# Plausible ranges of the metrics a site reports, by a word of their name
# (``query_loss``, ``epsilon_max``): a value outside is dropped before it
# reaches metrics.jsonl and the progress line.
_RANGES: tuple[tuple[str, float, float, bool], ...] = (
    # (word in the name, low, high, infinity allowed)
    ("loss", 0.0, math.inf, False),
    ("accuracy", 0.0, 1.0, False),
    ("epsilon", 0.0, math.inf, True),
    ("delta", 0.0, 1.0, False),
    ("sample_rate", 0.0, 1.0, False),
    ("noise_multiplier", 0.0, math.inf, False),
    ("clip_norm", 0.0, math.inf, False),
    ("steps", 0.0, math.inf, False),
)


def check_metrics(metrics: Mapping[str, object], *, skip: Iterable[str] = ()) -> tuple[dict[str, float], list[str]]:
    """``(kept, dropped names)``: numbers in their plausible range are kept as floats.

    Every other value is dropped: non-numbers (strings, lists: no arrays in
    metrics), NaN, infinities (except an epsilon, which may be inf), and values
    out of range (a negative loss, an accuracy above 1, a negative epsilon).
    """
    skip = set(skip)
    kept: dict[str, float] = {}
    dropped: list[str] = []
    for key, value in metrics.items():
        if key in skip:
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            dropped.append(key)
            continue
        v = float(value)
        low, high, inf_ok = -math.inf, math.inf, False
        for word, lo, hi, allow_inf in _RANGES:
            if re.search(rf"(^|_){word}(_|$)", key):
                low, high, inf_ok = lo, hi, allow_inf
                break
        if math.isnan(v) or (math.isinf(v) and not (inf_ok and v > 0)) or not low <= v <= high:
            dropped.append(key)
            continue
        kept[key] = v
    return kept, dropped


@dataclass
class Bounded:
    """What :func:`bound_updates` did: the updates that count, and which were cut."""

    kept: list[int] = field(default_factory=list)  # indices into the input, in order
    deltas: list[Tree] = field(default_factory=list)  # the kept updates (clipped where needed)
    rejected: list[tuple[int, str]] = field(default_factory=list)  # (index, reason)
    clipped: list[int] = field(default_factory=list)
    median_norm: float = 0.0


def bound_updates(
    deltas: list[Tree], *, max_norm: float, max_ratio: float, on_excess: str, relative: bool = True,
) -> Bounded:
    """Apply the absolute bound, then the relative one (3 updates or more), to each update's L2 norm.

    The relative bound is ``max_ratio`` x the median norm of the updates left
    after the absolute bound (clipped ones at their clipped norm): one outlier
    cannot raise it. With fewer than 3 updates a median says nothing about
    which one is the outlier, so only the absolute bound applies. ``relative``
    is off under client-level DP: a decision that depends on the other sites'
    updates would let one site change another's contribution, which the DP
    sensitivity (one clipped update) does not cover.
    """
    out = Bounded()
    norms = [float(tree.global_norm(d).double()) for d in deltas]
    stage: list[tuple[int, Tree, float]] = []
    for i, (d, n) in enumerate(zip(deltas, norms)):
        if not n <= max_norm:  # also catches an overflow to inf
            if on_excess == "clip" and math.isfinite(n):
                stage.append((i, tree.scale(d, max_norm / n), max_norm))
                out.clipped.append(i)
            else:
                out.rejected.append((i, f"update norm {n:.4g} exceeds replies.max_update_norm={max_norm:g}"))
            continue
        stage.append((i, d, n))
    if stage:
        out.median_norm = float(statistics.median(n for _, _, n in stage))
    bound = max_ratio * out.median_norm
    for i, d, n in stage:
        if relative and len(stage) >= 3 and n > bound:
            if on_excess == "clip":
                d = tree.scale(d, bound / n)
                if i not in out.clipped:
                    out.clipped.append(i)
            else:
                out.rejected.append((i, f"update norm {n:.4g} exceeds replies.max_update_ratio={max_ratio:g} x "
                                        f"the round's median {out.median_norm:.4g}"))
                continue
        out.kept.append(i)
        out.deltas.append(d)
    out.rejected.sort()
    out.clipped.sort()
    return out


# --------------------------------------------------------------- failure reasons
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")
_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt|Warning|Died|Timeout)\w*): ?(.*)$")
_FRAME = re.compile(r'File "([^"]+)", line (\d+)')
_WRAPPERS = ("ClientAppException", "RayTaskError", "RayActorError")
REASON_LIMIT = 400


def clean_reason(text: str, limit: int = REASON_LIMIT) -> str:
    """A failure reason fit for metrics.jsonl: ``Type: message (at file:line)``, bounded.

    Flower's simulation wraps a site's exception as
    ``<class '...ClientAppException'>:<'... Message: <Ray's traceback>'>``, and
    Ray's traceback starts with a long ``ray::ClientAppActor.run() (pid=...,
    ip=..., actor_id=..., repr=...)`` header and carries ANSI colour codes. Keep
    the original exception's type and message (not Flower's or Ray's wrappers)
    and the source file and line it was raised at; a plain reason is kept as
    it is (without control codes).
    """
    text = _ANSI.sub("", str(text)).replace("\r", "")
    lines = [ln.strip() for ln in text.splitlines()]
    found: tuple[str, str] | None = None
    frame: tuple[str, str] | None = None  # the innermost frame of the exception found
    last_frame: tuple[str, str] | None = None
    for ln in lines:
        if (f := _FRAME.search(ln)) is not None:
            last_frame = (f.group(1), f.group(2))
            continue
        m = _EXCEPTION_LINE.match(ln.strip("'<>"))
        if m and not m.group(1).rsplit(".", 1)[-1].startswith(_WRAPPERS):
            found = (m.group(1).rsplit(".", 1)[-1], m.group(2).strip().strip("'>"))
            frame = last_frame
    if found is None:
        if "Traceback" not in text and "ray::" not in text:
            out = " ".join(ln for ln in lines if ln)
        else:  # a traceback without a recognizable exception line: its last non-empty line
            out = next((ln for ln in reversed(lines) if ln and not _FRAME.search(ln)), "")
            frame = last_frame
    else:
        kind, message = found
        out = f"{kind}: {message}" if message else kind
    if frame is not None:
        out += f" (at {frame[0]}:{frame[1]})"
    out = "".join(ch if ch.isprintable() else " " for ch in out)
    return out if len(out) <= limit else out[: limit - 3] + "..."
