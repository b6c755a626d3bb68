"""A tiny smooth model and random episodes in the engine's batch layout."""

import torch
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, dim=4, hidden=6, ways=3):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, ways)

    def forward(self, inputs, masks):
        x = inputs["x"] * masks["x"].unsqueeze(-1).to(inputs["x"].dtype)
        return self.fc2(torch.tanh(self.fc1(x)))


def make_params(model, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(v.shape, generator=g) * 0.5).to(dtype) for k, v in model.named_parameters()}


def make_batch(n, *, ways, dim, generator, dtype, lead=()):
    shape = (*lead, n)
    labels = torch.randint(0, ways, shape, generator=generator)
    x = torch.randn(*shape, dim, generator=generator).to(dtype) + labels.unsqueeze(-1).to(dtype)
    return {
        "inputs": {"x": x},
        "masks": {"x": torch.ones(shape, dtype=torch.bool)},
        "labels": labels,
        "weights": torch.ones(shape, dtype=dtype),
    }


def make_episodes(episodes, *, ways=3, dim=4, support=6, query=9, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "support": make_batch(support, ways=ways, dim=dim, generator=g, dtype=dtype, lead=(episodes,)),
        "query": make_batch(query, ways=ways, dim=dim, generator=g, dtype=dtype, lead=(episodes,)),
    }
