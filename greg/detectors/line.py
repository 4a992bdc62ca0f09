"""LINe: leveraging important neurons (Shapley-value approximated), activation clipping + weight pruning."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from greg import scores
from greg.detectors.base import DETECTORS, FeatureDetector, percentile


@DETECTORS.register("line")
class LINe(FeatureDetector):
    """Energy of class-conditionally masked features and weights.

    Fit (ID training set, ground-truth labels): the Shapley value of penultimate neuron ``j`` for class
    ``c`` is approximated to first order (Taylor: activation x gradient of the class logit, which for
    the linear head is ``W[c, j]``) and averaged over the class: ``phi[c, j] = W[c, j] * mean_{y=c} h_j``.
    Per class ``c``:
    - activation mask ``A[c] = phi[c] > percentile_j(phi[c], p_a)`` (keeps the top (100 - p_a) % neurons),
    - weight mask ``M[c] = |phi[c]|[None, :] * W > percentile(|phi[c]|[None, :] * W, p_w)`` (K x D;
      W signed, as in the released code).
    Score: ``h = min(h(x), clip)``; ``c* = argmax(W h + b)``; logits ``(M[c*] * W)(A[c*] * h) + b``;
    ``S = -logsumexp(logits)``. ``p = 0`` keeps everything (no strict ``>`` at the minimum).

    Settings of the released code (``demo-cifar.sh:3,7``, ``demo-imagenet.sh:4`` at 465ddf5): CIFAR-10
    ``p_w = 90, p_a = 90``, CIFAR-100 ``p_w = 90, p_a = 10``, both with ``clip_threshold = 1.0`` (an
    absolute clip of the pooled DenseNet-101 features, applied before the head); ImageNet (ResNet-50)
    ``p_w = 10, p_a = 10, clip_threshold = 0.8``. The defaults are CIFAR-10's; the workflow passes each
    (dataset, arch)'s setting (config ``detector_kwargs``, docs/BASELINES.md). ``clip_percentile`` fits a
    ReAct-style clip on the ID features instead (``clip_threshold`` then ignored);
    ``clip_threshold=None, clip_percentile=None`` disables clipping.

    Source: Ahn, Park & Kim, "LINe: Out-of-Distribution Detection by Leveraging Important Neurons",
    CVPR 2023 (code: YongHyun-Ahn/LINe-Out-of-Distribution-Detection-by-Leveraging-Important-Neurons,
    ``RouteLUNCH``, ``_compute_taylor_scores``).
    """

    def __init__(
        self,
        p_w: float = 90.0,
        p_a: float = 90.0,
        clip_threshold: float | None = 1.0,
        clip_percentile: float | None = None,
        max_fit_samples: int | None = None,
    ):
        for name, v in (("p_w", p_w), ("p_a", p_a)):
            if not 0.0 <= v < 100.0:
                raise ValueError(f"line: {name} must be in [0, 100), got {v}")
        self.p_w, self.p_a = float(p_w), float(p_a)
        self.clip_threshold = None if clip_threshold is None else float(clip_threshold)
        self.clip_percentile = None if clip_percentile is None else float(clip_percentile)
        self.max_fit_samples = max_fit_samples
        self.shap: torch.Tensor | None = None  # K x D
        self.act_mask: torch.Tensor | None = None  # K x D bool
        self.weight_thresh: torch.Tensor | None = None  # K, threshold of |phi[c]| * W per class

    def hparams(self) -> dict[str, Any]:
        return {
            "p_w": self.p_w,
            "p_a": self.p_a,
            "clip_threshold": self.clip_threshold,
            "clip_percentile": self.clip_percentile,
        }

    def fit_features(self, model: nn.Module, h: torch.Tensor, y: torch.Tensor) -> LINe:
        w = model.head.weight.detach().double().cpu()
        k = w.shape[0]
        if y.min() < 0 or y.max() >= k:
            raise ValueError(f"line: ID labels must lie in [0, {k}), got [{int(y.min())}, {int(y.max())}]")
        counts = torch.bincount(y, minlength=k).double()
        if (counts == 0).any():
            warnings.warn(f"line: {int((counts == 0).sum())} classes have no ID fit samples", stacklevel=2)
        class_mean = torch.zeros(k, h.shape[1], dtype=torch.float64).index_add_(0, y, h.double())
        class_mean /= counts.clamp(min=1)[:, None]
        self.shap = w * class_mean
        if self.clip_percentile is not None:
            self.clip_threshold = float(percentile(h.reshape(-1), self.clip_percentile))
        shap_np, w_np = self.shap.numpy(), w.numpy()
        act_mask = np.ones(shap_np.shape, dtype=bool)
        thresh = np.full(k, -np.inf)
        for c in range(k):
            if self.p_a > 0:
                act_mask[c] = shap_np[c] > np.percentile(shap_np[c], self.p_a)
            if self.p_w > 0:
                thresh[c] = np.percentile(np.abs(shap_np[c])[None, :] * w_np, self.p_w)
        self.act_mask = torch.from_numpy(act_mask)
        self.weight_thresh = torch.from_numpy(thresh)
        return self

    def score_features(self, model: nn.Module, h: torch.Tensor) -> torch.Tensor:
        self._check_fitted("shap", "act_mask", "weight_thresh")
        head = model.head
        if self.clip_threshold is not None:
            h = h.clamp(max=self.clip_threshold)
        pred = head(h).argmax(dim=1)
        dev, dt = h.device, h.dtype
        h = h * self.act_mask.to(dev)[pred].to(dt)
        logits = torch.empty(h.shape[0], head.out_features, device=dev, dtype=dt)
        # Compare in float64 as at fit time (MPS has no float64), so entries at the threshold agree.
        mdt = torch.float32 if dev.type == "mps" else torch.float64
        shap_abs = self.shap.abs().to(dev, mdt)
        thresh = self.weight_thresh.to(dev, mdt)
        w_m = head.weight.detach().to(mdt)
        for c in pred.unique().tolist():
            idx = (pred == c).nonzero(as_tuple=True)[0]
            # Masks are recomputed per predicted class: storing K x K x D masks is too big for ImageNet.
            w_mask = (shap_abs[c][None, :] * w_m > thresh[c]).to(dt)
            logits[idx] = F.linear(h[idx], head.weight * w_mask, head.bias)
        return scores.energy(logits)
