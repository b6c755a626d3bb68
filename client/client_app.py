"""The Flower ClientApp: a site adapts the shared initialization on its episodes.

Thin handlers: unpack the message, call the engine (:mod:`common.task`), pack
the reply. ``train`` replies with the adapted weights phi (not a delta) and a
MetricRecord whose ``num-examples`` is the number of episodes used; ``evaluate``
adapts on support sets and scores query sets at this site; ``query`` tells the
server which site this node serves. A site whose data fails validation answers
with an error reply carrying the validation message.

A site's record-level privacy policy is its own (:mod:`client.privacy_policy`):
a deployed node reads it from its node config, never from the run config. A
run that asks for weaker privacy than the policy allows, a ledger that went
backwards, a round past the budget and an evaluation at a private site all get
an error reply that says why; a private site's evaluation refusal carries
:data:`client.wire.PRIVATE_SITE_REFUSED` as its error code.
"""

from __future__ import annotations

import math

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.error import Error
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from client import privacy_policy, sites, wire
from common.config import Config
from common.privacy.ledger import PrivacyLedgerError
from common.task import PrivacyRefused


def _error_reply(msg: Message, ref: sites.SiteRef | None, err: Exception,
                 code: int = ErrorCode.CLIENT_APP_RAISED_EXCEPTION) -> Message:
    where = f"site {ref.site_id} ({ref.path or 'no directory'})" if ref else "site config"
    reason = f"{where}: {err}"
    return Message(Error(code=code, reason=reason), reply_to=msg)


def _metrics(num_episodes: int, metrics: dict[str, float]) -> MetricRecord:
    # NaN is dropped; an infinite value (epsilon = inf: no guarantee) is reported as such.
    record = MetricRecord({wire.NUM_EXAMPLES: int(num_episodes)})
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value):
            record[key] = float(value)
    return record


class _SiteFailed(Exception):
    """One site's call ended in an error reply (``reason``, ``code``)."""

    def __init__(self, reason: str, code: int = ErrorCode.CLIENT_APP_RAISED_EXCEPTION) -> None:
        super().__init__(reason)
        self.reason, self.code = reason, code


def _where(ref: sites.SiteRef | None) -> str:
    return f"site {ref.site_id} ({ref.path or 'no directory'})" if ref else "site config"


def _cohort_reply(msg: Message, results: dict[str, RecordDict], failed: dict[str, _SiteFailed],
                  echo: ConfigRecord | None) -> Message:
    """One reply for a cohort: each site's records under ``<record>/<site id>``, its failure otherwise."""
    content = RecordDict()
    for site_id, records in results.items():
        for name, record in records.items():
            content[wire.cohort_key(name, site_id)] = record
    content[wire.COHORT_ERRORS] = ConfigRecord({k: v.reason for k, v in failed.items()})
    content[wire.COHORT_ERROR_CODES] = ConfigRecord({k: int(v.code) for k, v in failed.items()})
    if echo is not None:
        content[wire.REPLY] = echo
    return Message(content, reply_to=msg)


def _cohort(config: dict) -> list[tuple[str, int]]:
    """The ``(site id, seed)`` pairs of a cohort instruction; ValueError when they do not pair up."""
    ids, seeds = list(config.get(wire.COHORT_SITES, [])), list(config.get(wire.COHORT_SEEDS, []))
    if len(ids) != len(seeds) or len(set(ids)) != len(ids):
        raise ValueError(f"a cohort instruction needs distinct site ids, one seed each; got {len(ids)} ids, "
                         f"{len(set(ids))} distinct, {len(seeds)} seeds")
    return list(zip(map(str, ids), map(int, seeds)))


def make_client_app(config: Config | None = None) -> ClientApp:
    """A ClientApp bound to ``config``, or (None) reading Flower's run config.

    A train or evaluate instruction names one site (or none: the node's own),
    or a cohort of sites (:data:`client.wire.COHORT_SITES`, simulation only):
    the node then runs each site in turn exactly as it would run it alone
    (its data, episodes, seed, privacy policy, ledger and fresh DP noise) and
    replies once, with each site's result or failure apart.
    """
    app = ClientApp()

    def prepare(context: Context, found: list[sites.SiteRef], site_id: str = ""):
        cfg = sites.resolve_config(config, context.run_config)
        ref = sites.site_ref(cfg, context.node_config, site_id=site_id)
        found.append(ref)
        # The run's privacy request, bound to this site's own policy (raises PolicyViolation).
        cfg = privacy_policy.check(cfg, privacy_policy.for_node(cfg, context.node_config))
        task = sites.get_task(sites.with_node_device(cfg, context.node_config))
        return task, sites.load_site(task, ref)

    def simulated_only(context: Context) -> None:
        if str(context.node_config.get(sites.DATA_PATH_KEY, "") or ""):
            raise ValueError("a cohort instruction goes to simulated nodes only; a deployed node serves its own "
                             f"{sites.DATA_PATH_KEY} (run the server with runtime.cohort=false)")

    def train_site(theta, round_config: dict, context: Context, site_id: str) -> RecordDict:
        found: list[sites.SiteRef] = []
        try:
            task, site = prepare(context, found, site_id)
        except ValueError as err:  # SiteDataError, SiteLookupError, ConfigError
            raise _SiteFailed(f"{_where(found[0] if found else None)}: {err}") from None
        generator = torch.Generator().manual_seed(int(round_config["seed"]))
        try:
            result = task.train_on_site(theta, site, round_config=round_config, generator=generator)
        except (PrivacyRefused, PrivacyLedgerError) as err:  # the site refuses: a clear error reply
            raise _SiteFailed(f"{_where(found[0])}: {err}") from None
        return RecordDict({wire.ARRAYS: wire.tree_to_record(result.params),
                           wire.METRICS: _metrics(result.num_episodes, result.metrics)})

    def echo(round_config: dict) -> ConfigRecord:
        return ConfigRecord({"round": int(round_config["round"]), "nonce": str(round_config.get("nonce", ""))})

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        round_config = dict(msg.content[wire.CONFIG])
        theta = wire.record_to_tree(msg.content[wire.ARRAYS])
        if wire.COHORT_SITES in round_config:
            try:
                simulated_only(context)
                cohort = _cohort(round_config)
            except ValueError as err:
                return _error_reply(msg, None, err)
            results: dict[str, RecordDict] = {}
            failed: dict[str, _SiteFailed] = {}
            base = {k: v for k, v in round_config.items() if k not in (wire.COHORT_SITES, wire.COHORT_SEEDS)}
            for site_id, seed in cohort:
                try:
                    results[site_id] = train_site(theta, {**base, "seed": seed}, context, site_id)
                except _SiteFailed as err:
                    failed[site_id] = err
            return _cohort_reply(msg, results, failed, echo(round_config))
        try:
            content = train_site(theta, round_config, context, str(round_config.get(wire.SITE_FOR, "")))
        except _SiteFailed as err:
            return Message(Error(code=err.code, reason=err.reason), reply_to=msg)
        content[wire.REPLY] = echo(round_config)
        return Message(content, reply_to=msg)

    def evaluate_site(theta, eval_config: dict, context: Context, site_id: str) -> RecordDict:
        found: list[sites.SiteRef] = []
        try:
            cfg = sites.resolve_config(config, context.run_config)
            found.append(sites.site_ref(cfg, context.node_config, site_id=site_id))
            if privacy_policy.is_private(privacy_policy.for_node(cfg, context.node_config), cfg):
                # Refused before any record is read: accuracy and loss are statistics of the records.
                raise _SiteFailed(f"{_where(found[0])}: {privacy_policy.EVALUATION_REFUSED}",
                                  code=wire.PRIVATE_SITE_REFUSED)
            task, site = prepare(context, [], site_id)
        except ValueError as err:
            raise _SiteFailed(f"{_where(found[0] if found else None)}: {err}") from None
        generator = torch.Generator().manual_seed(int(eval_config["seed"]))
        try:
            result = task.evaluate_on_site(
                theta, site, num_episodes=int(eval_config["episodes"]), generator=generator
            )
        except PrivacyRefused as err:  # a private site releases no statistic of its records
            raise _SiteFailed(f"{_where(found[0])}: {err}", code=wire.PRIVATE_SITE_REFUSED) from None
        return RecordDict({wire.METRICS: _metrics(result.num_episodes, result.metrics)})

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        theta = wire.record_to_tree(msg.content[wire.ARRAYS])
        eval_config = dict(msg.content[wire.CONFIG])
        if wire.COHORT_SITES in eval_config:
            try:
                simulated_only(context)
                cohort = _cohort(eval_config)
            except ValueError as err:
                return _error_reply(msg, None, err)
            results: dict[str, RecordDict] = {}
            failed: dict[str, _SiteFailed] = {}
            base = {k: v for k, v in eval_config.items() if k not in (wire.COHORT_SITES, wire.COHORT_SEEDS)}
            for site_id, seed in cohort:
                try:
                    results[site_id] = evaluate_site(theta, {**base, "seed": seed}, context, site_id)
                except _SiteFailed as err:
                    failed[site_id] = err
            return _cohort_reply(msg, results, failed, None)
        try:
            content = evaluate_site(theta, eval_config, context, str(eval_config.get(wire.SITE_FOR, "")))
        except _SiteFailed as err:
            return Message(Error(code=err.code, reason=err.reason), reply_to=msg)
        return Message(content, reply_to=msg)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        cfg = sites.resolve_config(config, context.run_config)
        ref = sites.site_ref(cfg, context.node_config)
        return Message(RecordDict({wire.SITE: ConfigRecord({wire.SITE_ID: ref.site_id})}), reply_to=msg)

    return app


# `flwr run .` loads this object: the config comes from the run config.
app = make_client_app()
