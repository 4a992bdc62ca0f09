"""A small, fast CNN for tests and the CI smoke run (not from any paper)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from greg.models._registry import MODELS
from greg.models.base import FeatureModel


class SmallCNN(FeatureModel):
    """``len(widths)`` conv3x3-BN-ReLU blocks (stride 1, then stride 2), global average pool, linear.

    With the default widths (16, 32, 32) a 32x32 input gives an 8x8 feature map and 32-d features.
    BatchNorm is kept on purpose: GReg's train-mode batch coupling and SAM-only-norm need norm layers.
    """

    def __init__(self, num_classes: int = 10, widths: Sequence[int] = (16, 32, 32), in_channels: int = 3):
        super().__init__()
        if not widths:
            raise ValueError("small_cnn needs at least one width")
        layers: list[nn.Module] = []
        c_in = in_channels
        for i, c in enumerate(widths):
            layers += [
                nn.Conv2d(c_in, c, 3, stride=1 if i == 0 else 2, padding=1, bias=False),
                nn.BatchNorm2d(c),
                nn.ReLU(inplace=True),
            ]
            c_in = c
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, num_classes)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@MODELS.register("small_cnn")
def small_cnn(num_classes: int = 10, **kwargs) -> SmallCNN:
    return SmallCNN(num_classes, **kwargs)
