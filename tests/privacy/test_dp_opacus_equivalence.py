"""Per-example gradients and one DP step agree with Opacus, the reference implementation."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.privacy.clipping import (
    clip_per_example,
    draw_standard_noise,
    per_example_grads,
    private_gradient,
)


class ConvGNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, kernel_size=3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.fc = nn.Linear(4 * 5 * 5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.norm(self.conv(x)))  # not in place: Opacus hooks need that
        return self.fc(h.flatten(1))


def _setup(batch_size: int = 6, seed: int = 0):
    torch.manual_seed(seed)
    model = ConvGNNet().double()
    g = torch.Generator().manual_seed(seed)
    batch = {
        "x": torch.randn(batch_size, 2, 5, 5, generator=g, dtype=torch.float64),
        "y": torch.randint(0, 3, (batch_size,), generator=g),
    }
    params = {k: v.detach().clone() for k, v in model.named_parameters()}

    def loss_of_one(p, example):
        out = torch.func.functional_call(model, p, (example["x"].unsqueeze(0),))
        return F.cross_entropy(out, example["y"].unsqueeze(0))

    return model, params, batch, loss_of_one


def _opacus_grad_samples(model: nn.Module, batch) -> dict[str, torch.Tensor]:
    from opacus import GradSampleModule

    # A copy: wrapping adds hooks to the module, and functional_call must run on a plain one.
    reference = copy.deepcopy(model)
    gsm = GradSampleModule(reference, batch_first=True, loss_reduction="sum")
    loss = F.cross_entropy(gsm(batch["x"]), batch["y"], reduction="sum")
    loss.backward()
    return {k: p.grad_sample.detach().clone() for k, p in reference.named_parameters()}


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_per_example_grads_equal_opacus_grad_sample():
    model, params, batch, loss_of_one = _setup()
    ours = per_example_grads(loss_of_one, params, batch)
    theirs = _opacus_grad_samples(model, batch)
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert ours[k].shape == (6, *params[k].shape)
        assert (ours[k] - theirs[k]).abs().max().item() < 1e-10, k


def _opacus_dp_step(per_example, noise, *, sigma, clip_norm, expected_batch_size, monkeypatch):
    """Opacus DPOptimizer's p.grad for given per-example gradients and standard noise."""
    import opacus.optimizers.optimizer as opacus_optimizer
    from opacus.optimizers import DPOptimizer

    names = list(per_example)
    ps = [nn.Parameter(torch.zeros(per_example[k].shape[1:], dtype=torch.float64)) for k in names]
    noise_of = {id(p): noise[k] for p, k in zip(ps, names)}
    stds = []

    def same_noise(std, reference, generator=None, secure_mode=False):
        stds.append(std)
        # add_noise calls this with reference=p.summed_grad, param by param in order
        (p,) = [p for p in ps if p.summed_grad is reference]
        return std * noise_of[id(p)]

    monkeypatch.setattr(opacus_optimizer, "_generate_noise", same_noise)
    opt = DPOptimizer(
        torch.optim.SGD(ps, lr=0.0),
        noise_multiplier=sigma,
        max_grad_norm=clip_norm,
        expected_batch_size=expected_batch_size,
    )
    for p, k in zip(ps, names):
        p.grad_sample = per_example[k].clone()
    assert opt.pre_step()
    assert stds == [sigma * clip_norm] * len(ps)
    return {k: p.grad.detach().clone() for p, k in zip(ps, names)}


@pytest.mark.parametrize("clip_norm", [0.05, 1.0, 100.0])
def test_private_gradient_equals_opacus_dp_optimizer_step(clip_norm, monkeypatch):
    model, params, batch, loss_of_one = _setup()
    per_example = per_example_grads(loss_of_one, params, batch)
    noise = draw_standard_noise(params, generator=torch.Generator().manual_seed(7))
    sigma, expected = 1.3, 8.0  # Poisson batch: expected size differs from the realised 6
    ours = private_gradient(
        per_example,
        weights=torch.ones(6, dtype=torch.float64),
        clip_norm=clip_norm,
        noise_multiplier=sigma,
        standard_noise=noise,
        expected_batch_size=expected,
    )
    theirs = _opacus_dp_step(
        per_example, noise, sigma=sigma, clip_norm=clip_norm, expected_batch_size=expected,
        monkeypatch=monkeypatch,
    )
    for k in ours:
        assert torch.allclose(ours[k], theirs[k], rtol=1e-12, atol=1e-14), k


def test_padded_batch_equals_opacus_on_the_real_rows(monkeypatch):
    model, params, batch, loss_of_one = _setup(batch_size=6)
    per_example = per_example_grads(loss_of_one, params, batch)
    real = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool)
    # Padding rows may hold anything, NaN included: they must contribute nothing.
    poisoned = {k: torch.where(real.reshape(-1, *[1] * (g.dim() - 1)), g, torch.nan) for k, g in per_example.items()}
    noise = draw_standard_noise(params, generator=torch.Generator().manual_seed(3))
    ours = private_gradient(
        poisoned, weights=real.double(), clip_norm=0.5, noise_multiplier=0.8,
        standard_noise=noise, expected_batch_size=5.0,
    )
    theirs = _opacus_dp_step(
        {k: g[real] for k, g in per_example.items()}, noise, sigma=0.8, clip_norm=0.5,
        expected_batch_size=5.0, monkeypatch=monkeypatch,
    )
    for k in ours:
        assert torch.isfinite(ours[k]).all()
        assert torch.allclose(ours[k], theirs[k], rtol=1e-12, atol=1e-14), k


def test_clipped_norms_equal_opacus_per_sample_norms():
    model, params, batch, loss_of_one = _setup()
    per_example = per_example_grads(loss_of_one, params, batch)
    _, norms = clip_per_example(per_example, clip_norm=1.0)
    # Opacus: norm of the per-parameter norms.
    expected = torch.stack([g.reshape(6, -1).norm(2, dim=-1) for g in per_example.values()], dim=1).norm(2, dim=1)
    assert torch.equal(norms, expected)
