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


def make_client_app(config: Config | None = None) -> ClientApp:
    """A ClientApp bound to ``config``, or (None) reading Flower's run config."""
    app = ClientApp()

    def prepare(context: Context, found: list[sites.SiteRef]):
        cfg = sites.resolve_config(config, context.run_config)
        ref = sites.site_ref(cfg, context.node_config)
        found.append(ref)
        # The run's privacy request, bound to this site's own policy (raises PolicyViolation).
        cfg = privacy_policy.check(cfg, privacy_policy.for_node(cfg, context.node_config))
        task = sites.get_task(sites.with_node_device(cfg, context.node_config))
        return task, sites.load_site(task, ref)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        found: list[sites.SiteRef] = []
        try:
            task, site = prepare(context, found)
        except ValueError as err:  # SiteDataError, SiteLookupError, ConfigError
            return _error_reply(msg, found[0] if found else None, err)
        theta = wire.record_to_tree(msg.content[wire.ARRAYS])
        round_config = dict(msg.content[wire.CONFIG])
        generator = torch.Generator().manual_seed(int(round_config["seed"]))
        try:
            result = task.train_on_site(theta, site, round_config=round_config, generator=generator)
        except (PrivacyRefused, PrivacyLedgerError) as err:  # the site refuses: a clear error reply
            return _error_reply(msg, found[0], err)
        content = RecordDict(
            {
                wire.ARRAYS: wire.tree_to_record(result.params),
                wire.METRICS: _metrics(result.num_episodes, result.metrics),
                wire.REPLY: ConfigRecord({"round": int(round_config["round"]),
                                          "nonce": str(round_config.get("nonce", ""))}),
            }
        )
        return Message(content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        found: list[sites.SiteRef] = []
        try:
            cfg = sites.resolve_config(config, context.run_config)
            found.append(sites.site_ref(cfg, context.node_config))
            if privacy_policy.is_private(privacy_policy.for_node(cfg, context.node_config), cfg):
                # Refused before any record is read: accuracy and loss are statistics of the records.
                return _error_reply(msg, found[0], PrivacyRefused(privacy_policy.EVALUATION_REFUSED),
                                    code=wire.PRIVATE_SITE_REFUSED)
            task, site = prepare(context, [])
        except ValueError as err:
            return _error_reply(msg, found[0] if found else None, err)
        theta = wire.record_to_tree(msg.content[wire.ARRAYS])
        eval_config = dict(msg.content[wire.CONFIG])
        generator = torch.Generator().manual_seed(int(eval_config["seed"]))
        try:
            result = task.evaluate_on_site(
                theta, site, num_episodes=int(eval_config["episodes"]), generator=generator
            )
        except PrivacyRefused as err:  # a private site releases no statistic of its records
            return _error_reply(msg, found[0], err, code=wire.PRIVATE_SITE_REFUSED)
        return Message(RecordDict({wire.METRICS: _metrics(result.num_episodes, result.metrics)}), reply_to=msg)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        cfg = sites.resolve_config(config, context.run_config)
        ref = sites.site_ref(cfg, context.node_config)
        return Message(RecordDict({wire.SITE: ConfigRecord({wire.SITE_ID: ref.site_id})}), reply_to=msg)

    return app


# `flwr run .` loads this object: the config comes from the run config.
app = make_client_app()
