"""A site's record-level privacy policy: where it comes from, and what a run may ask of it.

The party that submits a run controls the run config, so a site's privacy
policy cannot live there: who sets the budget is part of the threat model.
A deployed site sets its policy in its SuperNode's node config, either in a
YAML file that the node config names or key by key::

    flower-supernode ... --node-config 'data-path="/srv/site" privacy-policy="/srv/site/privacy.yaml"'
    flower-supernode ... --node-config 'data-path="/srv/site" privacy-require-record-dp=true privacy-max-epsilon=8.0'

(the file holds the fields of :class:`common.config.SitePrivacyConfig`;
single keys override the file). A simulated node (a ``partition-id`` and no
``data-path``) takes the config's ``site_privacy`` section, so that a
simulation stays one YAML file.

The run's ``privacy.record`` section is a request that is checked against the
policy: it may ask for more privacy (more noise, a smaller maximum epsilon),
never for less. A request that would loosen the policy is refused with
:class:`PolicyViolation`, whose message names the setting and what the site
allows; the ClientApp turns it into an error reply. No Flower imports here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from common.config import Config, ConfigError, RecordDPConfig, SitePrivacyConfig, section_from_dict

POLICY_FILE_KEY = "privacy-policy"
# Node-config key -> policy field: ``privacy-max-epsilon`` sets ``max_epsilon``.
NODE_KEY_PREFIX = "privacy-"
NODE_KEYS = {
    NODE_KEY_PREFIX + f.name.replace("_", "-"): f.name for f in dataclasses.fields(SitePrivacyConfig)
}
DATA_PATH_KEY = "data-path"
ACCOUNTANTS = ("rdp", "prv")


class SitePolicyError(ConfigError):
    """A site's policy is unreadable or inconsistent; the message says what to fix."""


class PolicyViolation(ConfigError):
    """The run asks for weaker privacy than the site's policy allows."""


def validate(policy: SitePrivacyConfig, *, where: str = "site_privacy") -> SitePrivacyConfig:
    """Check a policy's ranges and that its limits come with required DP."""
    if policy.accountant not in ACCOUNTANTS:
        raise SitePolicyError(f"{where}: accountant must be one of {', '.join(ACCOUNTANTS)}; got {policy.accountant!r}")
    if not 0.0 < policy.delta < 1.0:
        raise SitePolicyError(f"{where}: delta must be in (0, 1); got {policy.delta}")
    for name in ("max_epsilon", "max_round_epsilon"):
        value = getattr(policy, name)
        if math.isnan(value) or value <= 0:
            raise SitePolicyError(f"{where}: {name} must be > 0 (inf for no limit); got {value}")
    if math.isnan(policy.min_noise_multiplier) or policy.min_noise_multiplier < 0:
        raise SitePolicyError(f"{where}: min_noise_multiplier must be >= 0; got {policy.min_noise_multiplier}")
    limits = [name for name, unset in (("max_epsilon", math.inf), ("max_round_epsilon", math.inf),
                                       ("min_noise_multiplier", 0.0)) if getattr(policy, name) != unset]
    if limits and not policy.require_record_dp:
        # A limit on DP that a run could switch off by not asking for DP is no limit.
        raise SitePolicyError(
            f"{where}: {', '.join(limits)} limit record-level DP, which this policy does not require; "
            "set require_record_dp: true"
        )
    return policy


def load_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a site policy YAML file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise SitePolicyError(f"site privacy policy file not found: {path} (node config key '{POLICY_FILE_KEY}')")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise SitePolicyError(f"site privacy policy {path} is not valid YAML: {err}") from None
    if not isinstance(values, Mapping):
        raise SitePolicyError(
            f"site privacy policy {path} must hold a mapping of settings, got {type(values).__name__}"
        )
    return dict(values)


def from_node_config(node_config: Mapping[str, Any]) -> SitePrivacyConfig:
    """A deployed site's policy: the file ``privacy-policy`` names, then single ``privacy-*`` keys."""
    values: dict[str, Any] = {}
    where = "node config"
    if str(node_config.get(POLICY_FILE_KEY, "") or ""):
        where = str(node_config[POLICY_FILE_KEY])
        values = load_file(where)
    unknown = sorted(k for k in node_config if k.startswith(NODE_KEY_PREFIX) and k != POLICY_FILE_KEY
                     and k not in NODE_KEYS)
    if unknown:
        raise SitePolicyError(
            f"unknown node config key '{unknown[0]}'. Site privacy keys: "
            + ", ".join([POLICY_FILE_KEY, *NODE_KEYS])
        )
    values.update({field: node_config[key] for key, field in NODE_KEYS.items() if key in node_config})
    try:
        policy = section_from_dict(SitePrivacyConfig, values, prefix="")
    except ConfigError as err:
        raise SitePolicyError(f"site privacy policy ({where}): {err}") from None
    return validate(policy, where=f"site privacy policy ({where})")


def for_node(config: Config, node_config: Mapping[str, Any]) -> SitePrivacyConfig:
    """The policy of the site a node serves.

    A deployed node (its node config has ``data-path``) takes its policy from
    its node config only, never from the run. A simulated node takes the
    config's ``site_privacy`` section.
    """
    if str(node_config.get(DATA_PATH_KEY, "") or ""):
        return from_node_config(node_config)
    return validate(config.site_privacy)


def violations(request: RecordDPConfig, policy: SitePrivacyConfig) -> list[str]:
    """Every way the run's ``privacy.record`` request is weaker than the policy (empty: allowed)."""
    if not request.enabled:
        if policy.require_record_dp:
            return ["privacy.record.enabled=false, but this site trains only under record-level DP "
                    "(run with privacy.record.enabled=true)"]
        return []
    out = []
    if request.delta != policy.delta:
        out.append(f"privacy.record.delta={request.delta:g}, but this site accounts its budget at "
                   f"delta={policy.delta:g} (run with privacy.record.delta={policy.delta:g})")
    if request.accountant != policy.accountant:
        out.append(f"privacy.record.accountant={request.accountant}, but this site's ledger is accounted "
                   f"with {policy.accountant} (run with privacy.record.accountant={policy.accountant})")
    if request.max_epsilon > policy.max_epsilon:
        out.append(f"privacy.record.max_epsilon={request.max_epsilon:g}, but this site allows at most "
                   f"{policy.max_epsilon:g} at delta={policy.delta:g} (ask for {policy.max_epsilon:g} or less)")
    if request.noise_multiplier < policy.min_noise_multiplier:
        out.append(f"privacy.record.noise_multiplier={request.noise_multiplier:g}, but this site needs at "
                   f"least {policy.min_noise_multiplier:g}")
    return out


def check(config: Config, policy: SitePrivacyConfig) -> Config:
    """The config this site trains with: the run's, bound to the site's policy.

    Raises :class:`PolicyViolation` naming each loosened setting.
    """
    found = violations(config.privacy.record, policy)
    if found:
        raise PolicyViolation("the run asks for weaker record-level privacy than this site's policy allows: "
                              + "; ".join(found))
    if config.site_privacy == policy:
        return config
    return dataclasses.replace(config, site_privacy=policy)


EVALUATION_REFUSED = (
    "this site is under record-level DP and releases nothing but its noised weights and their accounting: "
    "it does not take part in federated evaluation (hold out sites under data.root/test for the server's meta-test)"
)


def is_private(policy: SitePrivacyConfig, config: Config) -> bool:
    """Whether the site is under record-level DP: its policy requires it, or the run asks for it."""
    return policy.require_record_dp or config.privacy.record.enabled
