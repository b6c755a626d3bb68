"""The meta-learning strategy: Flower's FedAvg with the outer step swapped in.

Per round, over Flower's own loop (``Strategy.start``):

- ``configure_train`` samples sites (a fixed count, a fraction, or Poisson
  sampling where each site joins independently with probability ``fraction``)
  from a generator seeded by ``(seed, round)``, and sends each the global
  parameters and the round's settings, with a per-site seed derived from
  ``(seed, round, site id)``.
- ``aggregate_train`` validates every reply at the boundary (its size before
  decoding, that it answers this round's instruction and is not a replay, keys,
  shapes, dtypes, finite values, a plausible ``num-examples``, metrics in
  range; :mod:`server.reply_checks`), counts and drops the bad ones and the
  error replies, bounds each update's norm, and applies
  ``theta <- server_opt(theta, mean_i w_i (phi_i - theta))`` with weights =
  episodes used, through :mod:`common.algorithms.server_opt` with state kept
  across rounds. The mean goes through a pluggable aggregator
  (:mod:`server.aggregation`): a robust rule, or client-level DP.
- ``configure_evaluate`` / ``aggregate_evaluate`` run federated evaluation
  (adapt on support, score query at sampled sites) when asked to: in
  simulation the server meta-tests centrally on held-out sites instead.

Flower's node ids are not stable across runs, so in deployment the strategy
first asks each node which site it serves (a ``query`` message) and samples
over site ids. In simulation the sites are known (``site_ids``: every node sees
the same data root) and no node is asked: the server assigns them, either one
site per node (``cohort=False``, the reference) or, with ``cohort=True``, the
round's sites spread over the nodes, one message per node naming its sites
(:data:`client.wire.COHORT_SITES`). A cohort reply is taken apart into one
reply per site, and each is checked, bounded and aggregated exactly as a
site's own reply would be.
"""

from __future__ import annotations

import math
import secrets
import statistics
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from client import wire
from common import tree
from common.algorithms import server_opt
from common.config import Config
from common.privacy.randomness import KeyedStream
from server.aggregation import Aggregator, WeightedMean
from server.reply_checks import (
    ReplayGuard,
    bound_updates,
    check_metrics,
    clean_reason,
    record_digest,
    reply_byte_cap,
    reply_nbytes,
)
from server.state import (
    STREAM_EVAL_SAMPLING,
    STREAM_SITE,
    STREAM_TRAIN_SAMPLING,
    ServerState,
    derived_seed,
    round_rng,
)

_DTYPES = {torch.float32: "float32", torch.float64: "float64", torch.float16: "float16",
           torch.bfloat16: "bfloat16", torch.int64: "int64", torch.int32: "int32"}


@dataclass(frozen=True)
class SiteReply:
    """One site's part of a reply: its own message, or its share of a cohort reply."""

    key: Any  # what the instruction was recorded under: the node id, or (node id, site id)
    node: int
    site_id: str | None  # named by the reply (cohort), else looked up from ``key``
    content: RecordDict | None  # None when it is an error
    error_reason: str = ""
    error_code: int = 0
    reply_to: str = ""


def site_replies(msg: Message, *, node: int | None = None) -> Iterator[SiteReply]:
    """The per-site replies a message carries (one, unless it answers a cohort instruction).

    ``node``: the node the reply stands for, when not its sender (the SuperLink answers for a lost node).
    """
    node = msg.metadata.src_node_id if node is None else node
    reply_to = msg.metadata.reply_to_message_id
    if msg.has_error():
        yield SiteReply(node, node, None, None, str(msg.error.reason), int(msg.error.code), reply_to)
        return
    content = msg.content
    if wire.COHORT_ERRORS not in content.config_records:
        yield SiteReply(node, node, None, content, reply_to=reply_to)
        return
    errors = content.config_records[wire.COHORT_ERRORS]
    codes = content.config_records.get(wire.COHORT_ERROR_CODES, ConfigRecord())
    for site_id, reason in errors.items():
        yield SiteReply((node, site_id), node, site_id, None, str(reason), int(codes.get(site_id, 0) or 0), reply_to)
    echo = content.config_records.get(wire.REPLY)
    prefixes = (f"{wire.ARRAYS}/", f"{wire.METRICS}/")
    names = {k.split("/", 1)[1] for k in content if k.startswith(prefixes)}
    for site_id in sorted(names - set(errors)):
        part = RecordDict()
        for record in (wire.ARRAYS, wire.METRICS):
            key = wire.cohort_key(record, site_id)
            if key in content:
                part[record] = content[key]
        if echo is not None:
            part[wire.REPLY] = echo
        yield SiteReply((node, site_id), node, site_id, part, reply_to=reply_to)


def is_due(server_round: int, every: int, total: int) -> bool:
    """Every ``every`` rounds and after the last one (``every <= 0``: the last only)."""
    return server_round == total or (every > 0 and server_round % every == 0)


def sample_sites(
    sites: list[tuple[str, int]], config: Config, server_round: int, stream: int = STREAM_TRAIN_SAMPLING,
    *, secret_key: bytes | None = None,
) -> list[tuple[str, int]]:
    """Pick this round's ``(site id, node id)`` pairs; ``sites`` must be sorted.

    Deterministic in ``(federation.seed, server_round, stream)`` and the list of
    sites, except for training under client-level DP: there the draws come from
    the server's ``secret_key``, since amplification by sampling holds only if
    nobody who sees the models can tell which sites were sampled.
    """
    fed = config.federation
    n = len(sites)
    if n == 0:
        return []
    k = expected_count(config, n)
    if config.privacy.client.enabled and stream == STREAM_TRAIN_SAMPLING:
        if secret_key is None:
            raise ValueError("client-level DP samples sites with the server's secret key: pass secret_key=")
        keys = KeyedStream(secret_key, label=f"site-sampling/round-{int(server_round)}").uniform((n,)).numpy()
        if fed.poisson:
            return [s for s, key in zip(sites, keys) if key < fed.fraction]
        return [sites[i] for i in np.sort(np.argsort(keys, kind="stable")[:k])]  # k distinct sites, uniformly
    rng = round_rng(fed.seed, server_round, stream)
    if fed.poisson:
        # Each site independently with probability q = fraction: the sampling that
        # privacy amplification by subsampling assumes. The count varies (may be 0).
        keep = rng.random(n) < fed.fraction
        return [s for s, k in zip(sites, keep) if k]
    chosen = np.sort(rng.choice(n, size=k, replace=False))
    return [sites[i] for i in chosen]


def expected_count(config: Config, num_sites: int) -> float:
    """Sites sampled per round (the mean, under Poisson sampling)."""
    fed = config.federation
    if fed.poisson:
        return fed.fraction * num_sites
    if fed.fraction > 0:
        k = int(round(fed.fraction * num_sites))
    else:
        k = fed.sites_per_round
    return min(num_sites, max(k, fed.min_sites, 1))


class MetaStrategy(FedAvg):
    """Reptile / FedMeta outer step over Flower's message API."""

    def __init__(
        self,
        config: Config,
        state: ServerState,
        *,
        aggregator: Aggregator | None = None,
        expected_nodes: int = 0,
        round_offset: int = 0,
        federated_eval: bool = False,
        discovery_timeout: float | None = None,
        run_id: str = "",
        site_ids: Sequence[str] | None = None,
        cohort: bool = False,
    ) -> None:
        fed = config.federation
        super().__init__(
            fraction_train=fed.fraction if fed.fraction > 0 else 1.0,
            fraction_evaluate=1.0,  # configure_evaluate below decides
            min_train_nodes=fed.min_sites,
            min_evaluate_nodes=fed.min_sites,
            min_available_nodes=max(fed.min_sites, expected_nodes),
            weighted_by_key=wire.NUM_EXAMPLES,
            arrayrecord_key=wire.ARRAYS,
            configrecord_key=wire.CONFIG,
        )
        self.config = config
        self.run_id = run_id
        self.state = state
        self.aggregator: Aggregator = aggregator or WeightedMean()
        if state.aggregator_state:
            self.aggregator.load_state_dict(state.aggregator_state)
        # In a cohort the nodes are workers, not sites: federation.min_sites counts sites.
        self.expected_nodes = max(expected_nodes, 1 if cohort else fed.min_sites)
        self.round_offset = round_offset
        self.federated_eval = federated_eval
        self.discovery_timeout = fed.discovery_timeout if discovery_timeout is None else discovery_timeout
        self.node_grace = min(30.0, self.discovery_timeout)
        self._waited = False
        self._queried = False  # the first site query has been sent
        self._eval_sites = 1  # sites asked to evaluate this round
        self.node_sites: dict[int, str] = {}  # node id -> site id
        # Simulation: the sites, known without asking; cohort: the nodes that share them out.
        self.site_ids = sorted(map(str, site_ids)) if site_ids is not None else None
        self.cohort = bool(cohort)
        if self.cohort and self.site_ids is None:
            raise ValueError("cohort execution needs the site ids (simulation): pass site_ids=")
        self._cohort_nodes: list[int] = []
        self.rounds: dict[int, dict[str, Any]] = {}  # per-round record
        # (round, kind) -> node (or (node, site) in a cohort) -> (site, episodes)
        self._sent: dict[tuple[int, str], dict[Any, tuple[str, int]]] = {}
        self._dtypes = {k: _DTYPES.get(v.dtype, str(v.dtype).replace("torch.", "")) for k, v in state.params.items()}
        self.reply_cap = reply_byte_cap(state.params, config.replies.max_bytes)
        self.replay = ReplayGuard(config.replies.replay_window)
        # Per round: the nonce a reply must echo, the digest of the theta sent (an
        # unchanged model is not a replay), the instructions sent (their message ids).
        self._nonce: dict[int, str] = {}
        self._theta_digest: dict[int, bytes] = {}
        self._instructions: dict[int, dict[Any, Message]] = {}
        # (round, kind) -> the messages sent: an error reply that the SuperLink
        # makes for a lost node names that node only through the message it answers.
        self._outbox: dict[tuple[int, str], list[Message]] = {}
        self._outbox_nodes: dict[tuple[int, str], dict[str, int]] = {}  # message id -> node, built once
        # Under client-level DP only bounds that depend on a site's own update apply.
        self._relative_bound = not config.privacy.client.enabled

    # ------------------------------------------------------------------ helpers
    def true_round(self, server_round: int) -> int:
        """Flower counts rounds from 1 in every session; a resumed run is offset."""
        return server_round + self.round_offset

    def record(self, server_round: int) -> dict[str, Any]:
        return self.rounds.setdefault(
            server_round,
            {
                "sites_sampled": 0, "sites_replied": 0, "sites_failed": 0, "sites_invalid": 0,
                "sites_missing": 0, "bytes_sent": 0, "bytes_received": 0, "failures": [],
                "rejected": {}, "clipped": 0, "metrics_dropped": 0,
            },
        )

    def summary(self) -> None:
        fed = self.config.federation
        if fed.poisson:
            how = f"Poisson sampling, q={fed.fraction}"
        elif fed.fraction > 0:
            how = f"fraction {fed.fraction} of sites per round"
        else:
            how = f"{fed.sites_per_round} sites per round"
        log(INFO, "\t├──> Meta-learning: %s, outer step %s (lr %s)", self.config.algorithm.name,
            self.config.server_opt.name, self.config.server_opt.lr)
        log(INFO, "\t├──> Sampling: %s", how)
        log(INFO, "\t└──> Federated evaluation: %s", "on" if self.federated_eval else "off (server meta-test)")

    def discover(self, grid: Grid) -> list[tuple[str, int]]:
        """Ask nodes not seen yet which site they serve; return sorted (site id, node id).

        The first time, wait for the expected number of nodes (one per site
        directory the server can see, in simulation) for up to ``node_grace``
        seconds, then go on with those connected if there are at least
        ``federation.min_sites``, with a warning. Always wait for ``min_sites``,
        up to ``federation.discovery_timeout``.

        The first site query waits up to ``federation.discovery_timeout`` for
        the answers (workers are still starting: seconds each), and says how
        many nodes answered; no node answering at all is an error, never a
        round trained on zero sites. Later queries (nodes that did not answer
        yet) wait at most a round's timeout.
        """
        node_ids = self.wait_for_nodes(grid)
        if self.site_ids is not None:
            return self.assign(node_ids)
        return self.query_sites(grid, node_ids)

    def assign(self, node_ids: list[int]) -> list[tuple[str, int]]:
        """Simulation: the known sites, without asking the nodes.

        One site per node (the i-th site to the i-th node by id), or, in a
        cohort, every site with its index (the round's sample is shared out
        over the nodes when the messages are made).
        """
        nodes = sorted(node_ids)
        if self.cohort:
            self._cohort_nodes = nodes
            return [(s, i) for i, s in enumerate(self.site_ids)]
        if not self.node_sites:
            if len(nodes) < len(self.site_ids):
                log(WARNING, "%d nodes for %d sites: the last %d sites are left out", len(nodes),
                    len(self.site_ids), len(self.site_ids) - len(nodes))
            self.node_sites = dict(zip(nodes, self.site_ids))
            log(INFO, "%d sites assigned to nodes (no site query: a simulation)", len(self.node_sites))
        live = set(node_ids)
        return sorted((s, n) for n, s in self.node_sites.items() if n in live)

    def wait_for_nodes(self, grid: Grid) -> list[int]:
        """The connected node ids, once enough are (see :meth:`discover`)."""
        start = time.monotonic()
        deadline = start + self.discovery_timeout
        min_nodes = 1 if self.cohort else self.config.federation.min_sites
        want = self.expected_nodes if not self._waited else min_nodes
        while len(node_ids := list(grid.get_node_ids())) < want:
            now = time.monotonic()
            if now - start > self.node_grace and len(node_ids) >= min_nodes:
                log(
                    WARNING,
                    "%d of %d expected sites connected after %.0fs: going on with them (in a "
                    "simulation give one supernode per site directory, e.g. flwr run: "
                    "--federation-config 'num-supernodes=%d')",
                    len(node_ids), want, now - start, want,
                )
                break
            if now > deadline:
                raise TimeoutError(
                    f"only {len(node_ids)} of {want} sites connected within "
                    f"{self.discovery_timeout:.0f}s (federation.discovery_timeout); in a simulation give "
                    "one supernode per site directory (flwr run: --federation-config "
                    f"'num-supernodes={want}')"
                )
            time.sleep(0.1)
        self._waited = True
        return node_ids

    def query_sites(self, grid: Grid, node_ids: list[int]) -> list[tuple[str, int]]:
        """Ask the nodes not seen yet which site they serve (see :meth:`discover`)."""
        first = not self._queried
        new = [n for n in node_ids if n not in self.node_sites]
        if new:
            queries = [
                Message(RecordDict({wire.CONFIG: ConfigRecord({})}), dst_node_id=n, message_type=MessageType.QUERY)
                for n in new
            ]
            timeout = self.discovery_timeout if first else min(self.discovery_timeout, self.config.federation.round_timeout)
            t0 = time.monotonic()
            replies = list(grid.send_and_receive(queries, timeout=timeout))
            self._queried = True
            if len(replies) < len(new):
                log(
                    WARNING,
                    "%d of %d nodes answered the site query within %.0fs (federation.discovery_timeout=%.0fs); "
                    "going on with those that did",
                    len(replies), len(new), time.monotonic() - t0, self.discovery_timeout,
                )
            for reply in replies:
                node = reply.metadata.src_node_id
                if reply.has_error():
                    log(WARNING, "node %d did not say which site it serves: %s", node, clean_reason(reply.error.reason))
                    continue
                try:
                    site_id = str(reply.content[wire.SITE][wire.SITE_ID])
                except (KeyError, TypeError):
                    log(WARNING, "node %d answered the site query without a site id", node)
                    continue
                self.node_sites[node] = site_id
            sites = sorted(self.node_sites.values())
            dupes = sorted({s for s in sites if sites.count(s) > 1})
            if dupes:
                log(WARNING, "several nodes serve the same site id: %s", ", ".join(dupes))
            log(INFO, "%d sites known (%d new)", len(self.node_sites), len(new))
            if first and not self.node_sites:
                raise TimeoutError(
                    f"none of the {len(new)} nodes said which site it serves within {timeout:.0f}s: raise "
                    "federation.discovery_timeout if the workers start slowly, or see the nodes' errors above"
                )
        live = set(node_ids)
        return sorted((s, n) for n, s in self.node_sites.items() if n in live)

    def train_config(self, server_round: int, site_id: str) -> ConfigRecord:
        c = self.config
        return ConfigRecord(
            {
                "round": server_round,
                "inner_steps": c.algorithm.inner_steps,
                "inner_lr": float(c.algorithm.inner_lr),
                "ways": c.episodes.ways,
                "shots": c.episodes.effective_train_shots,
                "query_shots": c.episodes.query_shots,
                "episodes": c.episodes.episodes_per_round,
                "seed": derived_seed(c.federation.seed, server_round, STREAM_SITE, site_id),
                "run_id": self.run_id,
                "nonce": self._nonce.get(server_round, ""),
            }
        )

    def _messages(self, kind: str, server_round: int, arrays: ArrayRecord, chosen, make_config) -> list[Message]:
        if self.cohort:
            return self._cohort_messages(kind, server_round, arrays, chosen, make_config)
        sent: dict[int, tuple[str, int]] = {}
        messages = []
        for site_id, node_id in chosen:
            config = make_config(server_round, site_id)
            if self.site_ids is not None:  # a simulated node serves the site it is told to
                config[wire.SITE_FOR] = site_id
            sent[node_id] = (site_id, int(config["episodes"]))
            messages.append(
                Message(
                    RecordDict({wire.ARRAYS: arrays, wire.CONFIG: config}),
                    dst_node_id=node_id,
                    message_type=kind,
                    group_id=str(server_round),
                )
            )
        self._sent[(server_round, kind)] = sent
        self._remember_outbox(server_round, kind, messages)
        if kind == MessageType.TRAIN:
            # The grid stamps message ids on these objects when it pushes them.
            self._instructions[server_round] = {m.metadata.dst_node_id: m for m in messages}
        self.record(server_round)["bytes_sent"] += wire.record_nbytes(arrays) * len(messages)
        return messages

    def _cohort_messages(self, kind: str, server_round: int, arrays: ArrayRecord, chosen,
                         make_config) -> list[Message]:
        """One message per node naming its share of the round's sites (dealt out in turn, by site id)."""
        nodes = self._cohort_nodes
        shares: dict[int, list[str]] = {n: [] for n in nodes}
        for j, (site_id, _) in enumerate(chosen):
            shares[nodes[j % len(nodes)]].append(site_id)
        sent: dict[tuple[int, str], tuple[str, int]] = {}
        instructions: dict[tuple[int, str], Message] = {}
        messages = []
        for node_id, share in shares.items():
            if not share:
                continue
            configs = [make_config(server_round, site_id) for site_id in share]
            common = {k: v for k, v in configs[0].items() if k != "seed"}
            config = ConfigRecord({**common, wire.COHORT_SITES: share,
                                   wire.COHORT_SEEDS: [int(c["seed"]) for c in configs]})
            message = Message(RecordDict({wire.ARRAYS: arrays, wire.CONFIG: config}), dst_node_id=node_id,
                              message_type=kind, group_id=str(server_round))
            messages.append(message)
            for site_id, c in zip(share, configs):
                sent[(node_id, site_id)] = (site_id, int(c["episodes"]))
                instructions[(node_id, site_id)] = message
        self._sent[(server_round, kind)] = sent
        self._remember_outbox(server_round, kind, messages)
        if kind == MessageType.TRAIN:
            self._instructions[server_round] = instructions
        self.record(server_round)["bytes_sent"] += wire.record_nbytes(arrays) * len(messages)
        return messages

    # ----------------------------------------------------------------- training
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        r = self.true_round(server_round)
        sites = self.discover(grid)
        chosen = sample_sites(sites, self.config, r, STREAM_TRAIN_SAMPLING, secret_key=self.state.secret_key)
        rec = self.record(r)
        rec["sites_sampled"] = len(chosen)
        rec["sites_available"] = len(sites)
        log(INFO, "round %d: sampled %d of %d sites", r, len(chosen), len(sites))
        # Unpredictable to the sites (so not from the run's seed): a reply must
        # have been made for this round's instruction. It changes no result.
        self._nonce = {r: secrets.token_hex(16)}
        self._theta_digest = {r: record_digest(arrays, self.state.params)}
        return self._messages(MessageType.TRAIN, r, arrays, chosen, self.train_config)

    def _site_parts(self, replies: Iterable[Message], sent: dict[Any, tuple[str, int]], *, server_round: int,
                    kind: str) -> Iterator[SiteReply]:
        """Each site's reply; a cohort node's error reply stands for every site it was sent."""
        for msg in replies:
            for part in site_replies(msg, node=self.origin(msg, server_round, kind)):
                if part.content is None and part.key not in sent:
                    keys = [k for k in sent if isinstance(k, tuple) and k[0] == part.node]
                    if keys:
                        for key in keys:
                            yield SiteReply(key, part.node, key[1], None, part.error_reason, part.error_code,
                                            part.reply_to)
                        continue
                yield part

    def _reject(
        self, rec: dict[str, Any], server_round: int, site_id: str, node: int, kind: str, reason: str,
        check: str | None = None,
    ) -> None:
        reason = clean_reason(reason)
        rec["sites_invalid" if kind == "invalid" else "sites_failed"] += 1
        if check is not None:  # which check refused it, counted in the round's metrics line
            rec["rejected"][check] = rec["rejected"].get(check, 0) + 1
        rec["failures"].append({"site": site_id, "kind": kind, "reason": reason})
        log(WARNING, "round %d: %s reply from site %s (node %d) dropped: %s", server_round, kind, site_id, node, reason)

    def _remember_outbox(self, server_round: int, kind: str, messages: list[Message]) -> None:
        """Keep this round's instructions of ``kind`` (and forget earlier rounds' of that kind)."""
        for book in (self._outbox, self._outbox_nodes):
            for key in [k for k in book if k[1] == kind]:
                del book[key]
        self._outbox[(server_round, kind)] = messages

    def origin(self, msg: Message, server_round: int, kind: str) -> int:
        """The node a reply stands for.

        A reply from the node itself carries its id. When a node is lost, the
        SuperLink answers for it, from its own id: the reply then names the node
        through the instruction it answers. So a lost site is recorded once,
        under its own site id (a failure, not also missing).
        """
        node = msg.metadata.src_node_id
        asked = msg.metadata.reply_to_message_id
        if not asked:
            return node
        key = (server_round, kind)
        nodes = self._outbox_nodes.get(key)
        if nodes is None:  # the grid stamps message ids when it pushes: read them once, at the first reply
            nodes = self._outbox_nodes[key] = {
                m.metadata.message_id: m.metadata.dst_node_id for m in self._outbox.get(key, [])
            }
        return nodes.get(asked, node)

    def check_round_binding(self, reply: SiteReply, server_round: int) -> str | None:
        """None when ``reply`` answers this round's instruction to its node (and site), else why not."""
        instruction = self._instructions.get(server_round, {}).get(reply.key)
        sent_id = instruction.metadata.message_id if instruction is not None else ""
        if sent_id and reply.reply_to != sent_id:
            return f"replies to message {reply.reply_to!r}, not this round's instruction"
        echo = reply.content.config_records.get(wire.REPLY)
        if echo is None:
            return f"no ConfigRecord '{wire.REPLY}' echoing the round and its nonce"
        want = self._nonce.get(server_round, "")
        if echo.get("round") != server_round or not secrets.compare_digest(str(echo.get("nonce", "")), want):
            return f"made for round {echo.get('round')!r} (or with another nonce), not for round {server_round}"
        return None

    def validate_train_reply(
        self, content: RecordDict, episodes_sent: int
    ) -> tuple[tree.Tree, int, dict[str, float], list[str]] | str:
        """``(phi, episodes, metrics, dropped metric names)`` for a well-formed reply, else why it is not.

        Metrics outside their plausible range are left out of ``metrics`` and named in the last item.
        """
        arrays = content.array_records
        if set(arrays) != {wire.ARRAYS}:
            return f"expected one ArrayRecord named '{wire.ARRAYS}', got {sorted(arrays)}"
        record = arrays[wire.ARRAYS]
        expected = self.state.params
        missing = sorted(set(expected) - set(record))
        extra = sorted(set(record) - set(expected))
        if missing or extra:
            return f"parameter names differ: missing {missing[:5]}, unexpected {extra[:5]}"
        phi: tree.Tree = {}
        for key, ref in expected.items():
            arr = record[key]
            want_shape, want_dtype = tuple(ref.shape), self._dtypes[key]
            if tuple(arr.shape) != want_shape or arr.dtype != want_dtype:
                return f"'{key}' is {arr.dtype}{list(arr.shape)}, expected {want_dtype}{list(want_shape)}"
            try:
                value = arr.numpy()
            except Exception as err:  # noqa: BLE001 - any decoding failure drops the reply
                return f"'{key}' cannot be decoded: {err}"
            if tuple(value.shape) != want_shape or str(value.dtype) != want_dtype:
                return f"'{key}' decodes to {value.dtype}{list(value.shape)}, expected {want_dtype}{list(want_shape)}"
            t = torch.from_numpy(np.array(value, copy=True))
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                return f"'{key}' has NaN or Inf values"
            phi[key] = t
        metrics_records = content.metric_records
        if wire.METRICS not in metrics_records:
            return f"no MetricRecord named '{wire.METRICS}'"
        metrics = metrics_records[wire.METRICS]
        n = metrics.get(wire.NUM_EXAMPLES)
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= episodes_sent:
            return f"'{wire.NUM_EXAMPLES}' must be an integer in [1, {episodes_sent}] (episodes sent), got {n!r}"
        scalars, dropped = check_metrics(metrics, skip=(wire.NUM_EXAMPLES,))
        return phi, n, scalars, dropped

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        r = self.true_round(server_round)
        rec = self.record(r)
        sent = self._sent.get((r, MessageType.TRAIN), {})
        checked_replies: list[tuple[str, int, tree.Tree, int, dict[str, float], bytes]] = []
        answered: set[Any] = set()
        for reply in self._site_parts(replies, sent, server_round=r, kind=MessageType.TRAIN):
            node, key = reply.node, reply.key
            site_id, episodes = sent.get(key, (reply.site_id or self.node_sites.get(node, f"node-{node}"), 0))
            if reply.content is None:
                if key in answered:
                    continue  # a second answer for one site (the SuperLink's, for a lost node): it counts once
                self._reject(rec, r, site_id, node, "error", reply.error_reason)
                answered.add(key)
                continue
            rec["bytes_received"] += sum(wire.record_nbytes(a) for a in reply.content.array_records.values())
            if key not in sent or key in answered:
                self._reject(rec, r, site_id, node, "invalid", "not sampled this round, or a second reply")
                continue
            answered.add(key)
            size = reply_nbytes(reply.content)
            if size > self.reply_cap:  # before anything is decoded
                self._reject(rec, r, site_id, node, "invalid",
                             f"the reply carries {size} bytes, over the cap of {self.reply_cap} (1.5 x the model's "
                             "bytes plus 64 KiB unless replies.max_bytes is set)", check="oversized")
                continue
            unbound = self.check_round_binding(reply, r)
            if unbound is not None:
                self._reject(rec, r, site_id, node, "invalid", unbound, check="wrong_round")
                continue
            checked = self.validate_train_reply(reply.content, episodes)
            if isinstance(checked, str):
                self._reject(rec, r, site_id, node, "invalid", checked)
                continue
            phi, n, metrics, dropped = checked
            if dropped:
                rec["metrics_dropped"] += len(dropped)
                log(WARNING, "round %d: site %s reported metrics out of range, dropped: %s", r, site_id,
                    ", ".join(dropped[:10]))
            digest = record_digest(reply.content[wire.ARRAYS], self.state.params)
            checked_replies.append((site_id, node, phi, n, metrics, digest))

        checked_replies.sort(key=lambda u: u[0])  # fixed summation order: bit-identical reruns
        fresh = []
        unchanged = self._theta_digest.get(r)
        for item in checked_replies:
            site_id, node, _, _, _, digest = item
            if digest != unchanged and self.replay.seen(digest):
                self._reject(rec, r, site_id, node, "invalid", "repeats an earlier reply (the same arrays as one "
                             f"accepted in the last {self.replay.window} rounds)", check="replayed")
                continue
            fresh.append(item)
        theta = self.state.params
        rules = self.config.replies
        bounded = bound_updates(
            [tree.sub(phi, theta) for _, _, phi, _, _, _ in fresh], max_norm=rules.max_update_norm,
            max_ratio=rules.max_update_ratio, on_excess=rules.on_excess, relative=self._relative_bound,
        )
        for i, reason in bounded.rejected:
            self._reject(rec, r, fresh[i][0], fresh[i][1], "invalid", reason, check="update_norm")
        rec["clipped"] = len(bounded.clipped)
        rec["median_update_norm"] = bounded.median_norm
        updates = [fresh[i] for i in bounded.kept]
        self.replay.commit({u[5] for u in updates})
        rec["sites_replied"] = len(updates)
        rec["sites_missing"] = len(set(sent) - answered)
        self._instructions.pop(r, None)
        self._outbox.pop((r, MessageType.TRAIN), None)
        self._outbox_nodes.pop((r, MessageType.TRAIN), None)

        deltas = bounded.deltas
        weights = [float(n) for _, _, _, n, _, _ in updates]
        delta = self.aggregator.aggregate(
            deltas, weights, template=theta, server_round=r, num_sampled=rec["sites_sampled"],
            expected_sampled=expected_count(self.config, rec.get("sites_available", 0)),
        )
        self.state.aggregator_state = self.aggregator.state_dict()
        report = getattr(self.aggregator, "last", None)
        if report:
            rec[getattr(self.aggregator, "report_key", "privacy")] = dict(report)
        train_metrics = _weighted_metrics([(n, m) for _, _, _, n, m, _ in updates])
        site_epsilons = sorted(m["epsilon"] for _, _, _, _, m, _ in updates if "epsilon" in m)
        if site_epsilons:  # record-level DP: the worst site's budget, and the typical one
            train_metrics["epsilon_max"] = site_epsilons[-1]
            train_metrics["epsilon_median"] = float(statistics.median(site_epsilons))
        train_metrics["episodes"] = float(sum(weights))
        if delta is not None:
            new_params, new_opt = server_opt.apply(
                theta, delta, self.state.opt_state, config=self.config.server_opt,
                round_index=r - 1, total_rounds=self.config.federation.rounds,
            )
            train_metrics["update_norm"] = float(tree.global_norm(tree.sub(new_params, theta)))
            self.state.params, self.state.opt_state = new_params, new_opt
        else:
            log(WARNING, "round %d: no valid site update; the global model is unchanged", r)
        rec["train"] = train_metrics
        if delta is None:
            return None, MetricRecord(train_metrics)
        return wire.tree_to_record(self.state.params), MetricRecord(train_metrics)

    # --------------------------------------------------------------- evaluation
    def eval_due(self, server_round: int) -> bool:
        return self.federated_eval and is_due(server_round, self.config.federation.eval_every, self.config.federation.rounds)

    def eval_config(self, server_round: int, site_id: str) -> ConfigRecord:
        c = self.config
        per_site = max(1, math.ceil(c.federation.eval_episodes / max(1, self._eval_sites)))
        return ConfigRecord(
            {
                "round": server_round,
                "inner_steps": c.algorithm.eval_inner_steps,
                "ways": c.episodes.ways,
                "shots": c.episodes.shots,
                "query_shots": c.episodes.query_shots,
                "episodes": per_site,
                "seed": derived_seed(c.federation.seed, server_round, STREAM_SITE + 10, site_id),
            }
        )

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        r = self.true_round(server_round)
        if not self.eval_due(r):
            return []
        sites = self.discover(grid)
        chosen = sample_sites(sites, self.config, r, STREAM_EVAL_SAMPLING)
        self._eval_sites = len(chosen)
        self.record(r)["eval_sites_sampled"] = len(chosen)
        return self._messages(MessageType.EVALUATE, r, arrays, chosen, self.eval_config)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        r = self.true_round(server_round)
        if not self.eval_due(r):
            return None
        rec = self.record(r)
        sent = self._sent.get((r, MessageType.EVALUATE), {})
        results: list[tuple[int, dict[str, float]]] = []
        failed = invalid = 0
        private: list[str] = []  # sites under record-level DP refuse: not a failure
        for reply in self._site_parts(replies, sent, server_round=r, kind=MessageType.EVALUATE):
            node, key = reply.node, reply.key
            site_id, episodes = sent.get(key, (reply.site_id or self.node_sites.get(node, f"node-{node}"), 0))
            if reply.content is None and reply.error_code == wire.PRIVATE_SITE_REFUSED:
                private.append(site_id)
                continue
            if reply.content is None:
                failed += 1
                log(WARNING, "round %d: evaluation at site %s failed: %s", r, site_id, reply.error_reason)
                continue
            metrics = reply.content.metric_records.get(wire.METRICS)
            n = metrics.get(wire.NUM_EXAMPLES) if metrics is not None else None
            if key not in sent or not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= episodes:
                invalid += 1
                log(WARNING, "round %d: evaluation reply from site %s dropped (num-examples %r)", r, site_id, n)
                continue
            kept, dropped = check_metrics(metrics, skip=(wire.NUM_EXAMPLES,))
            if dropped:
                rec["metrics_dropped"] += len(dropped)
                log(WARNING, "round %d: site %s reported evaluation metrics out of range, dropped: %s", r, site_id,
                    ", ".join(dropped[:10]))
            results.append((n, kept))
        if private:
            log(INFO, "round %d: %d site(s) under record-level DP declined federated evaluation (they release "
                "only noised weights; hold out sites under data.root/test for a meta-test): %s",
                r, len(private), ", ".join(sorted(private)[:10]) + (" ..." if len(private) > 10 else ""))
        counts = {"sites_failed": failed, "sites_invalid": invalid, "sites_private": len(private)}
        if not results:
            rec["federated_eval"] = {"sites_replied": 0, **counts}
            return None
        agg = _weighted_metrics(results)
        agg["episodes"] = float(sum(n for n, _ in results))
        rec["federated_eval"] = {**agg, "sites_replied": len(results), **counts}
        return MetricRecord(agg)


def _weighted_metrics(items: list[tuple[int, dict[str, float]]]) -> dict[str, float]:
    """Mean of each metric over the replies that report it, weighted by episodes."""
    sums: dict[str, float] = {}
    totals: dict[str, float] = {}
    for n, metrics in items:
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + n * v
            totals[k] = totals.get(k, 0.0) + n
    return {k: sums[k] / totals[k] for k in sorted(sums)}
