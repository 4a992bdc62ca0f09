"""ResNet-18 (He et al., CVPR 2016) with a CIFAR or an ImageNet stem.

Blocks are torchvision's ``BasicBlock`` and the submodule names are torchvision's (``conv1``, ``bn1``,
``layer1``..``layer4``) except the classifier, ``head`` (torchvision: ``fc``), so torchvision and
kuangliu-style CIFAR checkpoints load through the ``fc.``/``linear.`` -> ``head.`` map.

- ``stem="cifar"`` (default): 3x3 stride-1 conv, no max-pool; a 32x32 input gives a 4x4x512 feature map.
- ``stem="imagenet"``: torchvision's 7x7 stride-2 conv + 3x3 stride-2 max-pool, which the released GReg
  code ran on 32x32 CIFAR images (feature map 1x1x512 there), see docs/METHOD.md#architectures.
"""

from __future__ import annotations

import torch
from torch import nn

from greg.models._registry import MODELS
from greg.models.base import FeatureModel

STEMS = ("cifar", "imagenet")


def _basic_block() -> type[nn.Module]:
    # imported on use: `import torchvision` costs ~2.5 s (it pulls in torch._dynamo), paid by every CLI
    # process (and every Snakemake job) that never builds a ResNet
    from torchvision.models.resnet import BasicBlock

    return BasicBlock


class ResNet(FeatureModel):
    def __init__(
        self,
        num_classes: int = 10,
        layers: tuple[int, int, int, int] = (2, 2, 2, 2),
        stem: str = "cifar",
        in_channels: int = 3,
    ):
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"unknown ResNet stem {stem!r}; expected one of {STEMS}")
        self.stem = stem
        if stem == "cifar":
            self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.inplanes = 64
        self.layer1 = self._make_layer(64, layers[0], stride=1)
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.layer4 = self._make_layer(512, layers[3], stride=2)
        self.head = nn.Linear(512 * _basic_block().expansion, num_classes)
        # torchvision's initialization (the Linear keeps PyTorch's default, as in torchvision)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        BasicBlock = _basic_block()
        downsample = None
        if stride != 1 or self.inplanes != planes * BasicBlock.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * BasicBlock.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * BasicBlock.expansion),
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * BasicBlock.expansion
        layers += [BasicBlock(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


@MODELS.register("resnet18")
def resnet18(num_classes: int = 10, stem: str = "cifar", **kwargs) -> ResNet:
    return ResNet(num_classes, layers=(2, 2, 2, 2), stem=stem, **kwargs)
