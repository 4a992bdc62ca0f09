"""DenseNet-121 (Huang et al., CVPR 2017) from torchvision, for the ImageNet experiments.

Built with ``weights=None`` (never downloads); ImageNet weights go through ``load_pretrained`` from a file.
torchvision's ``features`` Sequential is held as ``body`` (``features`` is the interface's method) and its
``classifier`` as ``head``; ``map_pretrained_key`` also accepts torchvision's legacy ``norm.1`` key style.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from greg.models._registry import MODELS
from greg.models.base import FeatureModel

# torchvision.models.densenet._load_state_dict: "denselayer1.norm.1.weight" -> "denselayer1.norm1.weight"
_LEGACY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
    r"((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)


class DenseNet121(FeatureModel):
    pretrained_key_map = (("features.", "body."), ("classifier.", "head."), ("fc.", "head."))

    def __init__(self, num_classes: int = 1000, **tv_kwargs):
        super().__init__()
        import torchvision.models  # on use: ~2.5 s to import (greg.models.resnet._basic_block)

        tv = torchvision.models.densenet121(weights=None, num_classes=num_classes, **tv_kwargs)
        self.body = tv.features
        self.head = tv.classifier

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        # torchvision's forward applies the final ReLU outside ``features``; it belongs to the feature map.
        return F.relu(self.body(x))

    def map_pretrained_key(self, key: str) -> str:
        m = _LEGACY.match(key)
        if m:
            key = m.group(1) + m.group(2)
        return super().map_pretrained_key(key)


@MODELS.register("densenet121")
def densenet121(num_classes: int = 1000, **kwargs) -> DenseNet121:
    return DenseNet121(num_classes, **kwargs)
