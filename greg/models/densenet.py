"""DenseNet-BC for 32x32 images (Huang et al., CVPR 2017), the ``DenseNet3`` of the ODIN / Energy-OOD
code that the GReg code reuses (there called "densenet101").

``densenet100``: depth 100, growth 12, reduction 0.5, bottleneck, dropout 0. Three dense blocks of 16
bottleneck layers (BN-ReLU-conv1x1(4k)-BN-ReLU-conv3x3(k)); channels 24 -> 216 -> 108 -> 300 -> 150 -> 342;
final BN + ReLU, average pool, linear: 342-d features, 769,162 parameters with 10 classes.

Submodule names are exactly the original's (``conv1``, ``block1.layer.0.bn1``, ``trans1.conv1``, ``bn1``)
except the classifier, ``head``, so the released checkpoints need only: strip ``module.``, and
``fc.`` / ``linear.`` -> ``head.`` (``FeatureModel.pretrained_key_map``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from greg.models._registry import MODELS
from greg.models.base import FeatureModel, init_like_original


class BottleneckBlock(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, drop_rate: float = 0.0):
        super().__init__()
        inter_planes = out_planes * 4
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, inter_planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(inter_planes)
        self.conv2 = nn.Conv2d(inter_planes, out_planes, 3, padding=1, bias=False)
        self.drop_rate = drop_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.relu(self.bn1(x)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(self.relu(self.bn2(out)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return torch.cat([x, out], 1)


class BasicDenseBlock(nn.Module):
    """The non-bottleneck layer (``bottleneck=False``): BN-ReLU-conv3x3(k)."""

    def __init__(self, in_planes: int, out_planes: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, padding=1, bias=False)
        self.drop_rate = drop_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.relu(self.bn1(x)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return torch.cat([x, out], 1)


class TransitionBlock(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 1, bias=False)
        self.drop_rate = drop_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.relu(self.bn1(x)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return F.avg_pool2d(out, 2)


class DenseBlock(nn.Module):
    def __init__(self, nb_layers: int, in_planes: int, growth_rate: int, block: type, drop_rate: float):
        super().__init__()
        self.layer = nn.Sequential(
            *[block(in_planes + i * growth_rate, growth_rate, drop_rate) for i in range(nb_layers)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class DenseNetBC(FeatureModel):
    def __init__(
        self,
        num_classes: int = 10,
        depth: int = 100,
        growth_rate: int = 12,
        reduction: float = 0.5,
        bottleneck: bool = True,
        drop_rate: float = 0.0,
        in_channels: int = 3,
    ):
        super().__init__()
        if (depth - 4) % 3 != 0:
            raise ValueError(f"DenseNet depth must be 3n+4, got {depth}")
        n = (depth - 4) // 3
        block: type = BottleneckBlock
        if bottleneck:
            if n % 2 != 0:
                raise ValueError(f"DenseNet-BC depth must be 6n+4, got {depth}")
            n //= 2
        else:
            block = BasicDenseBlock
        c = 2 * growth_rate
        self.conv1 = nn.Conv2d(in_channels, c, 3, stride=1, padding=1, bias=False)
        self.block1 = DenseBlock(n, c, growth_rate, block, drop_rate)
        c += n * growth_rate
        self.trans1 = TransitionBlock(c, math.floor(c * reduction), drop_rate)
        c = math.floor(c * reduction)
        self.block2 = DenseBlock(n, c, growth_rate, block, drop_rate)
        c += n * growth_rate
        self.trans2 = TransitionBlock(c, math.floor(c * reduction), drop_rate)
        c = math.floor(c * reduction)
        self.block3 = DenseBlock(n, c, growth_rate, block, drop_rate)
        c += n * growth_rate
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Linear(c, num_classes)
        init_like_original(self)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        out = self.trans1(self.block1(self.conv1(x)))
        out = self.trans2(self.block2(out))
        return self.relu(self.bn1(self.block3(out)))


@MODELS.register("densenet100")
def densenet100(num_classes: int = 10, **kwargs) -> DenseNetBC:
    kwargs = {
        "depth": 100,
        "growth_rate": 12,
        "reduction": 0.5,
        "bottleneck": True,
        "drop_rate": 0.0,
    } | kwargs
    return DenseNetBC(num_classes, **kwargs)
