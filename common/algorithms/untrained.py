"""``none``: no training at all; the random initialization, adapted like every model.

The baseline every meta-learned initialization must clearly beat: a site
replies with the weights it was sent, so the global model stays the run's
random initialization theta_0, and meta-test adapts it on each support set
with the same inner loop (steps, learning rate, head initialization) as any
other algorithm. With ``algorithm.head_init: prototypes`` this is a
nearest-class-mean classifier on random features refined by a few steps, the
"random features" reference of the few-shot literature (e.g. Chen, Liu, Kira,
Wang & Huang, "A Closer Look at Few-shot Classification", ICLR 2019, whose
baselines fine-tune a classifier on fixed features). Every run's final report
also scores theta_0 this way (``random_init``), on its own episodes.
"""

from __future__ import annotations

from torch import nn

from common.algorithms.base import Algorithm, ClientHParams, ClientResult, plain_init
from common.algorithms.inner import GradientFn
from common.tree import Tree


def client_update(
    *,
    model: nn.Module,
    params: Tree,
    episodes: dict,
    hparams: ClientHParams,
    gradient: GradientFn | None = None,
) -> ClientResult:
    return ClientResult(params={k: v.detach().clone() for k, v in params.items()})


ALGORITHM = Algorithm(
    name="none",
    paper="no training: the random initialization (Chen et al., ICLR 2019, fixed-feature baselines)",
    init=plain_init,
    client_update=client_update,
    uses_query_gradient=False,
)
