"""What travels between the ServerApp and a ClientApp, in one place.

A train or evaluate instruction carries the global parameters theta as an
``ArrayRecord`` under ``"arrays"`` (one ``Array`` per parameter name, names
kept) and the round's settings as a ``ConfigRecord`` under ``"config"``. A train
reply carries the site's adapted weights phi the same way, plus a
``MetricRecord`` under ``"metrics"`` whose ``"num-examples"`` is the number of
episodes the site used. Arrays never travel through metrics.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from common.tree import Tree

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
SITE = "site"
# A train reply's ConfigRecord echoing the instruction's ``round`` and ``nonce``:
# the server refuses a reply made for another round.
REPLY = "reply"
NUM_EXAMPLES = "num-examples"

# The ConfigRecord of a train instruction (the client merges these over its config).
# ``run_id`` names the run (its directory, kept on resume) for a site's privacy ledger.
TRAIN_KEYS = ("round", "inner_steps", "inner_lr", "ways", "shots", "query_shots", "episodes", "seed", "run_id", "nonce")
# The ConfigRecord of an evaluate instruction.
EVALUATE_KEYS = ("round", "inner_steps", "ways", "shots", "query_shots", "episodes", "seed")

# Error code of a site's reply when it refuses federated evaluation because it is
# under record-level DP (Flower's own codes are 0-8): the server counts it apart
# from failures.
PRIVATE_SITE_REFUSED = 100

# A cohort instruction (simulation: one message per node, naming the sites it
# trains or evaluates this round) carries, in its ConfigRecord, the site ids and
# their per-site seeds; every other key is the same for all its sites. The reply
# carries each site's records under "<record>/<site id>" (arrays, metrics), the
# sites that failed in the ConfigRecords COHORT_ERRORS (site id -> reason) and
# COHORT_ERROR_CODES (site id -> code), and one REPLY echo for all of them.
COHORT_SITES = "cohort-sites"
COHORT_SEEDS = "cohort-seeds"
COHORT_ERRORS = "cohort-errors"
COHORT_ERROR_CODES = "cohort-error-codes"
# The site a simulated node is told to serve (per-site mode without discovery).
SITE_FOR = "site-id"


def cohort_key(record: str, site_id: str) -> str:
    """The name of one site's record in a cohort reply: ``"arrays/site-0003"``."""
    return f"{record}/{site_id}"


# Message type of the one-off query asking a node which site it serves.
QUERY_SITE = "query"
SITE_ID = "site-id"


def tree_to_record(params: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """``dict[str, Tensor]`` -> ``ArrayRecord`` with the same key names."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v.detach().cpu().numpy())) for k, v in params.items()})


def record_to_tree(record: ArrayRecord) -> Tree:
    """``ArrayRecord`` -> ``dict[str, Tensor]`` (CPU), keys kept."""
    return {k: torch.from_numpy(np.array(arr.numpy(), copy=True)) for k, arr in record.items()}


def record_nbytes(record: ArrayRecord) -> int:
    """Serialized size of an ``ArrayRecord`` in bytes (what travels on the wire)."""
    return sum(len(arr.data) for arr in record.values())
