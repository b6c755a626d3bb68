"""The model under torch.func (vmap over episodes, per-example vmap(grad)) and under Opacus.

The engine calls the model only as ``functional_call(model, params, (inputs,
masks))``: vmapped over a meta-batch of episodes, and inside
``vmap(grad(loss_of_one_example))`` over single records (a batch of one) for
DP-SGD. Opacus's GradSampleModule is the independent reference for the
per-example gradients.
"""

import pytest
import torch
import torch.nn.functional as F
from opacus.grad_sample import GradSampleModule
from opacus.validators import ModuleValidator
from torch.func import functional_call, grad, vmap

from common.config import ModelConfig
from common.data.schema import ModalitySpec
from common.models import FUSIONS, build_model, initial_parameters

SPECS = {
    "image": ModalitySpec("image", "image", (1, 6, 6)),
    "audio": ModalitySpec("audio", "spectrogram", (1, 5, 4)),
    "series": ModalitySpec("series", "series", (2, 7)),
    "tokens": ModalitySpec("tokens", "tokens", (4,), "int64", 9),
}
KIND_OF = {"image": "image", "audio": "spectrogram", "series": "series", "tokens": "tokens"}
WAYS = 3
ATOL = 1e-10


def schema_for(modality):
    """The modality under test plus a second one, so that fusion has something to mask."""
    other = "tokens" if modality == "series" else "series"
    return {modality: SPECS[modality], other: SPECS[other]}


def make_model(fusion, schema, *, seed=0, embedding_norm=False, **kw):
    config = ModelConfig(hidden=4, embed_dim=4, fusion=fusion, groups=2, embedding_norm=embedding_norm)
    model = build_model(config=config, schema=schema, ways=WAYS, **kw).to(torch.float64)
    g = torch.Generator().manual_seed(seed)
    params = initial_parameters(model, generator=g)
    # Move away from the symmetric start (GroupNorm 1/0, zero modality bias).
    params = {k: v + 0.1 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in params.items()}
    return model, params


def make_batch(schema, n, *, generator, lead=()):
    """Records in the engine's layout; the first record of each batch has no modality."""
    inputs, masks = {}, {}
    for name, spec in schema.items():
        shape = (*lead, n, *spec.shape)
        if spec.kind == "tokens":
            x = torch.randint(0, spec.vocab_size, shape, generator=generator)
        else:
            x = torch.randn(shape, generator=generator, dtype=torch.float64)
        mask = torch.rand((*lead, n), generator=generator) > 0.35
        mask[..., 0] = False
        mask[..., 1] = True
        inputs[name] = torch.where(mask.reshape(*mask.shape, *[1] * len(spec.shape)), x, torch.zeros_like(x))
        masks[name] = mask
    labels = torch.randint(0, WAYS, (*lead, n), generator=generator)
    return {"inputs": inputs, "masks": masks, "labels": labels}


def index(tree, i):
    if isinstance(tree, dict):
        return {k: index(v, i) for k, v in tree.items()}
    return tree[i]


def assert_trees_close(a, b, atol=ATOL):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def batch_loss(model):
    def loss(params, batch):
        logits = functional_call(model, params, (batch["inputs"], batch["masks"]))
        return F.cross_entropy(logits, batch["labels"], reduction="sum")

    return loss


def as_batch_of_one(example):
    if isinstance(example, dict):
        return {k: as_batch_of_one(v) for k, v in example.items()}
    return example.unsqueeze(0)


def one_example_loss(model):
    """The loss of one record, run as a batch of one (what DP-SGD vmaps over)."""
    loss = batch_loss(model)

    def loss_of_one(params, example):
        return loss(params, as_batch_of_one(example))

    return loss_of_one


CASES = [(fusion, modality) for fusion in FUSIONS for modality in SPECS]
CASE_IDS = [f"{f}-{KIND_OF[m]}" for f, m in CASES]


@pytest.mark.parametrize("fusion, modality", CASES, ids=CASE_IDS)
def test_vmap_over_episodes_equals_a_loop(fusion, modality):
    schema = schema_for(modality)
    model, params = make_model(fusion, schema)
    g = torch.Generator().manual_seed(1)
    episodes = 3
    batch = make_batch(schema, 5, generator=g, lead=(episodes,))
    # Each episode has its own adapted parameters, as inside adapt().
    per_episode = {k: v + 0.05 * torch.randn(episodes, *v.shape, generator=g, dtype=v.dtype) for k, v in params.items()}

    def logits(p, b):
        return functional_call(model, p, (b["inputs"], b["masks"]))

    out = vmap(logits)(per_episode, batch)
    shared = vmap(logits, in_dims=(None, 0))(params, batch)
    loss = batch_loss(model)
    grads = vmap(grad(loss))(per_episode, batch)
    for e in range(episodes):
        torch.testing.assert_close(out[e], logits(index(per_episode, e), index(batch, e)), rtol=0, atol=ATOL)
        torch.testing.assert_close(shared[e], logits(params, index(batch, e)), rtol=0, atol=ATOL)
        assert_trees_close(index(grads, e), grad(loss)(index(per_episode, e), index(batch, e)))


@pytest.mark.parametrize("embedding_norm", [False, True], ids=["raw-embeddings", "normalized-embeddings"])
@pytest.mark.parametrize("fusion, modality", CASES, ids=CASE_IDS)
def test_per_example_gradients_equal_gradients_of_each_example_alone(fusion, modality, embedding_norm):
    schema = schema_for(modality)
    model, params = make_model(fusion, schema, embedding_norm=embedding_norm)
    batch = make_batch(schema, 5, generator=torch.Generator().manual_seed(2))
    loss_of_one = one_example_loss(model)
    per_example = vmap(grad(loss_of_one), in_dims=(None, 0))(params, batch)
    total = grad(batch_loss(model))(params, batch)
    for i in range(5):
        alone = grad(batch_loss(model))(params, as_batch_of_one(index(batch, i)))
        assert_trees_close(index(per_example, i), alone)
    # Records do not interact: the batch gradient is the sum of the per-example ones.
    assert_trees_close({k: v.sum(0) for k, v in per_example.items()}, total)
    # The record with no modality moves only the head (and nothing is NaN).
    assert all(torch.isfinite(v).all() for v in per_example.values())
    assert all(torch.all(v[0] == 0) for k, v in per_example.items() if k.startswith(("encoders.", "embedding_norms.")))


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("downsample, embedding_norm", [("stride", False), ("pool", False), ("stride", True)])
def test_nested_vmap_per_example_inside_episodes(fusion, downsample, embedding_norm):
    """DP-SGD inside vmapped episodes: vmap(vmap(grad(loss_of_one))) equals a double loop."""
    model, params = make_model(fusion, SPECS, downsample=downsample, embedding_norm=embedding_norm)
    g = torch.Generator().manual_seed(3)
    episodes, n = 2, 3
    batch = make_batch(SPECS, n, generator=g, lead=(episodes,))
    per_episode = {k: v + 0.05 * torch.randn(episodes, *v.shape, generator=g, dtype=v.dtype) for k, v in params.items()}
    loss_of_one = one_example_loss(model)
    nested = vmap(vmap(grad(loss_of_one), in_dims=(None, 0)))(per_episode, batch)
    for e in range(episodes):
        for i in range(n):
            expected = grad(loss_of_one)(index(per_episode, e), index(index(batch, e), i))
            assert_trees_close(index(index(nested, e), i), expected)


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("modality", [*SPECS, "all"])
def test_opacus_module_validator_accepts_the_model(fusion, modality):
    schema = SPECS if modality == "all" else {modality: SPECS[modality]}
    model = build_model(config=ModelConfig(hidden=4, embed_dim=4, fusion=fusion, groups=2), schema=schema, ways=WAYS)
    assert ModuleValidator.validate(model, strict=False) == []
    assert ModuleValidator.is_valid(model)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("embedding_norm", [False, True], ids=["raw-embeddings", "normalized-embeddings"])
@pytest.mark.parametrize("fusion", FUSIONS)
def test_opacus_grad_samples_equal_vmap_per_example_gradients(fusion, embedding_norm):
    model, params = make_model(fusion, SPECS, head_hidden=3, embedding_norm=embedding_norm)
    model.load_state_dict(params)
    batch = make_batch(SPECS, 6, generator=torch.Generator().manual_seed(4))
    expected = vmap(grad(one_example_loss(model)), in_dims=(None, 0))(params, batch)

    gsm = GradSampleModule(model, loss_reduction="sum")
    logits = gsm(batch["inputs"], batch["masks"])
    F.cross_entropy(logits, batch["labels"], reduction="sum").backward()
    got = {name: p.grad_sample for name, p in model.named_parameters()}
    assert all(v is not None for v in got.values())
    assert_trees_close(got, expected)
    gsm._close()
