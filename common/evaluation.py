"""The FedMeta evaluation protocol: adapt on an unseen site's support, score its query.

Chen, Luo, Dong, Li & He, "Federated Meta-Learning with Fast Convergence and
Efficient Communication", arXiv 1802.07876: held-out sites never train; each
test episode adapts the shared initialization on its support set (the same
``adapt`` that training uses; FedAvg's weights get the same fine-tuning) and
scores the query set. Accuracy is reported as the mean over episodes with a
95% confidence interval, per site, over the worst decile of sites, and with
each modality removed (how much each one carries).

Beside the model, the same episodes are scored by a 1-nearest-neighbour
classifier on raw inputs (the "pixels" baseline of Vinyals et al., "Matching
Networks for One Shot Learning", NeurIPS 2016): what the support set gives
with no learning at all. A meta-learned model that does not beat it has
learned nothing the raw inputs did not already say, or the data is too easy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import vmap

from common.algorithms.inner import InnerLoop, adapt, batch_accuracy, batch_loss, lr_part, model_part
from common.tree import Tree

# Episodes adapted at once during evaluation: bounds activation memory.
EVAL_CHUNK = 32


@dataclass(frozen=True)
class EpisodeScores:
    accuracy: torch.Tensor  # [E]
    loss: torch.Tensor  # [E]


def score_episodes(
    model: nn.Module,
    params: Tree,
    episodes: dict,
    *,
    inner_steps: int,
    inner_lr: float,
    optimizer: str = "sgd",
    head_init: str = "shared",
    classifier: str = "head",
    distance: str = "euclidean",
    chunk: int = EVAL_CHUNK,
) -> EpisodeScores:
    """Per-episode query accuracy and loss after adapting on the support.

    ``classifier="head"`` scores the model's own logits after ``inner_steps``
    steps on the support's classification loss; ``"prototypes"`` (protonet)
    scores the nearest class prototype of the support's embeddings after
    ``inner_steps`` steps on the support's own prototypical loss
    (:mod:`common.algorithms.protonet`; ``distance`` is its distance).
    """
    from common.algorithms import protonet

    weights, rates = model_part(params), (lr_part(params) or None)
    if classifier not in ("head", "prototypes"):
        raise ValueError(f"classifier must be 'head' or 'prototypes'; got {classifier!r}")
    prototypes = classifier == "prototypes"
    loop = InnerLoop(inner_steps=inner_steps, inner_lr=inner_lr, first_order=True, optimizer=optimizer,
                     head_init="shared" if prototypes else head_init)
    oracle = protonet.prototypical_gradient(model, distance=distance) if prototypes else None

    def one(support, query):
        adapted = adapt(model, weights, support, loop=loop, learning_rates=rates, gradient=oracle)
        if prototypes:
            return (protonet.prototypical_accuracy(model, adapted, support, query, distance=distance),
                    protonet.prototypical_loss(model, adapted, support, query, distance=distance))
        return batch_accuracy(model, adapted, query), batch_loss(model, adapted, query)

    total = int(episodes["support"]["labels"].shape[0])
    accs, losses = [], []
    with torch.no_grad():
        for lo in range(0, total, chunk):
            part = _slice(episodes, lo, lo + chunk)
            acc, loss = vmap(one)(part["support"], part["query"])
            accs.append(acc)
            losses.append(loss)
    return EpisodeScores(accuracy=torch.cat(accs), loss=torch.cat(losses))


def standardize(x: torch.Tensor, *, leading: int = 2) -> torch.Tensor:
    """Each record flattened, centred and scaled to unit norm (``leading`` batch axes kept).

    Removes a record's own offset and gain (exposure, loudness, sensor
    calibration), so that raw-input distances compare shapes, not levels.
    """
    x = x.flatten(leading).double()
    x = x - x.mean(-1, keepdim=True)
    return x / (x.norm(dim=-1, keepdim=True) + 1e-8)


def raw_nearest_neighbour(episodes: dict, *, schema) -> torch.Tensor:
    """Per-episode query accuracy ``[E]`` of 1-NN on raw inputs.

    A query takes the label of the support record at the smallest distance:
    the mean, over the modalities both records have, of the squared Euclidean
    distance between the standardized inputs (token ids one-hot). Support
    records that share no modality with the query, and padding, are never
    chosen; a query that shares a modality with no support record is wrong.
    Padded queries do not count.
    """
    support, query = episodes["support"], episodes["query"]
    total = count = None
    for name, spec in schema.items():
        xs, xq = support["inputs"][name], query["inputs"][name]
        if spec.kind == "tokens":
            xs = torch.nn.functional.one_hot(xs, spec.vocab_size)
            xq = torch.nn.functional.one_hot(xq, spec.vocab_size)
        distance = torch.cdist(standardize(xq), standardize(xs)) ** 2  # [E, Q, S]
        both = query["masks"][name][:, :, None] & support["masks"][name][:, None, :]
        term = torch.where(both, distance, torch.zeros_like(distance))
        total = term if total is None else total + term
        count = both.to(term.dtype) if count is None else count + both.to(term.dtype)
    usable = (count > 0) & (support["weights"][:, None, :] > 0)
    mean = torch.where(usable, total / count.clamp(min=1.0), torch.full_like(total, math.inf))
    nearest = mean.argmin(dim=-1)  # [E, Q]
    predicted = torch.gather(support["labels"], 1, nearest)
    correct = (predicted == query["labels"]) & usable.any(dim=-1)
    weights = query["weights"].double()
    return (correct.double() * weights).sum(-1) / weights.sum(-1).clamp(min=1.0)


def _slice(x, lo: int, hi: int):
    return {k: _slice(v, lo, hi) for k, v in x.items()} if isinstance(x, dict) else x[lo:hi]


def without_modality(episodes: dict, modality: str) -> dict:
    """The same episodes with one modality removed from every record."""

    def strip(batch: dict) -> dict:
        inputs = dict(batch["inputs"])
        masks = dict(batch["masks"])
        inputs[modality] = torch.zeros_like(inputs[modality])
        masks[modality] = torch.zeros_like(masks[modality])
        return {**batch, "inputs": inputs, "masks": masks}

    return {"support": strip(episodes["support"]), "query": strip(episodes["query"])}


def only_modality(episodes: dict, modality: str, modalities) -> dict:
    """The same episodes with every modality but one removed."""
    for other in modalities:
        if other != modality:
            episodes = without_modality(episodes, other)
    return episodes


def mean_ci95(values: Sequence[float] | torch.Tensor) -> tuple[float, float]:
    """Mean and the half-width of a normal-approximation 95% interval."""
    x = torch.as_tensor(values, dtype=torch.float64).flatten()
    n = x.numel()
    if n == 0:
        return math.nan, math.nan
    mean = float(x.mean())
    if n == 1:
        return mean, math.nan
    return mean, 1.96 * float(x.std(unbiased=True)) / math.sqrt(n)


def worst_decile(per_site: dict[str, float]) -> float:
    """Mean accuracy over the worst 10% of sites (at least one site)."""
    if not per_site:
        return math.nan
    ordered = sorted(per_site.values())
    k = max(1, math.ceil(len(ordered) / 10))
    return sum(ordered[:k]) / k


def summarize(
    per_site_scores: dict[str, torch.Tensor],
    per_site_ablations: dict[str, dict[str, torch.Tensor]] | None = None,
) -> dict:
    """Turn per-site episode accuracies into the report the runs write.

    ``per_site_ablations`` maps a name (``without_audio``, ``only_image``,
    ``raw_1nn``) to per-site scores of the same episodes; the report gets
    their mean under that name, and ``ablation_ci95`` their 95% intervals.
    """
    all_scores = torch.cat(list(per_site_scores.values())) if per_site_scores else torch.zeros(0)
    mean, ci = mean_ci95(all_scores)
    per_site = {site: float(v.double().mean()) for site, v in per_site_scores.items()}
    report = {
        "accuracy": mean,
        "ci95": ci,
        "episodes": int(all_scores.numel()),
        "sites": len(per_site),
        "worst_decile": worst_decile(per_site),
        "per_site": per_site,
    }
    intervals = {}
    for name, scores in (per_site_ablations or {}).items():
        report[name], intervals[name] = mean_ci95(torch.cat(list(scores.values())))
    if intervals:
        report["ablation_ci95"] = intervals
    return report
