"""Client-level differential privacy at the server (DP-FedAvg).

McMahan, Ramage, Talwar & Zhang, "Learning Differentially Private Recurrent
Language Models", ICLR 2018. Each round: every site's update
``phi_i - theta`` is clipped to L2 norm S, the clipped updates are summed,
N(0, (z*S)^2) noise is added to every coordinate, and the sum is divided by
the *expected* number of sampled sites q*N (not the number that replied: a
dropout must not shrink the noise relative to the signal). Sites are sampled
by Poisson sampling at rate q (``federation.poisson``), which is what makes
the amplification-by-sampling claim of the accountant true; the accountant
(Opacus RDP or PRV) steps once per round, including rounds where no site was
sampled or none replied, because the noise is released anyway.

Threat model: this protects a site's participation from everyone who sees the
global model; the server itself still sees each site's update in the clear.
The noise comes from the server's secret key (a
:class:`~common.privacy.randomness.KeyedStream` per round), which nothing
public determines: noise derived from ``federation.seed`` could be rebuilt from
config.yaml and subtracted from two consecutive global models.
"""

from __future__ import annotations

from typing import Any

from common.privacy.accounting import PrivacyAccountant
from common.privacy.clipping import noisy_mean_of_clipped, reject_non_finite
from common.privacy.randomness import KeyedStream
from common.tree import Tree


class ClientLevelDP:
    """An aggregator (see :mod:`server.aggregation`) that clips, noises and accounts."""

    def __init__(
        self,
        *,
        clip_norm: float,
        noise_multiplier: float,
        sample_rate: float,
        delta: float,
        accountant: str = "rdp",
        secret_key: bytes,
    ) -> None:
        self.clip_norm = clip_norm
        self.noise_multiplier = noise_multiplier
        self.sample_rate = sample_rate
        self.delta = delta
        self._secret_key = secret_key
        self.accountant = PrivacyAccountant(kind=accountant)
        self.last: dict[str, float] = {}

    def _generator(self, server_round: int) -> KeyedStream:
        # Noise depends on (secret key, round) only, so a resumed run draws the same noise.
        return KeyedStream(self._secret_key, label=f"client-noise/round-{int(server_round)}")

    def aggregate(
        self,
        deltas: list[Tree],
        weights: list[float],
        *,
        template: Tree,
        server_round: int,
        num_sampled: int,
        expected_sampled: float,
    ) -> Tree | None:
        # Equal weights: a site's influence must be bounded by S alone.
        kept, rejected = reject_non_finite(deltas)
        noisy = noisy_mean_of_clipped(
            kept,
            clip_norm=self.clip_norm,
            noise_multiplier=self.noise_multiplier,
            expected_clients=max(expected_sampled, 1e-12),
            generator=self._generator(server_round),
            template=template,
        )
        self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        self.last = {
            "client_epsilon": self.epsilon(),
            "client_delta": self.delta,
            "client_noise_multiplier": self.noise_multiplier,
            "client_clip_norm": self.clip_norm,
            "client_sample_rate": self.sample_rate,
            "client_steps": float(self.accountant.num_steps),
            "client_rejected": float(len(rejected)),
        }
        return noisy

    def epsilon(self) -> float:
        return self.accountant.epsilon(delta=self.delta)

    def state_dict(self) -> dict[str, Any]:
        return {"accountant": self.accountant.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.accountant.load_state_dict(state["accountant"])
