"""ReAct: rectified activations."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from greg import scores
from greg.detectors.base import DETECTORS, FeatureDetector, percentile


@DETECTORS.register("react")
class ReAct(FeatureDetector):
    """Energy of the logits of clipped penultimate features:
    ``S(x) = -logsumexp(W min(h(x), c) + b)``, ``c`` = ``percentile``-th percentile (p = 90) of all
    entries of the ID training features (flattened, linear interpolation as ``np.percentile``).
    ``percentile=100`` clips at the ID maximum (energy on the ID training data). A fixed ``threshold``
    overrides the fitted one.

    Source: Sun et al., "ReAct: Out-of-distribution Detection With Rectified Activations", NeurIPS 2021
    (code: deeplearning-wisc/react, ``np.percentile(activation_log.flatten(), 90)``).
    """

    def __init__(
        self, percentile: float = 90.0, threshold: float | None = None, max_fit_samples: int | None = None
    ):
        if not 0.0 <= percentile <= 100.0:
            raise ValueError(f"react: percentile must be in [0, 100], got {percentile}")
        self.percentile = float(percentile)
        self.threshold = None if threshold is None else float(threshold)
        self.max_fit_samples = max_fit_samples

    def hparams(self) -> dict[str, Any]:
        return {"percentile": self.percentile, "threshold": self.threshold}

    def fit_features(self, model: nn.Module, h: torch.Tensor, y: torch.Tensor) -> ReAct:
        self.threshold = float(percentile(h.reshape(-1), self.percentile))
        return self

    def score_features(self, model: nn.Module, h: torch.Tensor) -> torch.Tensor:
        self._check_fitted("threshold")
        return scores.energy(model.head(h.clamp(max=self.threshold)))
