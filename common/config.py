"""Experiment configuration: defined once as frozen dataclasses, parsed once.

YAML files, ``--set section.key=value`` overrides from the command line and
Flower's run config (``[tool.flwr.app.config]``, keys like ``algorithm.name``)
all map onto the same schema. Unknown keys and ill-typed values raise
:class:`ConfigError`, whose message lists the valid keys.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration is invalid; the message says which key and what is allowed."""


@dataclass(frozen=True)
class DataConfig:
    # Where site directories live. ``root/train/*`` trains, ``root/test/*`` is held out.
    root: str = "data/procedural"
    # Write the procedural benchmark into ``root`` when it is not there yet.
    generate: bool = True
    num_train_sites: int = 100
    num_test_sites: int = 20
    num_classes: int = 1200
    classes_per_site: int = 16
    records_per_class: int = 8
    modalities: tuple[str, ...] = ("image", "audio", "series")
    # Optional YAML of custom modality specs (name -> kind, shape, dtype, vocab_size).
    schema_file: str = ""
    # FedMultimodal-style missing data: a site lacks a modality with this
    # probability; a record lacks a present modality with the second one.
    site_missing_rate: float = 0.2
    record_missing_rate: float = 0.1
    # Per-record low-frequency interference in the procedural benchmark (an
    # illumination ramp on images, a channel colouring of the audio spectrum,
    # baseline wander on series), as a multiple of its reference strength;
    # 0 leaves the benchmark as it always was. It defeats raw-input similarity.
    interference: float = 0.0
    # Follow links in a site folder that lead outside it (refused by default:
    # a site's data is what its folder holds).
    allow_external_links: bool = False
    # A train or held-out site that fails validation before a simulation starts:
    # "refuse" the run (exit code 2, naming the site and the fix), or "warn" and
    # run anyway (the site answers every round with its error, as a deployed
    # site would; a held-out one is left out of the meta-test).
    on_invalid_site: str = "refuse"
    seed: int = 0
    # Held-out site folders for the server's meta-test, named by path (deployment:
    # the server holds no data root of its own). Empty: ``root/test/*``, or, in
    # deployment mode, federated evaluation at the sites that allow it.
    test_paths: tuple[str, ...] = ()


@dataclass(frozen=True)
class EpisodeConfig:
    ways: int = 5
    # Support shots at meta-test (and at training unless train_shots is set).
    shots: int = 1
    # Reptile trains better with more support shots than it is tested with.
    train_shots: int = 0  # 0: same as shots
    query_shots: int = 5
    # Episodes per site per round: the client's meta-batch.
    episodes_per_round: int = 8

    @property
    def effective_train_shots(self) -> int:
        return self.train_shots or self.shots


@dataclass(frozen=True)
class ModelConfig:
    hidden: int = 32  # conv channels per encoder layer
    embed_dim: int = 64  # per-modality embedding width
    fusion: str = "attention"  # early | late | attention
    groups: int = 4  # GroupNorm groups
    # How the convolutional encoders halve resolution: "stride" (stride-2
    # convolutions, about 4x fewer multiply-adds) or "pool" (stride-1
    # convolutions and 2x2 max pooling: the MAML / Reptile network).
    downsample: str = "stride"
    # Normalize each modality's embedding per record (a LayerNorm over its
    # features, learned scale and shift), so that every modality reaches the
    # fusion on one scale: late fusion then averages logits of comparable size.
    embedding_norm: bool = False


@dataclass(frozen=True)
class AlgorithmConfig:
    name: str = "reptile"  # none | fedavg | reptile | fomaml | maml | metasgd | protonet
    inner_steps: int = 5
    inner_lr: float = 0.1
    # sgd | adam (beta1 = 0, as Reptile's inner loop); used at meta-test too.
    inner_optimizer: str = "sgd"
    eval_inner_steps: int = 10
    # MAML-family: second-order unless this is set. Under privacy.record Meta-SGD
    # runs first-order and second-order MAML is refused (see common.algorithms.private).
    first_order: bool = False
    # MAML-family and Meta-SGD: a client takes this many local meta-steps of size
    # client_meta_lr on its episodes before it replies (FedMeta's client step).
    client_meta_lr: float = 0.5
    local_meta_steps: int = 1
    # Where every inner loop starts its linear classifier: "shared" (the
    # learned weights) or "prototypes" (Proto-MAML: rows 2 c_k and biases
    # -|c_k|^2 from the support's class means, Triantafillou et al. 2020).
    # FedAvg's own training keeps its shared head; its meta-test adapts like the others.
    head_init: str = "shared"
    # protonet: the distance to the class prototypes, "euclidean" (squared,
    # Snell et al. 2017) or "cosine"; and the steps of fine-tuning on the
    # support set's prototypical loss at meta-test before it is scored.
    proto_distance: str = "euclidean"
    proto_finetune_steps: int = 0
    # Cross-modal alignment (every algorithm): the weight of an InfoNCE loss
    # between two modalities' embeddings of the same record, added to the
    # training inner loop's loss (0: off), and its softmax temperature.
    align_weight: float = 0.0
    align_temperature: float = 0.1


@dataclass(frozen=True)
class ServerOptConfig:
    name: str = "sgd"  # sgd | adam
    lr: float = 1.0  # Reptile's outer step size epsilon
    momentum: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    schedule: str = "constant"  # constant | linear (anneal to 0 at the last round)


@dataclass(frozen=True)
class FederationConfig:
    # simulation: the server sees the data root (it may write the benchmark,
    # and expects one node per train folder); deployment: the sites hold the
    # data, the server never generates any and waits for ``min_sites``
    # registered sites up to ``discovery_timeout``; outputs go under an
    # absolute ``output_dir``.
    mode: str = "simulation"
    rounds: int = 30
    # Sites per round: a fixed count, or a fraction of the available sites when
    # fraction > 0. Poisson sampling (each site independently) when poisson=true.
    sites_per_round: int = 10
    fraction: float = 0.0
    poisson: bool = False
    min_sites: int = 1
    eval_every: int = 5
    eval_episodes: int = 200
    checkpoint_every: int = 5
    round_timeout: float = 600.0
    # Waiting for the sites to connect and say which site they serve (workers
    # start up: seconds per worker), separate from a round's own timeout.
    discovery_timeout: float = 300.0
    # A run in which more than this share of its rounds had no valid site
    # update ends as failed (exit code 1).
    max_failed_round_share: float = 0.5
    seed: int = 0
    # Seeds the held-out episodes of every meta-test, alone: not the round, not
    # federation.seed. Any two runs (of any length, Flower or simulations.local)
    # on the same held-out sites are scored on the same episodes.
    eval_seed: int = 0


@dataclass(frozen=True)
class AggregationConfig:
    # How the bounded updates phi_i - theta become one (server.aggregation):
    # mean | median | trimmed_mean | multikrum | clipped_mean.
    rule: str = "mean"
    trim_fraction: float = 0.1  # trimmed_mean: share cut at each end of every coordinate, in [0, 0.5)
    krum_byzantine: int = 1  # multikrum: f, the faulty sites tolerated among those that reply
    krum_select: int = 0  # multikrum: m, the updates averaged; 0 = n - f
    clip_norm: float = 0.0  # clipped_mean: L2 clip of each update; 0 = the round's median update norm


@dataclass(frozen=True)
class RepliesConfig:
    # Every reply's update phi - theta is bounded before it counts (server.reply_checks).
    max_update_norm: float = 1000.0  # absolute L2 bound; inf: none
    max_update_ratio: float = 10.0  # x the round's median update norm (3 replies or more); inf: none
    on_excess: str = "reject"  # reject | clip, for an update past either bound
    # Bytes of the arrays a reply carries, checked before anything is decoded;
    # 0: 1.5 x the model's bytes plus 64 KiB.
    max_bytes: int = 0
    # Rounds whose accepted replies a new reply may not repeat (a stale replay).
    replay_window: int = 5


@dataclass(frozen=True)
class RecordDPConfig:
    enabled: bool = False
    noise_multiplier: float = 1.0
    clip_norm: float = 1.0
    # Poisson sample rate of a site's records for each support set.
    sample_rate: float = 0.5
    target_epsilon: float = 0.0  # > 0: plan noise_multiplier from it
    max_epsilon: float = math.inf  # a site refuses to train past this
    delta: float = 1e-5
    accountant: str = "rdp"  # rdp | prv
    # Declared records per class, a public constant: the DP-SGD divisor is
    # sample_rate * ways * this (less the query's records for Reptile), never a
    # count of the site's records. Set it to a typical class size at the sites;
    # a wrong value only rescales the step. 0 = data.records_per_class.
    records_per_class: int = 0

    def declared_class_size(self, data: DataConfig) -> int:
        """The per-class record count the DP normalizer assumes."""
        return self.records_per_class or data.records_per_class


@dataclass(frozen=True)
class SitePrivacyConfig:
    """A site's own record-level privacy policy; the run's ``privacy.record`` may only be stricter.

    A deployed site sets it in its node config (``client.privacy_policy``);
    in a simulation every site takes it from this section.
    """

    # The site trains only under record-level DP (privacy.record.enabled must be true).
    require_record_dp: bool = False
    # The most epsilon the site spends, at ``delta``, over every round of every run.
    max_epsilon: float = math.inf
    # The delta and accountant the site's ledger is kept at (the run must use the same).
    delta: float = 1e-5
    accountant: str = "rdp"  # rdp | prv
    # The least noise multiplier the site accepts.
    min_noise_multiplier: float = 0.0
    # The most epsilon one round may cost on its own (at ``delta``).
    max_round_epsilon: float = math.inf
    # Where the site keeps its privacy ledger: "" = next to its data
    # (privacy_ledger.json), else <ledger_dir>/<site id>.json.
    ledger_dir: str = ""
    # Where the ledger's receipt (its length and digest, to notice a ledger that
    # went backwards) is kept: "" = next to the ledger. Best on another volume.
    state_dir: str = ""
    # Draw the DP noise and the Poisson coins from the round's seed (which the
    # server sent) instead of fresh OS entropy: reproducible, and NOT private.
    # A setting of the site's own policy, never of the run; every output of
    # such a run says so.
    reproducible_noise: bool = False


@dataclass(frozen=True)
class ClientDPConfig:
    enabled: bool = False
    noise_multiplier: float = 1.0
    clip_norm: float = 1.0
    target_epsilon: float = 0.0
    delta: float = 1e-5
    accountant: str = "rdp"


@dataclass(frozen=True)
class PrivacyConfig:
    record: RecordDPConfig = field(default_factory=RecordDPConfig)
    client: ClientDPConfig = field(default_factory=ClientDPConfig)


@dataclass(frozen=True)
class RuntimeConfig:
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # Simulation: one worker per core by default.
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    torch_threads: int = 1
    dtype: str = "float32"
    # Also write TensorBoard event files (run_dir/tensorboard): needs the
    # ``tensorboard`` package (pip install 'metafed[tensorboard]').
    tensorboard: bool = False
    # Simulation: each node trains a cohort of sites per round, one message per
    # node (false: one node and one message per site, as deployed).
    cohort: bool = False
    cohort_nodes: int = 0  # nodes sharing the sites out; 0: one per worker
    # Attach to a running Ray cluster ("auto", "ray://host:10001", "host:6379"); "": start a local one.
    ray_address: str = ""


@dataclass(frozen=True)
class Config:
    name: str = "default"
    output_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    episodes: EpisodeConfig = field(default_factory=EpisodeConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    server_opt: ServerOptConfig = field(default_factory=ServerOptConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    replies: RepliesConfig = field(default_factory=RepliesConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    site_privacy: SitePrivacyConfig = field(default_factory=SitePrivacyConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


_CHOICES: dict[str, tuple[str, ...]] = {
    "model.fusion": ("early", "late", "attention"),
    "model.downsample": ("stride", "pool"),
    "algorithm.name": ("none", "fedavg", "reptile", "fomaml", "maml", "metasgd", "protonet"),
    "algorithm.inner_optimizer": ("sgd", "adam"),
    "algorithm.head_init": ("shared", "prototypes"),
    "algorithm.proto_distance": ("euclidean", "cosine"),
    "server_opt.name": ("sgd", "adam"),
    "server_opt.schedule": ("constant", "linear"),
    "privacy.record.accountant": ("rdp", "prv"),
    "privacy.client.accountant": ("rdp", "prv"),
    "site_privacy.accountant": ("rdp", "prv"),
    "runtime.dtype": ("float32", "float64"),
    "aggregation.rule": ("mean", "median", "trimmed_mean", "multikrum", "clipped_mean"),
    "replies.on_excess": ("reject", "clip"),
    "data.on_invalid_site": ("refuse", "warn"),
    "federation.mode": ("simulation", "deployment"),
}


@dataclass(frozen=True)
class Interval:
    """The values a numeric key may take; NaN is never inside, infinity only at a closed end."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = True

    def contains(self, value: float) -> bool:
        if math.isnan(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        if self.high == math.inf:
            tail = "and finite" if self.high_open else "(inf: no limit)"
            return f"{'>' if self.low_open else '>='} {self.low:g} {tail}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


_AT_LEAST_0, _AT_LEAST_1 = Interval(0), Interval(1)
_POSITIVE = Interval(0, low_open=True)  # > 0 and finite
_SHARE = Interval(0, 1, high_open=False)  # [0, 1]
_BETA = Interval(0, 1)  # [0, 1)

# Every numeric key of the schema and the values that make sense for it.
# ``validate`` checks each one; a test walks the schema to keep this complete.
_RANGES: dict[str, Interval] = {
    "data.num_train_sites": _AT_LEAST_1,
    "data.num_test_sites": _AT_LEAST_0,
    "data.num_classes": _AT_LEAST_1,
    "data.classes_per_site": _AT_LEAST_1,
    "data.records_per_class": _AT_LEAST_1,
    "data.site_missing_rate": _SHARE,
    "data.record_missing_rate": _SHARE,
    "data.interference": _AT_LEAST_0,
    "data.seed": _AT_LEAST_0,
    "episodes.ways": _AT_LEAST_1,
    "episodes.shots": _AT_LEAST_1,
    "episodes.train_shots": _AT_LEAST_0,
    "episodes.query_shots": _AT_LEAST_1,
    "episodes.episodes_per_round": _AT_LEAST_1,
    "model.hidden": _AT_LEAST_1,
    "model.embed_dim": _AT_LEAST_1,
    "model.groups": _AT_LEAST_1,
    "algorithm.inner_steps": _AT_LEAST_0,
    "algorithm.inner_lr": _POSITIVE,
    "algorithm.eval_inner_steps": _AT_LEAST_1,
    "algorithm.client_meta_lr": _POSITIVE,
    "algorithm.local_meta_steps": _AT_LEAST_1,
    "algorithm.proto_finetune_steps": _AT_LEAST_0,
    "algorithm.align_weight": _AT_LEAST_0,  # 0: no alignment loss
    "algorithm.align_temperature": _POSITIVE,
    "server_opt.lr": _POSITIVE,
    "server_opt.momentum": _BETA,
    "server_opt.beta1": _BETA,
    "server_opt.beta2": _BETA,
    "server_opt.eps": _POSITIVE,
    "federation.rounds": _AT_LEAST_1,
    "federation.sites_per_round": _AT_LEAST_0,
    "federation.fraction": _SHARE,
    "federation.min_sites": _AT_LEAST_1,
    "federation.eval_every": _AT_LEAST_0,  # 0: after the last round only
    "federation.eval_episodes": _AT_LEAST_1,
    "federation.checkpoint_every": _AT_LEAST_0,  # 0: after the last round only
    "federation.round_timeout": _POSITIVE,
    "federation.discovery_timeout": _POSITIVE,
    "federation.eval_seed": _AT_LEAST_0,
    "federation.max_failed_round_share": _SHARE,
    "federation.seed": _AT_LEAST_0,
    "privacy.record.noise_multiplier": _AT_LEAST_0,
    "privacy.record.clip_norm": _POSITIVE,
    "privacy.record.sample_rate": Interval(0, 1, low_open=True, high_open=False),
    "privacy.record.target_epsilon": _AT_LEAST_0,  # 0: use noise_multiplier as given
    "privacy.record.max_epsilon": Interval(0, math.inf, low_open=True, high_open=False),  # inf: no limit
    "privacy.record.delta": Interval(0, 1, low_open=True),
    "privacy.record.records_per_class": _AT_LEAST_0,  # 0: data.records_per_class
    "site_privacy.max_epsilon": Interval(0, math.inf, low_open=True, high_open=False),  # inf: no limit
    "site_privacy.delta": Interval(0, 1, low_open=True),
    "site_privacy.min_noise_multiplier": _AT_LEAST_0,
    "site_privacy.max_round_epsilon": Interval(0, math.inf, low_open=True, high_open=False),
    "privacy.client.noise_multiplier": _AT_LEAST_0,
    "privacy.client.clip_norm": _POSITIVE,
    "privacy.client.target_epsilon": _AT_LEAST_0,
    "privacy.client.delta": Interval(0, 1, low_open=True),
    "aggregation.trim_fraction": Interval(0, 0.5),
    "aggregation.krum_byzantine": _AT_LEAST_0,
    "aggregation.krum_select": _AT_LEAST_0,  # 0: n - f
    "aggregation.clip_norm": _AT_LEAST_0,  # 0: the round's median update norm
    "replies.max_update_norm": Interval(0, math.inf, low_open=True, high_open=False),  # inf: no bound
    # It multiplies the median update norm: below 1 it refuses the typical honest site.
    "replies.max_update_ratio": Interval(1, math.inf, high_open=False),  # inf: no bound
    "replies.max_bytes": _AT_LEAST_0,  # 0: derived from the model's size
    "replies.replay_window": _AT_LEAST_0,
    "runtime.num_cpus": _POSITIVE,
    "runtime.num_gpus": _AT_LEAST_0,
    "runtime.torch_threads": _AT_LEAST_1,
    "runtime.cohort_nodes": _AT_LEAST_0,  # 0: one per worker
}


def valid_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key the schema accepts."""
    keys: list[str] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            keys.extend(valid_keys(tp, f"{prefix}{f.name}."))
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` (from YAML or a string override) to type ``tp``."""
    origin = typing.get_origin(tp)
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp, _ellipsis) = typing.get_args(tp)
        return tuple(_coerce(v, item_tp, key) for v in value)
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{key}: unsupported union type")  # not used in the schema
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # accepts "inf"
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp}")


# Keys that moved, and where to.
_MOVED = {
    "privacy.record.ledger_dir": "site_privacy.ledger_dir (a site's ledger is the site's, not the run's)",
    "privacy.record.reproducible_noise": "site_privacy.reproducible_noise (only a site may give up its noise's secrecy)",
}


def _build(cls: type, values: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        key = prefix + unknown[0]
        if key in _MOVED:
            raise ConfigError(f"config key '{key}' is now {_MOVED[key]}")
        raise ConfigError(
            f"unknown config key '{key}'. Valid keys: " + ", ".join(valid_keys(Config))
        )
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        tp, key, value = hints[f.name], prefix + f.name, values[f.name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{key}: expected a section (mapping), got {value!r}")
            kwargs[f.name] = _build(tp, value, key + ".")
        else:
            kwargs[f.name] = _coerce(value, tp, key)
    return cls(**kwargs)


def section_from_dict(cls: type, values: Mapping[str, Any], *, prefix: str) -> Any:
    """One section (a frozen dataclass) from a mapping; an unknown key lists the section's own keys."""
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ConfigError(
            f"unknown key '{prefix}{unknown[0]}'. Valid keys: " + ", ".join(valid_keys(cls, prefix))
        )
    return _build(cls, values, prefix)


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1}`` -> ``{"a": {"b": 1}}``; Flower spells keys with dashes, we accept both."""
    nested: dict[str, Any] = {}
    for dotted, value in flat.items():
        parts = dotted.replace("-", "_").split(".")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config key '{dotted}' conflicts with a value set above it")
        node[parts[-1]] = value
    return nested


def _merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def to_dict(config: Any) -> dict[str, Any]:
    """A plain nested dict (YAML-safe: tuples become lists)."""

    def convert(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: convert(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple):
            return [convert(x) for x in v]
        return v

    return convert(config)


def flatten(config: Any) -> dict[str, Any]:
    """``Config`` -> ``{"algorithm.name": "reptile", ...}``."""
    flat: dict[str, Any] = {}

    def walk(d: Mapping[str, Any], prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, Mapping):
                walk(v, f"{prefix}{k}.")
            else:
                flat[f"{prefix}{k}"] = v

    walk(to_dict(config), "")
    return flat


def parse_override(text: str) -> tuple[str, Any]:
    """``"algorithm.inner_steps=10"`` -> ``("algorithm.inner_steps", 10)`` (YAML-typed value)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def validate(config: Config) -> Config:
    """Check choices and ranges that the types alone do not express."""
    flat = flatten(config)
    for key, choices in _CHOICES.items():
        if flat[key] not in choices:
            raise ConfigError(f"{key} must be one of {', '.join(choices)}; got {flat[key]!r}")
    for key, interval in _RANGES.items():
        if not interval.contains(flat[key]):
            raise ConfigError(f"{key} must be {interval}; got {flat[key]!r}")
    for key, value in flat.items():  # a numeric key without a row above: at least finite
        if isinstance(value, float) and key not in _RANGES and not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number; got {value!r}")
    if config.federation.fraction == 0.0 and config.federation.sites_per_round < 1:
        raise ConfigError("federation.sites_per_round must be at least 1 (or set federation.fraction)")
    if config.episodes.ways > config.data.classes_per_site:
        raise ConfigError(
            f"episodes.ways={config.episodes.ways} exceeds data.classes_per_site="
            f"{config.data.classes_per_site}: lower ways or give sites more classes"
        )
    if config.model.hidden % config.model.groups or config.model.embed_dim % config.model.groups:
        raise ConfigError(
            f"model.groups={config.model.groups} must divide model.hidden={config.model.hidden} "
            f"and model.embed_dim={config.model.embed_dim}"
        )
    rec = config.privacy.record
    if rec.enabled and rec.declared_class_size(config.data) < 1:
        raise ConfigError(
            "privacy.record.records_per_class (or data.records_per_class) must be >= 1 under record-level DP: "
            "it fixes the DP-SGD divisor; set it to a typical number of records per class at the sites"
        )
    if rec.enabled and config.algorithm.name == "maml" and not config.algorithm.first_order:
        # The second-order term differentiates through the support's clipped
        # per-record gradients: one support record moves every query record's
        # meta-gradient, and per-record clipping does not bound that.
        raise ConfigError(
            "privacy.record with second-order MAML cannot be privatized: its meta-gradient "
            "differentiates through the support's clipped per-record gradients, whose influence the "
            "clipping norm does not bound. Set algorithm.first_order: true (FOMAML; or "
            "algorithm.name: fomaml), whose noised inner gradients are released values and whose "
            "query gradient is clipped and noised per record"
        )
    if rec.enabled and config.algorithm.head_init != "shared":
        # The prototypes are means of the support's embeddings: every support
        # record moves the head directly, outside the clipped, noised gradients.
        raise ConfigError(
            "privacy.record with algorithm.head_init=prototypes cannot be privatized: the head starts "
            "from the support's class means, which no per-record clipping bounds. Set "
            "algorithm.head_init: shared, or use client-level DP (privacy.client)"
        )
    if rec.enabled and config.algorithm.name == "protonet":
        # A support record is in its class's prototype, which every query
        # record's loss reads: it moves every term of the sum, not one.
        raise ConfigError(
            "privacy.record with algorithm.name=protonet cannot be privatized: each support record moves "
            "its class's prototype and with it the loss, and so the clipped gradient, of every query "
            "record; per-record clipping does not bound that. Use algorithm.name: reptile (or fomaml) "
            "with algorithm.head_init: shared, or client-level DP (privacy.client), which clips a site's "
            "whole update"
        )
    if rec.enabled and config.algorithm.align_weight > 0:
        # InfoNCE contrasts each record with the others of its batch: one record
        # moves every record's alignment term.
        raise ConfigError(
            "privacy.record with algorithm.align_weight > 0 cannot be privatized: the alignment loss "
            "contrasts every record with the others of its batch, so one record moves every record's "
            "gradient and per-record clipping does not bound it. Set algorithm.align_weight: 0, or use "
            "client-level DP (privacy.client)"
        )
    _validate_robustness(config)
    if config.federation.mode == "deployment" and not Path(config.output_dir).expanduser().is_absolute():
        raise ConfigError(
            f"federation.mode=deployment needs an absolute output_dir (got {config.output_dir!r}): the "
            "ServerApp runs in a folder of the SuperLink's choosing; set output_dir to a fixed folder, e.g. "
            "/var/lib/metafed/runs"
        )
    if config.privacy.client.enabled and config.federation.fraction <= 0.0:
        raise ConfigError(
            "client-level DP needs Poisson sampling of sites: set federation.fraction "
            "(the per-site sampling rate q) and federation.poisson=true"
        )
    return config


def _validate_robustness(config: Config) -> None:
    """The aggregation rule against client-level DP (the ranges of its numbers are in ``_RANGES``)."""
    agg = config.aggregation
    if config.privacy.client.enabled and agg.rule != "mean":
        # The noise is calibrated to a sum of updates each clipped to S; a rule that
        # picks or reorders updates by what other sites sent has another sensitivity.
        raise ConfigError(
            f"aggregation.rule={agg.rule} cannot be combined with client-level DP (privacy.client), whose "
            "noise is calibrated to the mean of clipped updates: set aggregation.rule=mean (client-level "
            "DP clips every update itself), or turn privacy.client off"
        )


def from_dict(values: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> Config:
    """Build a validated :class:`Config` from nested values plus dotted overrides."""
    merged = _merge(dict(values or {}), _nest(overrides or {}))
    return validate(_build(Config, merged, ""))


def load(
    path: str | Path | None = None,
    *,
    overrides: Mapping[str, Any] | list[str] | None = None,
) -> Config:
    """Load a YAML experiment file and apply overrides (``["a.b=1"]`` or ``{"a.b": 1}``)."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path} (give the path of a YAML file)")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {err}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"{path} must hold a mapping of sections, got {type(loaded).__name__}")
        values = dict(loaded)
    if isinstance(overrides, list):
        overrides = dict(parse_override(o) for o in overrides)
    return from_dict(values, overrides)


def save(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def from_run_config(run_config: Mapping[str, Any], base: Config | None = None) -> Config:
    """Flower's ``context.run_config`` (dotted keys, dashes allowed) -> Config.

    A ``config-file`` key, when present and non-empty, names a YAML file that is
    loaded first; the other keys override it.
    """
    flat = dict(run_config)
    config_file = flat.pop("config-file", flat.pop("config_file", ""))
    base_values = to_dict(base) if base is not None else {}
    if config_file:
        base_values = _merge(base_values, to_dict(load(config_file)))
    return from_dict(base_values, flat)
