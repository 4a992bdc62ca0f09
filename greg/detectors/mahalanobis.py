"""Mahalanobis distance to class-conditional Gaussians with a tied covariance."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from greg.detectors.base import DETECTORS, FeatureDetector, sign_perturb


@DETECTORS.register("mahalanobis")
class Mahalanobis(FeatureDetector):
    """``S(x) = min_c 1/2 (h - mu_c)^T P (h - mu_c)`` on penultimate features ``h = model.features(x)``.

    ``mu_c`` = class means and ``P`` = pseudo-inverse of the tied (MLE, divide by N) covariance of the
    class-centred ID training features (sklearn ``EmpiricalCovariance`` + ``pinvh`` in the original code).
    The original's score is ``max_c -1/2 d_c``; negated here (higher = more OOD).
    Optional input pre-processing (off by default, ``eps = 0``): ``x' = x - eps * sign(grad_x S(x)) / std``
    (moves towards the closest class), then ``S(x')``; only that option needs input gradients. Only the
    last layer is used (no feature ensemble / logistic-regression weighting).

    Source: Lee et al., "A Simple Unified Framework for Detecting Out-of-Distribution Samples and
    Adversarial Attacks", NeurIPS 2018 (code: pokaxpoka/deep_Mahalanobis_detector).
    """

    context_kwargs = ("std", "max_fit_samples")

    def __init__(
        self,
        eps: float = 0.0,
        std: Sequence[float] | float | None = None,
        max_fit_samples: int | None = None,
    ):
        self.eps = float(eps)
        self.std = None if std is None else [float(s) for s in (std if isinstance(std, Sequence) else [std])]
        self.max_fit_samples = max_fit_samples
        self.means: torch.Tensor | None = None  # K x D
        self.precision: torch.Tensor | None = None  # D x D

    @property
    def requires_grad(self) -> bool:  # type: ignore[override]
        return self.eps != 0.0

    def hparams(self) -> dict[str, Any]:
        return {"eps": self.eps, "std": self.std}

    def fit_features(self, model: nn.Module, h: torch.Tensor, y: torch.Tensor) -> Mahalanobis:
        h = h.double()
        k = int(model.head.out_features)
        if y.min() < 0 or y.max() >= k:
            raise ValueError(
                f"mahalanobis: ID labels must lie in [0, {k}), got [{int(y.min())}, {int(y.max())}]"
            )
        counts = torch.bincount(y, minlength=k)
        present = counts > 0
        means = torch.zeros(k, h.shape[1], dtype=torch.float64).index_add_(0, y, h)
        means /= counts.clamp(min=1)[:, None].double()
        centred = h - means[y]
        cov = centred.T @ centred / h.shape[0]
        self.precision = torch.linalg.pinv(cov, hermitian=True)
        self.means = means[present]  # classes without samples have no Gaussian
        return self

    def _distance(self, h: torch.Tensor) -> torch.Tensor:
        """``1/2 (h - mu_c)^T P (h - mu_c)`` for every class, B x K, in chunks of classes."""
        means = self.means.to(h.device, h.dtype)
        prec = self.precision.to(h.device, h.dtype)
        chunk = max(1, (1 << 24) // max(1, h.shape[0] * h.shape[1]))
        out = []
        for start in range(0, means.shape[0], chunk):
            diff = h[:, None, :] - means[None, start : start + chunk]  # B x k x D
            out.append(0.5 * torch.einsum("bkd,de,bke->bk", diff, prec, diff))
        return torch.cat(out, dim=1)

    def score(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        self._check_fitted("means", "precision")
        if self.eps != 0.0:
            x = x.detach()
            with torch.enable_grad():
                xg = x.clone().requires_grad_(True)
                s = self._distance(model.features(xg)).amin(dim=1)
                (grad,) = torch.autograd.grad(s.sum(), xg)
            x = sign_perturb(x, grad, self.eps, self.std)
            with torch.no_grad():
                return self._distance(model.features(x)).amin(dim=1)
        return self._distance(model.features(x)).amin(dim=1)

    def score_features(self, model: nn.Module, h: torch.Tensor) -> torch.Tensor:
        """Without input pre-processing only (``eps = 0``): the perturbation needs the image."""
        self._check_fitted("means", "precision")
        if self.eps != 0.0:
            raise ValueError("mahalanobis: eps != 0 perturbs the input image; score it with score(model, x)")
        return self._distance(h).amin(dim=1)
