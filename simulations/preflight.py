"""Every check a run's input can fail, done before Ray, Flower or a run directory exists.

:func:`check` runs the same code the run itself runs on the same input, so
that the rules live in one place: the schema (:func:`common.task.resolve_schema`,
through :class:`common.task.Task`), the device (:func:`common.task.resolve_device`),
the model built for that schema, every site read and validated as a site
worker reads it (:meth:`common.task.Task.read_site`: files, shapes and dtypes
against the schema, records per class for ``shots + query_shots``), every
simulated site's privacy policy (:mod:`client.privacy_policy`), the Ray
resources (:func:`simulations.runner.backend_config`) and, on resume, the
checkpoint (:func:`server.checkpoint.load_latest`) against the model's
parameter shapes. What it finds raises a ``ValueError`` (``ConfigError``,
``SiteDataError``, ``CheckpointError``): the command line prints it and exits
with code 2.

A site that fails validation refuses the run unless
``data.on_invalid_site: warn``: then it is reported and the run goes on (a
train site answers every round with its error, a held-out one is left out of
the meta-test).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from client import sites
from common.config import Config, ConfigError

_MAX_LISTED = 5


@dataclass(frozen=True)
class Preflight:
    """What a run that passed its checks will use."""

    train_sites: list[Path]
    test_sites: list[Path]
    # (site directory, why it is invalid) for each site let through by ``data.on_invalid_site: warn``.
    invalid_sites: list[tuple[Path, str]] = field(default_factory=list)
    backend: dict[str, Any] = field(default_factory=dict)


def check(
    config: Config,
    *,
    resume_dir: str | Path | None = None,
    ray: bool = True,
    warn: Callable[[str], None] = print,
) -> Preflight:
    """Check ``config`` (paths already absolute) and its data; raise ``ValueError`` on bad input.

    ``ray``: also the Ray resources of the simulation (``metafed simulate``);
    ``resume_dir``: a run to continue, whose latest intact checkpoint must fit
    the model. Writes the procedural benchmark when ``data.generate`` asks.
    """
    from simulations.runner import backend_config, prepare_data

    resume_path = Path(resume_dir).resolve() if resume_dir is not None else None
    if resume_path is not None:
        from simulations.runner import checkpoint_dirs

        if not checkpoint_dirs(resume_path):
            raise ConfigError(
                f"no checkpoint under {resume_path / 'checkpoints'}: nothing to resume "
                "(checkpoints are written every federation.checkpoint_every rounds)"
            )
        from server import checkpoint

        # Every checkpoint damaged: the reasons now (the data is checked after).
        state, _saved = checkpoint.load_latest(resume_path, on_damaged=lambda path, reason: None)
    _check_site_policy(config)
    if resume_path is None:
        _check_writable(Path(config.output_dir), "output_dir")
    backend = backend_config(config) if ray else {}
    if config.runtime.tensorboard:
        from server import tensorboard_events

        tensorboard_events.require()
    train = prepare_data(config)
    fed = config.federation
    if fed.min_sites > len(train):
        raise ConfigError(
            f"federation.min_sites={fed.min_sites} but there are {len(train)} train sites under "
            f"{Path(config.data.root) / 'train'}: the run would wait for sites that never come; "
            f"set federation.min_sites to at most {len(train)}, or add sites"
        )
    # Train and held-out sites are told apart by where they are; within each, one id per site.
    _check_unique_site_ids(train)
    _check_unique_site_ids(sites.test_site_dirs(config.data.root))

    from common.task import Task  # the engine: torch and the model code

    try:
        task = Task(config)  # the schema, the device and the model, as every site and the server build them
    except ValueError as err:
        if type(err) is not ValueError:  # ConfigError, SiteDataError: already in the input's words
            raise
        # The model refuses a modality spec it cannot encode (a wrong rank, an unknown kind).
        raise ConfigError(
            f"the model cannot be built for this data: {err}. Fix the modality's spec (data.schema_file, or "
            "the sites' manifests the schema is inferred from), or leave the modality out with data.modalities"
        ) from None
    test = sites.test_site_dirs(config.data.root)
    invalid = _invalid_sites(task, [*train, *test])
    if invalid:
        total = len(train) + len(test)
        first_path, first_reason = invalid[0]
        same = [path for path, reason in invalid[1:] if _generic(reason, path) == _generic(first_reason, first_path)]
        other = [(path, reason) for path, reason in invalid[1:] if path not in same]
        also = ""
        if same:
            also += f" The same at {_names(same)}."
        if other:
            also += " Also: " + " ".join(f"{reason}." for _, reason in other[:_MAX_LISTED])
            also += f" (and {len(other) - _MAX_LISTED} more sites)" if len(other) > _MAX_LISTED else ""
        what = f"{len(invalid)} of {total} sites fail validation. {first_reason}.{also}"
        if config.data.on_invalid_site == "refuse":
            raise ConfigError(
                f"{what} Fix those sites, or set data.on_invalid_site=warn to run without them (a train "
                "site then answers every round with its error, a held-out one is left out of the meta-test)"
            )
        warn(f"warning: {what} Running without them (data.on_invalid_site=warn)")
        valid_train = len(train) - sum(1 for path, _ in invalid if path in train)
        if valid_train < max(1, fed.min_sites):
            raise ConfigError(
                f"only {valid_train} of {len(train)} train sites are valid, fewer than "
                f"federation.min_sites={fed.min_sites} (at least 1): fix the sites listed above"
            )
    _check_first_round_budget(config, task)
    if resume_path is not None:
        checkpoint.check_fits(state, shapes=task.parameter_shapes, run_dir=resume_path)
    return Preflight(train_sites=train, test_sites=test, invalid_sites=invalid, backend=backend)


def _generic(reason: str, path: Path) -> str:
    """A site's error with its own path taken out (to tell one problem at many sites from many problems)."""
    return reason.replace(str(path), "<site>")


def _names(paths: list[Path]) -> str:
    names = [f"{path.parent.name}/{path.name}" for path in paths]
    return ", ".join(names[:_MAX_LISTED]) + (f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED
                                             else "")


def _check_writable(folder: Path, key: str) -> None:
    """``folder`` exists as a writable directory, or can be made in the nearest existing one (nothing is made)."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{key}={str(folder)!r}: {probe} is a file, not a folder; choose another {key}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={str(folder)!r}: {probe} is not writable by this user; choose another {key}")


def _check_site_policy(config: Config) -> None:
    """Every simulated site holds the config's site_privacy policy: a run it would refuse is bad input."""
    from client import privacy_policy

    try:
        privacy_policy.check(config, privacy_policy.validate(config.site_privacy))
    except privacy_policy.PolicyViolation as err:
        raise privacy_policy.PolicyViolation(
            f"{err}. Every simulated site holds the config's site_privacy policy: change privacy.record, "
            "or site_privacy"
        ) from None


def _check_first_round_budget(config: Config, task: Any) -> None:
    """Under record-level DP, a site's own budget check on a first round with nothing spent yet.

    A round that costs more than ``max_epsilon`` (or ``site_privacy.max_round_epsilon``)
    on a fresh ledger is refused by every site in every round: the run could not train.
    """
    if not config.privacy.record.enabled:
        return
    from types import SimpleNamespace

    from common.privacy.ledger import PrivacyLedger
    from common.task import PrivacyRefused

    rec = config.privacy.record
    fresh = PrivacyLedger(Path("none, nothing spent yet"), accountant=rec.accountant, delta=rec.delta)  # in memory
    try:
        task.check_round_budget(SimpleNamespace(site_id="<each>"), fresh, task.record_dp_steps(task.round_settings(None)))
    except PrivacyRefused as err:
        raise ConfigError(
            f"{err}. That is a first round: no site could train at all. Raise privacy.record.noise_multiplier, "
            "lower privacy.record.sample_rate, episodes.episodes_per_round or algorithm.inner_steps, or allow a "
            "larger budget"
        ) from None


def _invalid_sites(task: Any, paths: list[Path]) -> list[tuple[Path, str]]:
    """(path, reason) of each site that the run's own reader refuses (each read once, then dropped)."""
    invalid = []
    for path in paths:
        try:
            task.read_site(path)
        except ValueError as err:  # SiteDataError, and anything the reader refuses
            invalid.append((path, str(err)))
    return invalid


def _check_unique_site_ids(site_dirs: list[Path]) -> None:
    """One identifier per site: sampling, seeds, ledgers and metrics key on the manifest's ``site_id``."""
    seen: dict[str, Path] = {}
    for path in site_dirs:
        site_id = sites.manifest_site_id(Path(path).resolve())
        if site_id is None:
            continue  # an unreadable manifest: the site's own validation says what is wrong
        if site_id in seen:
            raise ConfigError(
                f"{seen[site_id]} and {path} both declare site_id {site_id!r} in their manifest.yaml: a site has "
                "one identifier (its sampling, seeds, privacy ledger and metrics key on it); give each site "
                "folder its own site_id"
            )
        seen[site_id] = path

