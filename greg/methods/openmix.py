"""OpenMix (Zhu, Cheng, Zhang & Liu, "OpenMix: Exploring Outlier Samples for Misclassification Detection",
CVPR 2023).

Facts from the released code (github.com/Impression2805/OpenMix, ``train_cvpr.py``, method ``"OpenMix"``):

- the network has ``K + 1`` outputs; the extra one is the reject class;
- per step both batches are cut to the same length ``n = min(n_id, n_out)`` and mixed pairwise in pixel
  space, ``x_mix = lam * x_id[:n] + (1 - lam) * x_out[:n]`` with ONE ``lam ~ Beta(10, 10)`` per batch;
- one forward of ``[x_id; x_mix]``;
  ``loss = CE(f(x_id), y) + lambda_o * (lam * CE(f(x_mix), y[:n]) + (1 - lam) * CE(f(x_mix), K))``,
  ``lambda_o = 1``; the mixed term is the cross-entropy with the soft label
  ``lam * onehot(y) + (1 - lam) * onehot(K)`` (cross-entropy is linear in the target);
- CIFAR schedule: 200 epochs, SGD LR 0.1 (momentum 0.9, no Nesterov), weight decay 5e-4, LR x0.1 at epochs
  100 and 150, batch 128 ID + 128 outliers (300K Random Images).

Not implemented: the feature-space variant (``OpenMix_manifold``, the script's default ``--method``) and
OpenMix-CRL. ``lam`` is drawn by inverse-CDF sampling from the method's own CPU generator (checkpointed),
instead of NumPy's global RNG.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from scipy.special import betaincinv
from torch import nn

from greg.methods._registry import METHODS
from greg.methods.base import Batch, Method


def openmix_soft_targets(
    y: torch.Tensor, lam: float, num_outputs: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``lam * onehot(y) + (1 - lam) * onehot(K)`` with ``K = num_outputs - 1`` (the reject class)."""
    t = lam * F.one_hot(y, num_outputs).to(dtype)
    t[:, num_outputs - 1] += 1.0 - lam
    return t


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Batch mean of ``-sum_k t_k log softmax(f)_k``."""
    return -(targets.to(logits.dtype) * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def sample_beta(alpha: float, generator: torch.Generator) -> float:
    """``lam ~ Beta(alpha, alpha)`` by the inverse CDF of one uniform drawn from ``generator``."""
    u = float(torch.rand((), generator=generator, dtype=torch.float64))
    return float(betaincinv(alpha, alpha, u))


@METHODS.register("openmix")
class OpenMix(Method):
    """``L = CE(x_id, y) + lambda_o * CE_soft(x_mix, lam * onehot(y) + (1 - lam) * onehot(K))`` with
    ``x_mix = lam * x_id + (1 - lam) * x_aux`` (pairwise, first ``min(n_id, n_aux)`` rows), ``lam ~
    Beta(alpha, alpha)``; ``alpha = 10``, ``lambda_o = 1`` (official). (K+1)-class network, evaluated with
    the absent-class probability. ``seed``: the CPU generator of ``lam`` (state in :meth:`state_dict`)."""

    defaults: ClassVar[dict[str, Any]] = {"alpha": 10.0, "lambda_o": 1.0, "seed": 0}
    needs_aux = True
    extra_classes = 1
    detector = "absent_class"

    def __init__(self, **hparams: Any):
        super().__init__(**hparams)
        self.last_lam: float | None = None

    def validate(self) -> None:
        if float(self.hparams["alpha"]) <= 0:
            raise ValueError(f"method {self.name!r}: alpha must be > 0, got {self.hparams['alpha']!r}")
        if float(self.hparams["lambda_o"]) < 0:
            raise ValueError(f"method {self.name!r}: lambda_o must be >= 0, got {self.hparams['lambda_o']!r}")

    def loss_from_logits(
        self, logits_id: torch.Tensor, y_id: torch.Tensor, logits_mix: torch.Tensor, lam: float
    ) -> dict[str, torch.Tensor]:
        ce = F.cross_entropy(logits_id, y_id)
        targets = openmix_soft_targets(y_id[: len(logits_mix)], lam, logits_mix.shape[1], logits_mix.dtype)
        mix = soft_cross_entropy(logits_mix, targets)
        total = ce + float(self.hparams["lambda_o"]) * mix
        return {"total": total, "ce": ce.detach(), "openmix": mix.detach(), "lam": torch.tensor(lam)}

    def compute_loss(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        x_id, y_id = batch["x_id"], batch["y_id"]
        x_aux = self._require_aux(batch)
        n = min(len(x_id), len(x_aux))
        lam = sample_beta(float(self.hparams["alpha"]), self.generator)
        self.last_lam = lam
        x_mix = lam * x_id[:n] + (1.0 - lam) * x_aux[:n]
        logits = model(torch.cat([x_id, x_mix]))
        return self.loss_from_logits(logits[: len(x_id)], y_id, logits[len(x_id) :], lam)
