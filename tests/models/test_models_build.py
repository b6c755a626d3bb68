"""Encoders, fusion, masks, initialization and parameter counts of common.models."""

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from common.config import ModelConfig
from common.data.schema import ModalitySpec
from common.models import (
    FUSIONS,
    AttentionFusion,
    build_encoder,
    build_fusion,
    build_model,
    count_parameters,
    initial_parameters,
    param_bytes,
)

SMALL = {
    "image": ModalitySpec("image", "image", (1, 8, 8)),
    "audio": ModalitySpec("audio", "spectrogram", (1, 7, 6)),
    "series": ModalitySpec("series", "series", (2, 10)),
    "tokens": ModalitySpec("tokens", "tokens", (5,), "int64", 11),
}
WAYS = 3


def small_config(fusion="attention", **kw):
    return ModelConfig(hidden=4, embed_dim=8, fusion=fusion, groups=2, **kw)


def make_batch(schema, n, *, generator, dtype=torch.float64, missing=0.3):
    """Random records; record 0 has no modality, record 1 has all; missing inputs are zeros."""
    inputs, masks = {}, {}
    for name, spec in schema.items():
        shape = (n, *spec.shape)
        if spec.kind == "tokens":
            x = torch.randint(0, spec.vocab_size, shape, generator=generator)
        else:
            x = torch.randn(shape, generator=generator, dtype=dtype)
        mask = torch.rand(n, generator=generator) > missing
        mask[0], mask[1] = False, True
        inputs[name] = torch.where(mask.reshape(-1, *[1] * len(spec.shape)), x, torch.zeros_like(x))
        masks[name] = mask
    return inputs, masks


def float64_model(fusion, schema=SMALL, seed=0, **kw):
    model = build_model(config=small_config(fusion), schema=schema, ways=WAYS, **kw).to(torch.float64)
    params = initial_parameters(model, generator=torch.Generator().manual_seed(seed))
    return model, params


# ---------------------------------------------------------------- encoders


@pytest.mark.parametrize("downsample", ["stride", "pool"])
@pytest.mark.parametrize(
    "spec",
    [
        ModalitySpec("a", "image", (1, 28, 28)),
        ModalitySpec("a", "image", (3, 5, 9)),
        ModalitySpec("a", "image", (1, 1, 1)),
        ModalitySpec("a", "spectrogram", (1, 33, 32)),
        ModalitySpec("a", "spectrogram", (2, 3, 1)),
        ModalitySpec("a", "series", (3, 64)),
        ModalitySpec("a", "series", (1, 1)),
        ModalitySpec("a", "tokens", (16,), "int64", 64),
        ModalitySpec("a", "tokens", (1,), "int64", 1),
    ],
    ids=lambda s: f"{s.kind}{'x'.join(map(str, s.shape))}",
)
def test_encoder_maps_any_size_to_embed_dim(spec, downsample):
    enc = build_encoder(spec=spec, hidden=8, embed_dim=12, groups=4, downsample=downsample)
    if spec.kind == "tokens":
        x = torch.randint(0, spec.vocab_size, (3, *spec.shape))
    else:
        x = torch.randn(3, *spec.shape)
    out = enc(x)
    assert out.shape == (3, 12)
    assert torch.isfinite(out).all()


def test_image_encoder_is_the_four_block_network():
    enc = build_encoder(spec=ModalitySpec("a", "image", (1, 28, 28)), hidden=32, embed_dim=64, groups=4)
    convs = [m for m in enc.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in enc.modules() if isinstance(m, nn.GroupNorm)]
    assert len(convs) == 4 and len(norms) == 4
    assert all(c.kernel_size == (3, 3) and c.out_channels == 32 for c in convs)
    assert all(n.num_groups == 4 for n in norms)
    # 28 -> 14 -> 7 -> 4 -> 2: the projection reads 32 * 2 * 2 features.
    assert enc.project[0].in_features == 32 * 2 * 2
    pooled = build_encoder(
        spec=ModalitySpec("a", "image", (1, 28, 28)), hidden=32, embed_dim=64, groups=4, downsample="pool"
    )
    assert sum(isinstance(m, nn.MaxPool2d) for m in pooled.modules()) == 4
    assert pooled.project[0].in_features == 32 * 2 * 2


def test_encoder_accepts_float32_input_with_float64_weights():
    spec = ModalitySpec("a", "image", (1, 6, 6))
    enc = build_encoder(spec=spec, hidden=4, embed_dim=8, groups=2).to(torch.float64)
    assert enc(torch.randn(2, 1, 6, 6)).dtype == torch.float64


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(spec=ModalitySpec("a", "image", (28, 28)), hidden=8, embed_dim=8, groups=4), r"\[C, H, W\]"),
        (dict(spec=ModalitySpec("a", "series", (64,)), hidden=8, embed_dim=8, groups=4), r"\[C, L\]"),
        (dict(spec=ModalitySpec("a", "tokens", (2, 3), "int64", 5), hidden=8, embed_dim=8, groups=4), r"\[L\]"),
        (dict(spec=ModalitySpec("a", "image", (1, 4, 4)), hidden=6, embed_dim=8, groups=4), "groups=4"),
        (
            dict(spec=ModalitySpec("a", "image", (1, 4, 4)), hidden=8, embed_dim=8, groups=4, downsample="avg"),
            "downsample",
        ),
    ],
)
def test_encoder_errors_say_what_is_wrong(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_encoder(**kwargs)


def test_model_errors():
    with pytest.raises(ValueError, match="fusion"):
        build_fusion(fusion="sum", modalities=("a",), embed_dim=4, ways=2)
    with pytest.raises(ValueError, match="at least one"):
        build_model(config=small_config(), schema={}, ways=2)
    with pytest.raises(ValueError, match="ways"):
        build_model(config=small_config(), schema=SMALL, ways=0)
    with pytest.raises(ValueError, match="modality name"):
        build_model(config=small_config(), schema={"a.b": SMALL["image"]}, ways=2)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_no_batchnorm_no_inplace(fusion):
    model = build_model(config=small_config(fusion), schema=SMALL, ways=WAYS, head_hidden=5)
    for module in model.modules():
        assert not isinstance(module, nn.modules.batchnorm._BatchNorm)
        assert not getattr(module, "inplace", False), module
    # No buffers: a parameter dict is the model's whole state for functional_call.
    assert list(model.buffers()) == []


# ------------------------------------------------------------------ model


@pytest.mark.parametrize("fusion", FUSIONS)
def test_forward_shape_and_modalities_order(fusion):
    model, params = float64_model(fusion)
    assert model.modalities == ("audio", "image", "series", "tokens")
    inputs, masks = make_batch(SMALL, 6, generator=torch.Generator().manual_seed(1))
    out = functional_call(model, params, (inputs, masks))
    assert out.shape == (6, WAYS) and out.dtype == torch.float64
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("fusion", FUSIONS)
def test_schema_order_does_not_matter(fusion):
    reordered = dict(reversed(list(SMALL.items())))
    a, params = float64_model(fusion)
    b, _ = float64_model(fusion, schema=reordered)
    assert [k for k, _ in a.named_parameters()] == [k for k, _ in b.named_parameters()]
    inputs, masks = make_batch(SMALL, 5, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(
        functional_call(a, params, (inputs, masks)), functional_call(b, params, (inputs, masks)), rtol=0, atol=0
    )


@pytest.mark.parametrize("fusion", FUSIONS)
def test_masked_out_values_do_not_change_logits(fusion):
    model, params = float64_model(fusion)
    g = torch.Generator().manual_seed(3)
    inputs, masks = make_batch(SMALL, 8, generator=g, missing=0.5)
    reference = functional_call(model, params, (inputs, masks))
    changed = {}
    for name, x in inputs.items():
        mask = masks[name].reshape(-1, *[1] * (x.dim() - 1))
        if x.dtype == torch.int64:
            noise = torch.full_like(x, 10**6)  # not even a valid id
        else:
            noise = torch.randn(x.shape, generator=g, dtype=x.dtype) * 1e3
            noise[0] = float("nan")
        changed[name] = torch.where(mask, x, noise)
    out = functional_call(model, params, (changed, masks))
    torch.testing.assert_close(out, reference, rtol=0, atol=0)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_record_with_nothing_present_gets_finite_logits_and_gradients(fusion):
    model, params = float64_model(fusion)
    inputs, masks = make_batch(SMALL, 3, generator=torch.Generator().manual_seed(4))
    masks = {k: torch.zeros_like(v) for k, v in masks.items()}
    out = functional_call(model, params, (inputs, masks))
    assert torch.isfinite(out).all()
    # Every record looks the same when nothing is present.
    torch.testing.assert_close(out, out[:1].expand_as(out))
    grads = torch.func.grad(lambda p: functional_call(model, p, (inputs, masks)).sum())(params)
    assert all(torch.isfinite(v).all() for v in grads.values())


def test_early_fusion_with_nothing_present_is_the_head_bias():
    model, params = float64_model("early")
    inputs, masks = make_batch(SMALL, 2, generator=torch.Generator().manual_seed(5))
    masks = {k: torch.zeros_like(v) for k, v in masks.items()}
    out = functional_call(model, params, (inputs, masks))
    torch.testing.assert_close(out, params["fusion.head.net.0.bias"].expand(2, WAYS))


def test_late_fusion_averages_the_present_modalities():
    model, params = float64_model("late")
    inputs, masks = make_batch(SMALL, 6, generator=torch.Generator().manual_seed(6))
    out = functional_call(model, params, (inputs, masks))
    alone = {}
    for name in model.modalities:  # logits when only this modality is present
        only = {k: (v if k == name else torch.zeros_like(v)) for k, v in masks.items()}
        only[name] = torch.ones_like(masks[name])
        alone[name] = functional_call(model, params, (inputs, only))
    for i in range(1, 6):
        present = [m for m in model.modalities if masks[m][i]]
        expected = torch.stack([alone[m][i] for m in present]).mean(0)
        torch.testing.assert_close(out[i], expected)


def test_attention_weights_are_a_softmax_over_present_modalities():
    model, params = float64_model("attention")
    params["fusion.modality_bias.weight"] = torch.randn(4, 1, dtype=torch.float64)
    model.load_state_dict(params)
    inputs, masks = make_batch(SMALL, 8, generator=torch.Generator().manual_seed(7), missing=0.5)
    assert isinstance(model.fusion, AttentionFusion)
    with torch.no_grad():
        embeddings, present = model.embed(inputs, masks)
        weights = model.fusion.weights(embeddings, present)
    assert embeddings.shape == (8, 4, 8) and present.shape == (8, 4)
    assert torch.all(weights[~present] == 0)
    sums = weights.sum(dim=1)
    has_any = present.any(dim=1)
    torch.testing.assert_close(sums[has_any], torch.ones_like(sums[has_any]))
    assert torch.all(sums[~has_any] == 0)
    # A record with one modality puts all its weight there.
    single = present.sum(dim=1) == 1
    assert torch.all(weights[single].max(dim=1).values == 1)
    # Present modalities all get some weight.
    assert torch.all(weights[present] > 0)


def test_head_hidden_layer():
    model = build_model(config=small_config("early"), schema=SMALL, ways=WAYS, head_hidden=7)
    linears = [m for m in model.fusion.head.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(4 * 8, 7), (7, WAYS)]


# --------------------------------------------------------- initialization


def test_initial_parameters_deterministic_and_seeded():
    model = build_model(config=small_config(), schema=SMALL, ways=WAYS)
    a = initial_parameters(model, generator=torch.Generator().manual_seed(0))
    b = initial_parameters(model, generator=torch.Generator().manual_seed(0))
    c = initial_parameters(model, generator=torch.Generator().manual_seed(1))
    assert list(a) == [k for k, _ in model.named_parameters()]
    for k in a:
        assert torch.equal(a[k], b[k])
        assert a[k].shape == dict(model.named_parameters())[k].shape
        assert not a[k].requires_grad
    modules = dict(model.named_modules())
    fixed = [k for k in a if isinstance(modules[k.rpartition(".")[0]], nn.GroupNorm) or "modality_bias" in k]
    drawn = [k for k in a if k not in fixed]
    assert fixed and drawn
    assert all(torch.equal(a[k], c[k]) for k in fixed)
    assert all(not torch.equal(a[k], c[k]) for k in drawn)


def test_initial_parameters_leave_global_rng_and_model_alone():
    model = build_model(config=small_config(), schema=SMALL, ways=WAYS)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    torch.manual_seed(99)
    state = torch.random.get_rng_state()
    params = initial_parameters(model, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.random.get_rng_state(), state)
    for k, v in model.named_parameters():
        assert torch.equal(v, before[k])
    params["encoders.image.project.0.weight"].add_(1.0)  # a fresh copy, not a view of the model
    assert torch.equal(model.encoders.image.project[0].weight, before["encoders.image.project.0.weight"])


def test_initial_parameters_follow_pytorch_default_rules():
    model = build_model(config=small_config(), schema=SMALL, ways=WAYS)
    params = initial_parameters(model, generator=torch.Generator().manual_seed(0))
    modules = dict(model.named_modules())
    for name, value in params.items():
        owner, _, leaf = name.rpartition(".")
        module = modules[owner]
        if isinstance(module, nn.GroupNorm):
            assert torch.all(value == (1.0 if leaf == "weight" else 0.0))
        elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            fan_in = module.weight[0].numel()
            assert value.abs().max() <= 1 / math.sqrt(fan_in)
            assert value.abs().max() > 0.3 / math.sqrt(fan_in)
    assert torch.all(params["fusion.modality_bias.weight"] == 0)
    emb = params["encoders.tokens.embed.weight"]
    assert 0.5 < emb.std() < 1.5


def test_initial_parameters_match_across_dtypes():
    model32 = build_model(config=small_config(), schema=SMALL, ways=WAYS)
    model64 = build_model(config=small_config(), schema=SMALL, ways=WAYS).to(torch.float64)
    p32 = initial_parameters(model32, generator=torch.Generator().manual_seed(0))
    p64 = initial_parameters(model64, generator=torch.Generator().manual_seed(0))
    for k in p32:
        assert p32[k].dtype == torch.float32 and p64[k].dtype == torch.float64
        assert torch.equal(p64[k].float(), p32[k])


def test_count_parameters_and_bytes():
    model = build_model(config=small_config(), schema=SMALL, ways=WAYS)
    params = initial_parameters(model, generator=torch.Generator().manual_seed(0))
    n = count_parameters(model)
    assert n == count_parameters(params) == sum(v.numel() for v in params.values())
    assert param_bytes(model) == param_bytes(params) == 4 * n
    assert param_bytes({k: v.double() for k, v in params.items()}) == 8 * n


def test_default_config_parameter_counts():
    schema = {
        "image": ModalitySpec("image", "image", (1, 28, 28)),
        "audio": ModalitySpec("audio", "spectrogram", (1, 33, 32)),
        "series": ModalitySpec("series", "series", (3, 64)),
    }
    counts = {f: count_parameters(build_model(config=ModelConfig(fusion=f), schema=schema, ways=5)) for f in FUSIONS}
    # The encoders are the same for every fusion; only the heads and the scorer differ.
    assert counts["late"] - counts["early"] == 3 * (64 * 5 + 5) - (3 * 64 * 5 + 5)
    assert counts["attention"] - counts["early"] == (64 * 64 + 64) + (64 + 1) + 3 + (64 * 5 + 5) - (3 * 64 * 5 + 5)
    assert all(50_000 < c < 150_000 for c in counts.values()), counts


@pytest.mark.parametrize("fusion", FUSIONS)
def test_embedding_norm_puts_every_modality_on_one_scale(fusion):
    """With ``embedding_norm`` a modality's logits do not depend on the scale of its
    encoder's output: scaling one encoder's last linear layer by 10 (its ReLU is
    positively homogeneous) leaves them unchanged, up to GroupNorm's eps; without
    it, they change."""
    inputs, masks = make_batch(SMALL, 6, generator=torch.Generator().manual_seed(8))
    for embedding_norm in (False, True):
        model = build_model(config=small_config(fusion, embedding_norm=embedding_norm), schema=SMALL,
                            ways=WAYS).to(torch.float64)
        g = torch.Generator().manual_seed(0)
        params = initial_parameters(model, generator=g)
        # Away from the symmetric start (GroupNorm 1/0, zero modality bias).
        params = {k: v + 0.1 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in params.items()}
        louder = {k: (10.0 * v if k.startswith("encoders.audio.project.0.") else v) for k, v in params.items()}
        before = functional_call(model, params, (inputs, masks))
        after = functional_call(model, louder, (inputs, masks))
        if embedding_norm:
            # Equal up to GroupNorm's eps (1e-5 added to the variance).
            torch.testing.assert_close(after, before, rtol=1e-3, atol=1e-3)
        else:
            assert (after - before).abs().max() > 0.05
    model = build_model(config=small_config(fusion, embedding_norm=True), schema=SMALL, ways=WAYS)
    assert sorted(n for n, _ in model.named_parameters() if n.startswith("embedding_norms.")) == sorted(
        f"embedding_norms.{m}.{p}" for m in SMALL for p in ("weight", "bias"))
