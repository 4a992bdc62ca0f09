"""GReg (Sharifi et al., "Gradient-Regularized Out-of-Distribution Detection", ECCV 2024, arXiv 2404.12368)."""

from __future__ import annotations

from typing import Any, ClassVar

from greg.methods._registry import METHODS
from greg.methods.energy import EnergyLoss


@METHODS.register("greg")
class GReg(EnergyLoss):
    """``L = CE(ID) + lambda_S * L_S + lambda_grad * L_grad``, ``lambda_S = 0.1``, ``lambda_grad = 1``,
    ``m_in = -25``, ``m_out = -7`` (docs/METHOD.md#energy-loss).

    ``L_S`` is the energy loss (``greg.methods.energy.energy_loss``); ``L_grad`` is the gradient regularizer
    of the energy score (``greg.methods.grad_reg``), by default with the official code's scaling
    (``grad_reduction = "official"``: mean over all N rows of ``||dJ/dx_i||``, from the same single train-mode
    forward of ``[x_id; x_aux]`` that gives the CE and energy terms). This is "Energy + Grad" with the
    paper's defaults, hence a subclass that only changes ``lambda_grad``.
    """

    defaults: ClassVar[dict[str, Any]] = {**EnergyLoss.defaults, "lambda_grad": 1.0}
