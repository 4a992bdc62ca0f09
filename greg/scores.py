"""Outlier scores as pure functions of the logits. Orientation everywhere: higher = more OOD."""

from __future__ import annotations

from collections.abc import Callable

import torch

from greg.registry import Registry

ScoreFn = Callable[[torch.Tensor], torch.Tensor]
SCORES: Registry[torch.Tensor] = Registry("score")


@SCORES.register("energy")
def energy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Energy score ``S(x) = -T * logsumexp(f(x) / T)`` (Liu et al. 2020)."""
    return -temperature * torch.logsumexp(logits / temperature, dim=1)


@SCORES.register("msp")
def msp(logits: torch.Tensor) -> torch.Tensor:
    """Negative maximum softmax probability ``-max_k softmax(f)_k`` (Hendrycks & Gimpel 2017)."""
    return -torch.softmax(logits, dim=1).amax(dim=1)


@SCORES.register("max_logit")
def max_logit(logits: torch.Tensor) -> torch.Tensor:
    """Negative maximum logit ``-max_k f_k`` (Hendrycks et al. 2022)."""
    return -logits.amax(dim=1)


@SCORES.register("absent_class")
def absent_class(logits: torch.Tensor) -> torch.Tensor:
    """Probability of the extra (K+1)-th class of DOS / OpenMix networks: ``softmax(f)_{K+1}``."""
    return torch.softmax(logits, dim=1)[:, -1]


def get(name: str) -> ScoreFn:
    return SCORES.get(name)
