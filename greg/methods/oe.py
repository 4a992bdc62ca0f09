"""Outlier Exposure (Hendrycks, Mazeika & Dietterich, "Deep Anomaly Detection with Outlier Exposure", ICLR 2019)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from greg.methods import grad_reg
from greg.methods._registry import METHODS
from greg.methods.base import Batch, Method


def oe_loss(logits_aux: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the aux softmax to the uniform distribution, batch mean:
    ``-(1/K) sum_k log softmax(f)_k = logsumexp(f) - mean_k f_k`` (official code:
    ``-(x.mean(1) - torch.logsumexp(x, dim=1)).mean()``). Equals ``KL(uniform || p) + log K``."""
    return -(logits_aux.mean(1) - torch.logsumexp(logits_aux, dim=1)).mean()


@METHODS.register("oe")
class OutlierExposure(Method):
    """``L = CE(ID) + lambda_oe * oe_loss(aux) [+ lambda_grad * L_grad]``, ``lambda_oe = 0.5``.

    One forward of ``[x_id; x_aux]`` as in the official code (batch norm sees both). "OE + Grad" (GReg paper,
    Table 4): ``lambda_grad > 0`` adds the gradient regularizer (``greg.methods.grad_reg``) of OE's own score,
    MSP (``grad_score = "msp"``), with margins ``grad_m_in = -0.9``, ``grad_m_out = -0.5`` by default (not
    given by the paper; see ``grad_reg.DEFAULT_MARGINS``).
    """

    defaults: ClassVar[dict[str, Any]] = {"lambda_oe": 0.5, **grad_reg.grad_defaults("msp")}
    hparam_types: ClassVar[dict[str, tuple[type | None, ...]]] = grad_reg.GRAD_TYPES
    needs_aux = True
    detector = "msp"

    def validate(self) -> None:
        if self.hparams["lambda_oe"] < 0:
            raise ValueError(f"method {self.name!r}: lambda_oe must be >= 0, got {self.hparams['lambda_oe']!r}")
        grad_reg.validate_grad_hparams(self.name, self.hparams)

    def compute_loss(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        x_id, y_id = batch["x_id"], batch["y_id"]
        x_aux = self._require_aux(batch)
        n_id = len(x_id)
        use_grad = float(self.hparams["lambda_grad"]) != 0.0
        x, logits = grad_reg.forward_concat(model, x_id, x_aux, input_grad=use_grad, hp=self.hparams)
        ce = F.cross_entropy(logits[:n_id], y_id)
        oe = oe_loss(logits[n_id:])
        terms = {"ce": ce.detach(), "oe": oe.detach()}
        total = ce + float(self.hparams["lambda_oe"]) * oe
        total = total + grad_reg.add_grad_terms(terms, x, logits, n_id, self.hparams)
        return {"total": total, **terms}
