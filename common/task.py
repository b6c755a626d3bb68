"""Everything a site or the server needs from the engine, given a :class:`Config`.

This is the one object the Flower adapters (``client/``, ``server/``) and the
plain-PyTorch runners use: it builds the model and picks the algorithm once,
loads site directories, draws episodes and runs the algorithm's pure
functions. No Flower imports here.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from common import tree
from common.algorithms import inner
from common.algorithms import get_algorithm
from common.algorithms.base import ClientHParams
from common.config import Config, ConfigError, DataConfig
from common.data.schema import Schema
from common.evaluation import only_modality, raw_nearest_neighbour, score_episodes, summarize, without_modality
from common.tree import Tree

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def resolve_device(name: str) -> torch.device:
    """``auto`` -> the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"runtime.device={name!r} but this machine has no CUDA device; use auto or cpu")
    return device


def resolve_schema(config: Config) -> Schema:
    """The modalities every site and the model share.

    In this order: ``data.schema_file`` (a YAML mapping of modality name ->
    kind, shape, dtype, vocab_size); else the schema of the sites already under
    ``data.root`` (its ``benchmark.yaml``, or inferred from the sites'
    manifests: :func:`common.data.schema_inference.collection_schema`); else,
    when ``data.root`` holds no site yet, the built-in specs of the procedural
    benchmark. ``data.modalities`` picks among a schema file's or the built-in
    modalities; with the sites' own schema, its default value means "all of
    them", and any other value must name modalities the sites declare.
    """
    from common.data.procedural import PROCEDURAL_SCHEMA
    from common.data.schema_inference import collection_schema, read_schema_file
    from common.data.site import SiteDataError

    wanted = list(config.data.modalities)
    if config.data.schema_file:
        try:
            known, source = read_schema_file(Path(config.data.schema_file)), f"data.schema_file {config.data.schema_file}"
        except SiteDataError as err:
            raise ConfigError(f"data.schema_file: {err}") from None
    else:
        known = collection_schema(config.data.root)
        source = f"the schema of the sites under {config.data.root}"
        if known is None:
            known, source = dict(PROCEDURAL_SCHEMA), "the procedural benchmark"
        elif tuple(wanted) == DataConfig.modalities:
            return dict(known)
    unknown = [m for m in wanted if m not in known]
    if unknown:
        raise ConfigError(
            f"data.modalities names {unknown}, which {source} does not define; known: {sorted(known)}"
        )
    return {m: known[m] for m in wanted}


# A reply metric set to 1 by a site whose DP noise is reproducible from the round's seed.
REPRODUCIBLE_NOISE_METRIC = "dp_reproducible_noise"
NOT_PRIVATE_REPRODUCIBLE = (
    "NOT PRIVATE: site_privacy.reproducible_noise draws the DP noise and coins from the seed the server sent"
)


class PrivacyRefused(RuntimeError):
    """A site refuses what it was asked, to keep its privacy policy; the message says why."""


class PrivacyBudgetExceeded(PrivacyRefused):
    """A site refuses a round that would take it past its maximum epsilon."""


@dataclass
class TrainResult:
    params: Tree  # phi, on the CPU
    num_episodes: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class EvalResult:
    num_episodes: int
    metrics: dict[str, float] = field(default_factory=dict)


# Keys a server may send per round, and the config fields they override.
ROUND_KEYS = {
    "inner_steps": ("algorithm", "inner_steps", int),
    "inner_lr": ("algorithm", "inner_lr", float),
    "ways": ("episodes", "ways", int),
    "shots": ("episodes", "shots", int),
    "query_shots": ("episodes", "query_shots", int),
    "episodes": ("episodes", "episodes_per_round", int),
}


class Task:
    """The engine bound to one configuration (model, algorithm, schema, device)."""

    def __init__(self, config: Config, *, schema: Schema | None = None, device: str | torch.device | None = None):
        from common.models import build_model

        self.config = config
        self.device = torch.device(device) if device is not None else resolve_device(config.runtime.device)
        self.dtype = _DTYPES[config.runtime.dtype]
        self.schema = schema if schema is not None else resolve_schema(config)
        self.algorithm = get_algorithm(config.algorithm.name)
        self.model = build_model(config=config.model, schema=self.schema, ways=config.episodes.ways)
        self.model.to(device=self.device, dtype=self.dtype)
        self._sites: dict[str, Any] = {}

    # ---------------------------------------------------------------- params
    def initial_parameters(self, *, seed: int) -> Tree:
        from common.models import initial_parameters

        weights = initial_parameters(self.model, generator=torch.Generator().manual_seed(seed))
        params = self.algorithm.init(weights, self.config.algorithm.inner_lr)
        return {k: v.to(dtype=self.dtype).cpu() for k, v in params.items()}

    @functools.cached_property
    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.initial_parameters(seed=0).items()}

    def check_parameters(self, params: Mapping[str, torch.Tensor]) -> None:
        """Raise ValueError if ``params`` do not fit this task's model."""
        expected = self.parameter_shapes
        got = {k: tuple(v.shape) for k, v in params.items()}
        if got != expected:
            missing = sorted(set(expected) - set(got))
            extra = sorted(set(got) - set(expected))
            wrong = sorted(k for k in set(got) & set(expected) if got[k] != expected[k])
            raise ValueError(
                f"parameters do not fit the model: missing {missing}, unexpected {extra}, wrong shape {wrong}; "
                "server and site must use the same model, algorithm and data.modalities settings"
            )

    # ------------------------------------------------------------------ data
    def load_site(self, site_dir: str | Path):
        """A validated site, loaded once per process (keyed by path and manifest time)."""
        path = Path(site_dir).resolve()
        manifest = path / "manifest.yaml"
        key = f"{path}:{manifest.stat().st_mtime_ns if manifest.exists() else 0}"
        if key not in self._sites:
            self._sites[key] = self.read_site(path)
        return self._sites[key]

    def read_site(self, site_dir: str | Path):
        """Read and validate a site for this task (schema, episode sizes), without caching it.

        Raises :class:`common.data.SiteDataError` naming the file and the fix.
        """
        from common.data import load_site

        episodes = self.config.episodes
        needed = max(episodes.shots, episodes.effective_train_shots) + episodes.query_shots
        site = load_site(Path(site_dir), schema=self.schema, min_records_per_class=0,
                         allow_external_links=self.config.data.allow_external_links)
        self._check_site_can_serve(site, needed)
        return site

    def _check_site_can_serve(self, site, needed: int) -> None:
        from common.data import SiteDataError

        eligible = int((site.records_per_class() >= needed).sum())
        ways = self.config.episodes.ways
        if eligible < ways:
            raise SiteDataError(
                f"{site.site_dir}: only {eligible} classes have the {needed} records an episode needs "
                f"(shots + query_shots) but "
                f"episodes.ways={ways}; add records, or lower episodes.ways / shots / query_shots"
            )

    def sample_episodes(self, site, *, num_episodes: int, shots: int, generator: torch.Generator,
                        ways: int | None = None, query_shots: int | None = None) -> dict:
        from common.data import sample_episodes

        return sample_episodes(
            site,
            schema=self.schema,
            ways=ways or self.config.episodes.ways,
            shots=shots,
            query_shots=query_shots or self.config.episodes.query_shots,
            num_episodes=num_episodes,
            generator=generator,
            device=self.device,
            dtype=self.dtype,
        )

    # ----------------------------------------------------------------- train
    def round_settings(self, round_config: Mapping[str, Any] | None) -> dict[str, Any]:
        """This round's settings: the config, overridden by what the server sent."""
        cfg = self.config
        settings = {
            "inner_steps": cfg.algorithm.inner_steps,
            "inner_lr": cfg.algorithm.inner_lr,
            "ways": cfg.episodes.ways,
            "shots": cfg.episodes.effective_train_shots,
            "query_shots": cfg.episodes.query_shots,
            "episodes": cfg.episodes.episodes_per_round,
        }
        for key, value in (round_config or {}).items():
            if key in ROUND_KEYS:
                settings[key] = ROUND_KEYS[key][2](value)
        if settings["ways"] != cfg.episodes.ways:
            raise ValueError(
                f"the server asks for {settings['ways']}-way episodes but this site's model has "
                f"{cfg.episodes.ways} outputs; set episodes.ways the same on both"
            )
        return settings

    def hparams(self, settings: Mapping[str, Any], *, train_on_query: bool = True,
                first_order: bool = False) -> ClientHParams:
        """The algorithm's hyperparameters for a round; ``first_order`` forces a first-order inner loop."""
        cfg = self.config.algorithm
        return self.algorithm.hparams(
            inner_steps=settings["inner_steps"],
            inner_lr=settings["inner_lr"],
            first_order=cfg.first_order or first_order,
            client_meta_lr=cfg.client_meta_lr,
            local_meta_steps=cfg.local_meta_steps,
            train_on_query=train_on_query,
            optimizer=cfg.inner_optimizer,
            head_init=cfg.head_init,
            proto_distance=cfg.proto_distance,
            align_weight=cfg.align_weight,
            align_temperature=cfg.align_temperature,
        )

    def train_on_site(
        self,
        params: Mapping[str, torch.Tensor],
        site,
        *,
        round_config: Mapping[str, Any] | None = None,
        generator: torch.Generator,
    ) -> TrainResult:
        """One round at one site: draw a meta-batch of episodes, run the algorithm.

        Under record-level DP the site first checks its privacy ledger and
        raises :class:`PrivacyBudgetExceeded` rather than train past its
        ``max_epsilon``; after training it records the round's releases.
        """
        settings = self.round_settings(round_config)
        if self.config.site_privacy.require_record_dp and not self.config.privacy.record.enabled:
            raise PrivacyRefused("this site trains only under record-level DP (site_privacy.require_record_dp); "
                                 "run with privacy.record.enabled=true")
        if self.config.privacy.record.enabled:
            return self._train_private(params, site, settings=settings, round_config=round_config or {},
                                       generator=generator)
        episodes = self.sample_episodes(
            site, num_episodes=settings["episodes"], shots=settings["shots"],
            query_shots=settings["query_shots"], generator=generator,
        )
        theta = tree.to(dict(params), device=self.device, dtype=self.dtype)
        result = self.algorithm.client_update(
            model=self.model, params=theta, episodes=episodes, hparams=self.hparams(settings)
        )
        metrics = {k: float(v) for k, v in result.metrics.items()}
        return TrainResult(
            params={k: v.detach().cpu() for k, v in result.params.items()},
            num_episodes=settings["episodes"],
            metrics=metrics,
        )

    # ------------------------------------------------------ record-level DP
    def record_dp_steps(self, settings: Mapping[str, Any]) -> list:
        """The (sigma, q, count) releases one round at one site costs.

        Per episode:

        * support: a Poisson sample at rate q used for ``k = inner_steps``
          noisy gradients, which compose to ONE Gaussian release at
          ``(sigma / sqrt(k), q)`` (see
          :func:`common.privacy.accounting.record_level_round_steps`);
        * query, for algorithms whose update uses the query gradient (FOMAML,
          Meta-SGD): the clipped, noised sum of per-query-record gradients at
          the adapted weights is one more Gaussian release at ``(sigma, q)``
          on the query's own Poisson sample, drawn independently of the
          support. A record may be in both samples: the two releases compose
          (RDP adds up; the adaptive choice of the adapted weights, which
          depend on the support release, is covered by adaptive composition).

        So a round of E episodes is ``[(sigma/sqrt(k), q, E)]`` plus, with the
        query release, ``(sigma, q, E)``.
        """
        from common.privacy.accounting import record_level_round_steps

        rec = self.config.privacy.record
        query = self.algorithm.uses_query_gradient
        return record_level_round_steps(
            episodes=settings["episodes"], inner_steps=max(1, settings["inner_steps"]),
            noise_multiplier=rec.noise_multiplier, sample_rate=rec.sample_rate,
            query_release=query, query_sample_rate=rec.sample_rate if query else 1.0,
            query_noise_multiplier=rec.noise_multiplier if query else None,
        )

    def record_dp_divisors(self, settings: Mapping[str, Any]) -> tuple[float, float | None]:
        """The DP-SGD divisors of the support release and (FOMAML, Meta-SGD) the query release.

        Constants of the configuration, never counts of the site's records:
        ``sample_rate * ways * R`` with ``R`` the declared records per class
        (``privacy.record.records_per_class``, 0 = ``data.records_per_class``),
        and for Reptile's support ``R - query_shots`` (its fixed query is taken
        out of the pool first). Dividing by the expected size of the realised
        pool (``q`` times the records of the episode's classes) would reveal
        that count through the noise's scale (the trap of Opacus issues #571
        and #819). A constant divisor is post-processing of the clipped, noised
        sum, so the Gaussian mechanism's guarantee under add/remove-one
        neighbours is unchanged; no record is excluded and the neighbouring
        relation and the accounting stay as they were. A class larger or smaller
        than declared only rescales the step (like a different inner_lr).
        """
        rec = self.config.privacy.record
        per_class = rec.declared_class_size(self.config.data)
        ways = settings["ways"]
        if self.algorithm.uses_query_gradient:
            both = rec.sample_rate * ways * per_class
            return both, both
        return rec.sample_rate * ways * max(1, per_class - settings["query_shots"]), None

    def record_dp_randomness(self, generator: torch.Generator):
        """The source of a round's noise and Poisson coins at a site.

        A fresh key from the OS every round (:func:`common.privacy.randomness.fresh_key`):
        nothing the server sends or knows determines it. Only with
        ``site_privacy.reproducible_noise`` (the site's own policy) is the key derived from the seed of
        ``generator`` (the one the server sent), which makes the run
        reproducible and NOT private.
        """
        from common.privacy.randomness import KeyedStream, fresh_key, reproducible_key

        if self.config.site_privacy.reproducible_noise:
            return KeyedStream(reproducible_key(generator.initial_seed()), label="record-dp")
        return KeyedStream(fresh_key(), label="record-dp")

    def ledger(self, site):
        """The site's ledger, where its policy keeps it (``site_privacy.ledger_dir`` / ``state_dir``)."""
        from common.privacy.ledger import DEFAULT_FILENAME, PrivacyLedger

        rec, policy = self.config.privacy.record, self.config.site_privacy
        if policy.ledger_dir:
            path = Path(policy.ledger_dir) / f"{site.site_id}.json"
        else:
            path = Path(site.site_dir) / DEFAULT_FILENAME
        receipt = Path(policy.state_dir) / f"{site.site_id}.json.receipt" if policy.state_dir else None
        return PrivacyLedger.open(path, accountant=rec.accountant, delta=rec.delta, receipt=receipt)

    def max_epsilon(self) -> float:
        """The budget a site keeps: the run's ``privacy.record.max_epsilon`` within the site's own."""
        return min(self.config.privacy.record.max_epsilon, self.config.site_privacy.max_epsilon)

    def check_round_budget(self, site, ledger, steps) -> None:
        """Raise :class:`PrivacyBudgetExceeded` unless this round fits the site's budget and per-round cap."""
        from common.privacy.accounting import compute_epsilon

        rec, policy = self.config.privacy.record, self.config.site_privacy
        max_epsilon = self.max_epsilon()
        exceeds, eps_after = ledger.would_exceed(max_epsilon=max_epsilon, steps=steps)
        if exceeds:
            which = ("site_privacy.max_epsilon" if policy.max_epsilon <= rec.max_epsilon
                     else "privacy.record.max_epsilon")
            raise PrivacyBudgetExceeded(
                f"site {site.site_id}: this round would raise its epsilon from {ledger.epsilon:.4g} to "
                f"{eps_after:.4g} at delta={rec.delta:g}, past its {which}="
                f"{max_epsilon:g}; it refuses to train (ledger: {ledger.path})"
            )
        if math.isfinite(policy.max_round_epsilon):
            cost = compute_epsilon(steps=steps, delta=rec.delta, accountant=rec.accountant)
            if cost > policy.max_round_epsilon:
                raise PrivacyBudgetExceeded(
                    f"site {site.site_id}: this round alone would cost epsilon {cost:.4g} at delta={rec.delta:g}, "
                    f"above its site_privacy.max_round_epsilon={policy.max_round_epsilon:g}; it refuses to train "
                    "(ask for fewer episodes or inner steps, a smaller privacy.record.sample_rate or a larger "
                    "privacy.record.noise_multiplier)"
                )

    def _train_private(self, params, site, *, settings, round_config, generator) -> TrainResult:
        """DP-SGD on Poisson-sampled supports; for the MAML family also a private query release.

        FOMAML and Meta-SGD (``uses_query_gradient``) draw each episode's query
        as an independent Poisson sample at the same rate, run the inner loop
        first-order (the noised inner gradients are released values) and take
        their meta-steps on :func:`common.algorithms.private.dp_meta_gradient`:
        per-query-record gradients at the adapted weights, clipped to C,
        summed, noised with sigma*C and divided by a constant
        (:meth:`record_dp_divisors`).

        ``generator`` (seeded by the server) picks the episodes' classes only;
        the noise and the coins come from :meth:`record_dp_randomness`.
        """
        from common.algorithms.private import dp_gradient, dp_meta_gradient
        from common.data import sample_poisson_episodes
        from common.privacy.clipping import draw_standard_noise

        rec, policy = self.config.privacy.record, self.config.site_privacy
        steps = self.record_dp_steps(settings)
        ledger = self.ledger(site)
        self.check_round_budget(site, ledger, steps)
        uses_query = self.algorithm.uses_query_gradient
        secret = self.record_dp_randomness(generator)
        episodes, _sizes = sample_poisson_episodes(
            site, schema=self.schema, ways=settings["ways"], sample_rate=rec.sample_rate,
            query_shots=settings["query_shots"], num_episodes=settings["episodes"],
            generator=generator, device=self.device, dtype=self.dtype,
            query_sample_rate=rec.sample_rate if uses_query else None, coins=secret.child("coins"),
        )
        theta = tree.to(dict(params), device=self.device, dtype=self.dtype)
        inner_steps = settings["inner_steps"]
        noise_source = secret.child("noise")
        support_divisor, query_divisor = self.record_dp_divisors(settings)
        num_episodes = settings["episodes"]
        noise = draw_standard_noise(
            inner.model_part(theta), generator=noise_source, leading_shape=(num_episodes, max(1, inner_steps))
        )
        episodes["support"]["dp_noise"] = tree.to(noise, device=self.device, dtype=self.dtype)
        episodes["support"]["dp_expected"] = torch.full((num_episodes,), support_divisor, device=self.device,
                                                        dtype=self.dtype)
        extra = {}
        if uses_query:
            # One draw per sent parameter (Meta-SGD's rates included) and episode, after the support's.
            query_noise = draw_standard_noise(theta, generator=noise_source, leading_shape=(num_episodes,))
            episodes["query"]["dp_noise"] = tree.to(query_noise, device=self.device, dtype=self.dtype)
            episodes["query"]["dp_expected"] = torch.full((num_episodes,), query_divisor, device=self.device,
                                                          dtype=self.dtype)
            extra["meta_gradient"] = dp_meta_gradient(self.model, clip_norm=rec.clip_norm,
                                                      noise_multiplier=rec.noise_multiplier)
        hparams = self.hparams(settings, train_on_query=False, first_order=True)
        gradient = dp_gradient(self.model, clip_norm=rec.clip_norm, noise_multiplier=rec.noise_multiplier)
        result = self.algorithm.client_update(
            model=self.model, params=theta, episodes=episodes, hparams=hparams, gradient=gradient, **extra
        )
        epsilon = ledger.record(run_id=str(round_config.get("run_id", "")), round=int(round_config.get("round", 0)),
                                steps=steps, max_epsilon=self.max_epsilon(),
                                not_private=NOT_PRIVATE_REPRODUCIBLE if policy.reproducible_noise else "")
        # Only the noised weights and the accounting leave the site: its
        # losses and accuracies are statistics of the records, not privatized.
        metrics = {
            "epsilon": float(epsilon),
            "delta": rec.delta,
            "noise_multiplier": rec.noise_multiplier,
            "clip_norm": rec.clip_norm,
            "sample_rate": rec.sample_rate,
            "dp_steps": float(sum(count for _, _, count in steps)),
        }
        if policy.reproducible_noise:
            metrics[REPRODUCIBLE_NOISE_METRIC] = 1.0
        return TrainResult(
            params={k: v.detach().cpu() for k, v in result.params.items()},
            num_episodes=settings["episodes"],
            metrics=metrics,
        )

    # ------------------------------------------------------------ evaluation
    def _scores(self, params: Tree, episodes: dict) -> torch.Tensor:
        cfg = self.config.algorithm
        classifier = self.algorithm.classifier
        # A prototypical network is scored by its prototypes, fine-tuned only when asked.
        steps = cfg.proto_finetune_steps if classifier == "prototypes" else cfg.eval_inner_steps
        return score_episodes(
            self.model, params, episodes, inner_steps=steps, inner_lr=cfg.inner_lr,
            optimizer=cfg.inner_optimizer, head_init=cfg.head_init, classifier=classifier,
            distance=cfg.proto_distance,
        )

    def evaluate_on_site(
        self, params: Mapping[str, torch.Tensor], site, *, num_episodes: int, generator: torch.Generator
    ) -> EvalResult:
        """Adapt on the site's support sets, score its query sets.

        A site under record-level DP refuses (:class:`PrivacyRefused`): its
        accuracy and loss are statistics of its records that no noise covers.
        """
        if self.config.privacy.record.enabled or self.config.site_privacy.require_record_dp:
            raise PrivacyRefused(
                "this site is under record-level DP and releases nothing but its noised weights and their "
                "accounting: no evaluation of its records"
            )
        theta = tree.to(dict(params), device=self.device, dtype=self.dtype)
        episodes = self.sample_episodes(site, num_episodes=num_episodes, shots=self.config.episodes.shots,
                                        generator=generator)
        scores = self._scores(theta, episodes)
        return EvalResult(
            num_episodes=num_episodes,
            metrics={"accuracy": float(scores.accuracy.double().mean()), "loss": float(scores.loss.double().mean())},
        )

    def meta_test(
        self,
        params: Mapping[str, torch.Tensor],
        sites: Sequence[Any],
        *,
        num_episodes: int,
        seed: int,
        ablate_modalities: bool = False,
        raw_baseline: bool = False,
        initial_params: Mapping[str, torch.Tensor] | None = None,
    ) -> dict:
        """The FedMeta protocol over held-out sites (see :mod:`common.evaluation`).

        A site's episodes are drawn from ``(seed, site id)`` alone
        (:func:`meta_test_generator`): every meta-test of a run, and of any other
        run with the same ``seed`` on the same site, scores the same episodes,
        whatever the round, the number of rounds or the runner.

        With ``ablate_modalities`` the same episodes are also scored with each
        modality removed (``without_<m>``) and with one modality alone
        (``only_<m>``): what each modality carries, and whether fusing beats the
        best single one. That costs ``2M + 1`` evaluations, so runs do it at the end.
        With ``raw_baseline`` the report also has ``raw_1nn``: 1-NN on the raw
        inputs of the same episodes (:func:`common.evaluation.raw_nearest_neighbour`),
        fused and on each modality alone (``raw_1nn_<m>``). With
        ``initial_params`` (the run's theta_0) it has ``random_init``: that
        initialization adapted and scored exactly like ``params``.
        ``ablation_ci95`` maps each of these names to its 95% interval.
        """
        if not sites:
            raise ValueError("meta-test needs at least one held-out site")
        theta = tree.to(dict(params), device=self.device, dtype=self.dtype)
        theta0 = None if initial_params is None else tree.to(dict(initial_params), device=self.device,
                                                             dtype=self.dtype)
        per_site_episodes = max(1, math.ceil(num_episodes / len(sites)))
        per_site: dict[str, torch.Tensor] = {}
        variants: dict[str, Any] = {}
        modalities = tuple(self.schema)
        if ablate_modalities and len(self.schema) > 1:
            for m in self.schema:
                variants[f"without_{m}"] = functools.partial(without_modality, modality=m)
                variants[f"only_{m}"] = functools.partial(only_modality, modality=m, modalities=modalities)
        ablations: dict[str, dict[str, torch.Tensor]] = {name: {} for name in variants}
        raw_variants: dict[str, Any] = {}
        if raw_baseline:
            raw_variants["raw_1nn"] = lambda episodes: episodes
            if len(self.schema) > 1:
                for m in self.schema:
                    raw_variants[f"raw_1nn_{m}"] = functools.partial(only_modality, modality=m,
                                                                     modalities=modalities)
        ablations.update({name: {} for name in raw_variants})
        if theta0 is not None:
            ablations["random_init"] = {}
        for site in sites:
            site_id = str(site.site_id)
            episodes = self.sample_episodes(site, num_episodes=per_site_episodes, shots=self.config.episodes.shots,
                                            generator=meta_test_generator(seed, site_id))
            per_site[site_id] = self._scores(theta, episodes).accuracy.cpu()
            for name, transform in variants.items():
                ablations[name][site_id] = self._scores(theta, transform(episodes)).accuracy.cpu()
            for name, transform in raw_variants.items():
                ablations[name][site_id] = raw_nearest_neighbour(transform(episodes), schema=self.schema).cpu()
            if theta0 is not None:
                ablations["random_init"][site_id] = self._scores(theta0, episodes).accuracy.cpu()
        return summarize(per_site, ablations)


def meta_test_generator(seed: int, site_id: str) -> torch.Generator:
    """The generator of a held-out site's meta-test episodes: from ``(seed, site id)`` only."""
    import zlib

    import numpy as np

    words = np.random.SeedSequence([int(seed), zlib.crc32(site_id.encode("utf-8"))]).generate_state(
        2, dtype=np.uint32)
    return torch.Generator().manual_seed(int((int(words[0]) << 31) ^ int(words[1])) & ((1 << 63) - 1))
