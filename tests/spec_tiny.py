"""A tiny CNN and data for the analysis, report and command-line tests; `build` is a SPEC for the
`pyquant` command (`pyquant analyze spec_tiny:build`, run from tests/)."""
from __future__ import annotations

import torch
from torch import nn


class TinyNet(nn.Module):
    """Conv-BN-ReLU, a residual block, pooling and a classifier: every kind of quantizer placement."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                   nn.Conv2d(8, 8, 1))
        self.head = nn.Sequential(nn.Conv2d(8, 16, 1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.block(x)
        x = self.pool(self.head(x)).flatten(1)
        return self.fc(x)


def tiny_model(seed: int = 0) -> TinyNet:
    g = torch.Generator().manual_seed(seed)
    m = TinyNet()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.4)
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.copy_(torch.randn(mod.num_features, generator=g) * 0.1)
                mod.running_var.copy_(torch.rand(mod.num_features, generator=g) * 2 + 0.1)
        # one outlier channel, so that per-channel ranges differ and CLE has work to do
        m.stem[0].weight[3] *= 8.0
    return m.eval()


def tiny_data(n: int = 24, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 12, 12, generator=g)


def build():
    data = tiny_data()
    return {"model": tiny_model(), "dummy_input": data[:1], "data": data}


def build_tuple():
    data = tiny_data()
    return tiny_model(), data[:1], [data[i:i + 8] for i in range(0, len(data), 8)]


def build_with_metric():
    spec = build()
    ref = spec["model"](spec["data"]).argmax(1)

    def agreement(model):
        with torch.no_grad():
            return float((model(spec["data"]).argmax(1) == ref).float().mean())

    spec["metric"] = agreement
    return spec


def build_broken():
    return {"model": tiny_model()}


class _Exploding(nn.Module):
    def forward(self, x):
        raise RuntimeError("this model fails on purpose")


def build_failing():
    data = tiny_data()
    return {"model": _Exploding(), "dummy_input": data[:1], "data": data}
