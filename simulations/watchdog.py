"""Ends the processes a simulation started once the command itself is gone.

``ray.init`` starts Ray's GCS server and raylet as children of the command,
and the raylet starts the workers and agents. When the command is killed
(SIGKILL: no handler runs), some of those linger for a minute before they
notice. The watchdog is a small separate process that keeps a list of the
command's descendants (from ``/proc``, each with its start time so that a
reused pid is never mistaken for one of them) and, as soon as the command has
exited, kills those still running. Processes that were already children when
it started are not its business and are left alone.

    python -m simulations.watchdog PARENT_PID [PID,PID,...]   (children to leave alone)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

_POLL_S = 0.5


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of a process, or None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces.
    fields = raw[raw.rindex(")") + 2:].split()
    return int(fields[1]), int(fields[19])


def descendants(root: int) -> dict[int, int]:
    """pid -> start time of every process below ``root``."""
    children: dict[int, list[tuple[int, int]]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            info = _stat(int(entry))
            if info is not None:
                children.setdefault(info[0], []).append((int(entry), info[1]))
    found: dict[int, int] = {}
    stack = [root]
    while stack:
        for pid, start in children.get(stack.pop(), []):
            if pid not in found:
                found[pid] = start
                stack.append(pid)
    return found


def watch(parent: int, before: set[int]) -> None:
    """Until ``parent`` is gone, note its descendants (but ``before``); then kill those still running."""
    me = os.getpid()
    parent_start = (_stat(parent) or (0, -1))[1]
    known: dict[int, int] = {}
    while (info := _stat(parent)) is not None and info[1] == parent_start:
        known.update({p: s for p, s in descendants(parent).items() if p not in before and p != me})
        time.sleep(_POLL_S)
    for pid, start in known.items():
        info = _stat(pid)
        if info is not None and info[1] == start:  # the same process, not a reused pid
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def start() -> subprocess.Popen | None:
    """Watch this process; None where there is no ``/proc`` to read."""
    if not Path("/proc/self/stat").is_file():
        return None
    before = ",".join(map(str, descendants(os.getpid())))  # listed here: the watchdog starts later
    return subprocess.Popen(
        [sys.executable, "-m", "simulations.watchdog", str(os.getpid()), before],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        # Its own session: a Ctrl-C or a kill of the command's process group leaves it to clean up.
        start_new_session=True,
        cwd=str(Path(__file__).resolve().parents[1]),
    )


if __name__ == "__main__":
    watch(int(sys.argv[1]), {int(p) for p in sys.argv[2].split(",") if p} if len(sys.argv) > 2 else set())
