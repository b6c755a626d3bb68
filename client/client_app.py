"""The Flower ClientApp: a site adapts the shared initialization on its episodes.

Thin handlers: unpack the message, call the engine (:mod:`common.task`), pack
the reply. ``train`` replies with the adapted weights phi (not a delta) and a
MetricRecord whose ``num-examples`` is the number of episodes used; ``evaluate``
adapts on support sets and scores query sets at this site; ``query`` tells the
server which site this node serves. A site whose data fails validation answers
with an error reply carrying the validation message.
"""

from __future__ import annotations

import math

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.error import Error
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from client import sites, wire
from common.config import Config
from common.task import PrivacyBudgetExceeded


def _error_reply(msg: Message, ref: sites.SiteRef | None, err: Exception) -> Message:
    where = f"site {ref.site_id} ({ref.path or 'no directory'})" if ref else "site config"
    reason = f"{where}: {err}"
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)


def _metrics(num_episodes: int, metrics: dict[str, float]) -> MetricRecord:
    record = MetricRecord({wire.NUM_EXAMPLES: int(num_episodes)})
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            record[key] = float(value)
    return record


def make_client_app(config: Config | None = None) -> ClientApp:
    """A ClientApp bound to ``config``, or (None) reading Flower's run config."""
    app = ClientApp()

    def prepare(context: Context, found: list[sites.SiteRef]):
        cfg = sites.resolve_config(config, context.run_config)
        ref = sites.site_ref(cfg, context.node_config)
        found.append(ref)
        task = sites.get_task(cfg)
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
        except PrivacyBudgetExceeded as err:  # the site refuses: a clear error reply
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
            task, site = prepare(context, found)
        except ValueError as err:
            return _error_reply(msg, found[0] if found else None, err)
        theta = wire.record_to_tree(msg.content[wire.ARRAYS])
        eval_config = dict(msg.content[wire.CONFIG])
        generator = torch.Generator().manual_seed(int(eval_config["seed"]))
        result = task.evaluate_on_site(
            theta, site, num_episodes=int(eval_config["episodes"]), generator=generator
        )
        return Message(RecordDict({wire.METRICS: _metrics(result.num_episodes, result.metrics)}), reply_to=msg)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        cfg = sites.resolve_config(config, context.run_config)
        ref = sites.site_ref(cfg, context.node_config)
        return Message(RecordDict({wire.SITE: ConfigRecord({wire.SITE_ID: ref.site_id})}), reply_to=msg)

    return app


# `flwr run .` loads this object: the config comes from the run config.
app = make_client_app()
