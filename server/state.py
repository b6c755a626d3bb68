"""The server's state, and how per-round randomness is derived.

Everything the server needs to go on from round ``r`` is in :class:`ServerState`:
the global parameters theta, the server optimizer's state (step count, Adam
moments or momentum: built once, never rebuilt), the number of rounds done, the
aggregator's state (a client-level DP accountant plugs in there), and the
metrics so far. :mod:`server.checkpoint` writes and reads it.

No randomness is carried from one round to the next: site sampling in round
``r`` uses ``numpy.random.default_rng([seed, r, stream])`` and the generator a
site draws its episodes' classes with in round ``r`` is seeded from
``(seed, r, site id)``. A resumed run therefore makes the same draws as an
uninterrupted one.

The draws client-level DP relies on (the server's noise, and the Poisson
sampling of sites that amplification assumes) come instead from
``secret_key``: 32 bytes from the OS, drawn when the run starts, never derived
from the config. It is a secret of the server's and is stored only in the
run's checkpoints (``state.pt``, file mode 0600), so that a resumed run draws
the same noise; it is never written to config.yaml, metrics.jsonl or
summary.json.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.algorithms.server_opt import OptState
from common.privacy.randomness import fresh_key
from common.tree import Tree

# Independent random streams within one round.
STREAM_TRAIN_SAMPLING = 0
STREAM_EVAL_SAMPLING = 1
STREAM_SITE = 2
STREAM_META_TEST = 3


@dataclass
class ServerState:
    params: Tree
    opt_state: OptState
    round: int = 0  # rounds completed
    history: list[dict[str, Any]] = field(default_factory=list)  # one metrics line per round
    aggregator_state: dict[str, Any] = field(default_factory=dict)  # JSON-able
    elapsed: float = 0.0  # wall seconds spent in rounds so far, over all sessions
    # The key of the client-level DP noise and site sampling: secret (see above).
    secret_key: bytes = field(default_factory=fresh_key, repr=False)


def round_rng(seed: int, server_round: int, stream: int) -> np.random.Generator:
    """The generator for one purpose (``stream``) in one round."""
    return np.random.default_rng([int(seed), int(server_round), int(stream)])


def site_key(site_id: str) -> int:
    """A stable integer for a site id (same across processes and runs)."""
    return zlib.crc32(site_id.encode("utf-8"))


def derived_seed(seed: int, server_round: int, stream: int, site_id: str = "") -> int:
    """A 63-bit seed for ``torch.Generator().manual_seed`` from (seed, round, stream, site)."""
    words = np.random.SeedSequence(
        [int(seed), int(server_round), int(stream), site_key(site_id)]
    ).generate_state(2, dtype=np.uint32)
    return int((int(words[0]) << 31) ^ int(words[1])) & ((1 << 63) - 1)
