"""Tiny models with the model-zoo interface (``features`` / ``head``), shared by the method and sampler tests."""

from __future__ import annotations

import torch
from torch import nn


class TinyNet(nn.Module):
    """conv + BN + activation + global pool + linear (BN in train mode couples the rows, as in GReg)."""

    def __init__(self, c_in: int = 3, width: int = 4, k: int = 3, act: nn.Module | None = None):
        super().__init__()
        self.conv = nn.Conv2d(c_in, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.act = act if act is not None else nn.ReLU()
        self.head = nn.Linear(width, k)

    def features(self, x):
        return self.act(self.bn(self.conv(x))).mean(dim=(2, 3))

    def forward(self, x):
        return self.head(self.features(x))


class IdentityNet(nn.Module):
    """``model(x) = x``: the inputs are the logits (and the features), so every value can be computed by hand."""

    def __init__(self):
        super().__init__()
        self.head = nn.Identity()

    def features(self, x):
        return x

    def forward(self, x):
        return x


class FeatNet(nn.Module):
    """``features(x) = x`` through a Dropout (wrong numbers if a sampler forgot eval mode); fixed linear head."""

    def __init__(self, head_weight: torch.Tensor):
        super().__init__()
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(head_weight.shape[1], head_weight.shape[0], bias=False)
        with torch.no_grad():
            self.head.weight.copy_(head_weight)

    def features(self, x):
        return self.drop(x)

    def forward(self, x):
        return self.head(self.features(x))
