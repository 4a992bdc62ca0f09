"""Detectors that are a fixed function of the logits (formulas in :mod:`greg.scores`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from greg import scores
from greg.detectors.base import DETECTORS, Detector


@DETECTORS.register("msp")
class MSP(Detector):
    """Maximum softmax probability, ``-max_k softmax(f(x))_k``.

    Source: Hendrycks & Gimpel, "A Baseline for Detecting Misclassified and Out-of-Distribution
    Examples in Neural Networks", ICLR 2017.
    """

    def score(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return scores.msp(model(x))


@DETECTORS.register("max_logit")
class MaxLogit(Detector):
    """Maximum logit, ``-max_k f_k(x)``.

    Source: Hendrycks et al., "Scaling Out-of-Distribution Detection for Real-World Settings", ICML 2022.
    """

    def score(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return scores.max_logit(model(x))


@DETECTORS.register("energy")
class Energy(Detector):
    """Energy score ``S(x) = -T logsumexp(f(x) / T)``, ``T = 1``.

    Source: Liu et al., "Energy-based Out-of-distribution Detection", NeurIPS 2020.
    """

    def __init__(self, temperature: float = 1.0):
        if not temperature > 0:
            raise ValueError(f"energy detector: temperature must be > 0, got {temperature!r}")
        self.temperature = float(temperature)

    def hparams(self) -> dict[str, Any]:
        return {"temperature": self.temperature}

    def score(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return scores.energy(model(x), self.temperature)


@DETECTORS.register("absent_class")
class AbsentClass(Detector):
    """Probability of the extra (K+1)-th "absent"/reject class, ``softmax(f(x))_{K+1}``, for networks
    trained with one (DOS: Jiang et al., ICLR 2024; OpenMix: Zhu et al., CVPR 2023)."""

    extra_outputs = 1

    def score(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return scores.absent_class(model(x))


@DETECTORS.register("msp_known")
class MSPKnown(Detector):
    """MSP over the K known-class logits of a (K+1)-class network, the extra reject logit dropped before the
    softmax: ``-max_k softmax(f(x)_{1..K})_k``. OpenMix's released evaluation (Impression2805/OpenMix
    utils/metrics.py:186, ``output[:, :classnumber]``; Zhu et al., CVPR 2023)."""

    extra_outputs = 1  # on a K-class model it would drop a real class

    def score(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return scores.msp(model(x)[:, :-1])
