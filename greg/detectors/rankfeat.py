"""RankFeat: remove the dominant singular component of the last feature map."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from greg import scores
from greg.detectors.base import DETECTORS, Detector


def remove_rank1(fmap: torch.Tensor, method: str = "svd", iterations: int = 20) -> torch.Tensor:
    """``X - s1 u1 v1^T`` per sample, with ``X`` = the ``C x HW`` matrix of a ``B x C x H x W`` map.

    ``method="svd"``: exact (``torch.linalg.svd``, computed in float32 at least). ``method="power"``:
    ``iterations`` steps of power iteration started from the all-ones vector (the original code starts
    from a random vector; a fixed start keeps scores reproducible).
    """
    b, c, hh, ww = fmap.shape
    m = fmap.reshape(b, c, hh * ww)
    work = m if m.dtype in (torch.float32, torch.float64) else m.float()
    if method == "svd":
        u, s, vh = torch.linalg.svd(work, full_matrices=False)
        rank1 = s[:, 0, None, None] * u[:, :, :1] @ vh[:, :1, :]
    elif method == "power":
        v = torch.ones(b, hh * ww, 1, dtype=work.dtype, device=work.device)
        v = v / torch.linalg.vector_norm(v, dim=1, keepdim=True)
        for _ in range(iterations):
            u = work @ v
            u = u / torch.linalg.vector_norm(u, dim=1, keepdim=True).clamp_min(1e-12)
            v = work.transpose(1, 2) @ u
            v = v / torch.linalg.vector_norm(v, dim=1, keepdim=True).clamp_min(1e-12)
        sigma = u.transpose(1, 2) @ work @ v  # B x 1 x 1
        rank1 = sigma * u @ v.transpose(1, 2)
    else:
        raise ValueError(f"rankfeat: method must be 'svd' or 'power', got {method!r}")
    return (work - rank1).to(fmap.dtype).reshape(b, c, hh, ww)


@DETECTORS.register("rankfeat")
class RankFeat(Detector):
    """Energy after removing the rank-1 component of the last feature map:
    ``S(x) = -logsumexp(head(pool(X - s1 u1 v1^T)))``, ``X = model.feature_map(x)`` reshaped ``C x HW``.

    Only the last block is used (the paper also averages with a Block-3 variant on ImageNet ResNets).

    Source: Song, Sebe & Wang, "RankFeat: Rank-1 Feature Removal for Out-of-distribution Detection",
    NeurIPS 2022 (code: KingJamesSong/RankFeat).
    """

    def __init__(self, method: str = "svd", iterations: int = 20, temperature: float = 1.0):
        if method not in ("svd", "power"):
            raise ValueError(f"rankfeat: method must be 'svd' or 'power', got {method!r}")
        self.method = method
        self.iterations = int(iterations)
        self.temperature = float(temperature)

    def hparams(self) -> dict[str, Any]:
        return {"method": self.method, "iterations": self.iterations, "temperature": self.temperature}

    def score(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        fmap = remove_rank1(model.feature_map(x), self.method, self.iterations)
        return scores.energy(model.head(model.pool(fmap)), self.temperature)
