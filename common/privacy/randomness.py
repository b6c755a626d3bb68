"""Secret randomness for the draws differential privacy relies on: noise and sampling coins.

A DP guarantee holds only against someone who cannot predict the noise and the
Poisson coins. A ``torch.Generator`` is no such source: its CPU engine is an
MT19937 that ``manual_seed`` initializes from the low 32 bits of the seed (seeds
``s`` and ``s + 2**32`` give the same stream), so a seed the adversary sent, wrote
into a config, or can enumerate lets them regenerate the noise and subtract it.
Opacus's answer (``PrivacyEngine(secure_mode=True)``) draws from ``torchcsprng``,
which is no longer maintained; this module uses the standard library instead.

:class:`KeyedStream` turns a secret key into uniform and Gaussian draws with
SHAKE-256 (FIPS 202's extendable-output function) over ``key || label ||
counter``: without the key the draws cannot be predicted, with it they can be
replayed exactly. Two uses:

* a site draws a fresh key from the OS (:func:`fresh_key`) for every round, so
  nobody, the server included, can rebuild its record-level noise or coins;
* the server draws one key at the start of a run for its client-level noise and
  its Poisson site sampling; the key lives only in the run's checkpoints, so a
  resumed run draws the same noise.

:func:`reproducible_key` derives a key from a public seed: the draws are then
reproducible by anyone who knows that seed, and the run is not private.
"""

from __future__ import annotations

import hashlib
import math
import os

import numpy as np
import torch

__all__ = ["KEY_BYTES", "KeyedStream", "fresh_key", "reproducible_key"]

KEY_BYTES = 32


def fresh_key() -> bytes:
    """``KEY_BYTES`` bytes from the operating system's CSPRNG (``os.urandom``)."""
    return os.urandom(KEY_BYTES)


def reproducible_key(seed: int) -> bytes:
    """A key anyone can derive from ``seed``: for explicitly reproducible, NOT private, runs."""
    return hashlib.sha256(b"metafed reproducible noise\x00" + str(int(seed)).encode()).digest()


class KeyedStream:
    """Uniform and standard-normal draws from SHAKE-256 keyed by a secret.

    Each draw call reads a new XOF output block ``SHAKE256(key || label ||
    counter)``; the counter advances per call, so a stream is a deterministic
    function of ``(key, label)`` and the sequence of calls. :meth:`child`
    derives an independent stream for another purpose.
    """

    def __init__(self, key: bytes, *, label: str = "") -> None:
        if not isinstance(key, (bytes, bytearray)) or len(key) < 16:
            raise ValueError("a KeyedStream needs a key of at least 16 bytes (use fresh_key())")
        self._key = bytes(key)
        self._label = label.encode()
        self._calls = 0
        self.device = torch.device("cpu")  # where draws are made (as torch.Generator.device)

    def __repr__(self) -> str:  # never print the key
        return f"KeyedStream(label={self._label.decode()!r})"

    def child(self, label: str) -> KeyedStream:
        """An independent stream for ``label`` (domain-separated from this one)."""
        sub = hashlib.sha256(self._key + b"\x00child\x00" + self._label + b"\x00" + label.encode()).digest()
        return KeyedStream(sub, label=label)

    def _words(self, count: int) -> np.ndarray:
        prefix = self._key + len(self._label).to_bytes(4, "little") + self._label
        xof = hashlib.shake_256(prefix + self._calls.to_bytes(8, "little"))
        self._calls += 1
        return np.frombuffer(xof.digest(8 * count), dtype="<u8")

    def uniform(self, shape: tuple[int, ...] | torch.Size, *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Draws in ``[0, 1)`` on a 2**-53 grid (as ``torch.rand`` in float64)."""
        shape = tuple(int(s) for s in shape)
        n = math.prod(shape)
        u = (self._words(n) >> np.uint64(11)).astype(np.float64) * 2.0**-53
        return torch.from_numpy(u.reshape(shape)).to(dtype)

    def standard_normal(self, shape: tuple[int, ...] | torch.Size, *, dtype: torch.dtype = torch.float64,
                        device: torch.device | str | None = None) -> torch.Tensor:
        """N(0, 1) draws by the Box-Muller transform of pairs of uniforms, computed in float64."""
        shape = tuple(int(s) for s in shape)
        n = math.prod(shape)
        pairs = (n + 1) // 2
        u = (self._words(2 * pairs) >> np.uint64(11)).astype(np.float64) * 2.0**-53
        radius = np.sqrt(-2.0 * np.log1p(-u[:pairs]))  # 1 - u in (0, 1]: the log is finite
        angle = 2.0 * math.pi * u[pairs:]
        z = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:n]
        return torch.from_numpy(z.reshape(shape)).to(device=device, dtype=dtype)
