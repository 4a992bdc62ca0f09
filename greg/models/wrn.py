"""Wide ResNet (Zagoruyko and Komodakis, BMVC 2016) as in the Outlier-Exposure / Energy-OOD codebases
(``models/wrn.py`` of hendrycks/outlier-exposure, reused by wetliu/energy_ood): pre-activation blocks,
1x1 shortcut convs where the width changes, final BN + ReLU, average pool, linear.

``wrn40_2``: depth 40, widen factor 2, dropout 0 -> channels (16, 32, 64, 128), 128-d features.
Submodule names follow that code (``conv1``, ``block1.layer.0.bn1``, ``convShortcut``, ``bn1``) except the
classifier, ``head`` (there: ``fc``), so its checkpoints load through the ``fc.`` -> ``head.`` map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from greg.models._registry import MODELS
from greg.models.base import FeatureModel, init_like_original


class WRNBasicBlock(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = (
            None
            if self.equal_in_out
            else nn.Conv2d(in_planes, out_planes, 1, stride=stride, padding=0, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # As the original: when the width changes, the shortcut also sees the pre-activated input.
        o = self.relu1(self.bn1(x))
        shortcut = x if self.equal_in_out else self.convShortcut(o)
        out = self.relu2(self.bn2(self.conv1(o)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return shortcut + self.conv2(out)


class NetworkBlock(nn.Module):
    def __init__(self, nb_layers: int, in_planes: int, out_planes: int, stride: int, drop_rate: float):
        super().__init__()
        self.layer = nn.Sequential(
            *[
                WRNBasicBlock(
                    in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, drop_rate
                )
                for i in range(nb_layers)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(FeatureModel):
    def __init__(
        self,
        num_classes: int = 10,
        depth: int = 40,
        widen_factor: int = 2,
        drop_rate: float = 0.0,
        in_channels: int = 3,
    ):
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        ch = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, ch[0], 3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, ch[0], ch[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, ch[1], ch[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, ch[2], ch[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Linear(ch[3], num_classes)
        init_like_original(self)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.relu(self.bn1(out))


@MODELS.register("wrn40_2")
def wrn40_2(num_classes: int = 10, depth: int = 40, widen_factor: int = 2, drop_rate: float = 0.0, **kw):
    return WideResNet(num_classes, depth=depth, widen_factor=widen_factor, drop_rate=drop_rate, **kw)
