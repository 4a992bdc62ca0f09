"""The interface every model of the zoo implements (see docs/ARCHITECTURE.md, "Models").

``forward(x) == head(features(x))`` and ``features(x) == pool(feature_map(x))`` hold by construction:
subclasses only define ``feature_map`` (last block output, including any final BN + ReLU) and ``head``.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn


class FeatureModel(nn.Module):
    """Base class: ``feature_map -> pool -> features -> head -> logits``."""

    head: nn.Linear
    # Prefix renames applied (after stripping DataParallel's ``module.``) by ``load_pretrained`` to map
    # external checkpoints onto this module's names; first matching prefix wins.
    pretrained_key_map: ClassVar[tuple[tuple[str, str], ...]] = (("fc.", "head."), ("linear.", "head."))

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def pool(self, fmap: torch.Tensor) -> torch.Tensor:
        # Adaptive pooling equals the originals' fixed avg_pool2d(8) on 32x32 inputs, and works at any size.
        return torch.flatten(F.adaptive_avg_pool2d(fmap, 1), 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.feature_map(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    @property
    def feature_dim(self) -> int:
        return self.head.in_features

    def map_pretrained_key(self, key: str) -> str:
        """Name of an external checkpoint's key in this module (``module.`` already stripped)."""
        for old, new in self.pretrained_key_map:
            if key.startswith(old):
                return new + key[len(old) :]
        return key


def init_like_original(model: nn.Module) -> None:
    """The initialization of the original WRN (hendrycks/outlier-exposure ``models/wrn.py``) and DenseNet3
    (the ODIN / Energy-OOD ``densenet.py``), module by module in ``model.modules()`` order: conv weights
    N(0, sqrt(2 / fan_out)), BatchNorm weight 1 and bias 0, linear bias 0 (its weight keeps PyTorch's default)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            m.weight.data.normal_(0, math.sqrt(2.0 / fan_out))
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.data.fill_(1)
            m.bias.data.zero_()
        elif isinstance(m, nn.Linear):
            m.bias.data.zero_()
