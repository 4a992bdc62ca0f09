"""DICE: directed sparsification of the last layer."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from greg import scores
from greg.detectors.base import DETECTORS, FeatureDetector, percentile


@DETECTORS.register("dice")
class DICE(FeatureDetector):
    """Energy of a sparsified last layer: ``S(x) = -logsumexp((M * W) h(x) + b)``.

    Contributions ``V = W * mean_ID(h)[None, :]`` (K x D) on the ID training set; the mask ``M`` keeps
    the entries above the ``p``-th percentile of all of ``V`` (strict ``>``, p = 90: the top 10 %).
    ``p = 0`` keeps every weight (plain energy; the strict ``>`` at the minimum would drop one entry).

    Released settings (deeplearning-wisc/dice@8acfb8d): ``p = 90`` on CIFAR-10 / CIFAR-100
    (``demo-cifar.sh:6,13``), ``p = 70`` on ImageNet (``demo-imagenet.sh:9``); the default is 90, the
    workflow passes each dataset's (config ``detector_kwargs``, docs/BASELINES.md).

    Source: Sun & Li, "DICE: Leveraging Sparsification for Out-of-Distribution Detection", ECCV 2022
    (code: deeplearning-wisc/dice, ``RouteDICE``).
    """

    def __init__(self, p: float = 90.0, max_fit_samples: int | None = None):
        if not 0.0 <= p < 100.0:
            raise ValueError(f"dice: p must be in [0, 100), got {p}")
        self.p = float(p)
        self.max_fit_samples = max_fit_samples
        self.mask: torch.Tensor | None = None
        self.mean_feature: torch.Tensor | None = None

    def hparams(self) -> dict[str, Any]:
        return {"p": self.p}

    def fit_features(self, model: nn.Module, h: torch.Tensor, y: torch.Tensor) -> DICE:
        self.mean_feature = h.double().mean(0)
        w = model.head.weight.detach().double().cpu()
        contrib = self.mean_feature[None, :] * w
        if self.p <= 0.0:
            self.mask = torch.ones_like(contrib, dtype=torch.bool)
        else:
            self.mask = contrib > float(percentile(contrib, self.p))
        return self

    def score_features(self, model: nn.Module, h: torch.Tensor) -> torch.Tensor:
        self._check_fitted("mask")
        head = model.head
        w = head.weight * self.mask.to(device=head.weight.device, dtype=head.weight.dtype)
        return scores.energy(F.linear(h, w, head.bias))
