"""Energy-bounded fine-tuning (Liu, Wang, Owens & Li, "Energy-based Out-of-distribution Detection", NeurIPS 2020)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from greg import scores
from greg.methods import grad_reg, margins
from greg.methods._registry import METHODS
from greg.methods.base import Batch, Method


def energy_loss(s_id: torch.Tensor, s_aux: torch.Tensor, m_in: float, m_out: float) -> torch.Tensor:
    """``L_S = mean_ID relu(S - m_in)^2 + mean_aux relu(m_out - S)^2`` (squared hinge on the energy)."""
    loss_id = torch.relu(s_id - m_in).pow(2)
    loss_aux = torch.relu(m_out - s_aux).pow(2)
    return (loss_id.mean() if loss_id.numel() else loss_id.sum()) + (
        loss_aux.mean() if loss_aux.numel() else loss_aux.sum()
    )


@METHODS.register("energy")
class EnergyLoss(Method):
    """``L = CE(ID) + lambda_S * L_S [+ lambda_grad * L_grad]`` with ``S = -logsumexp(f)``.

    One forward of ``[x_id; x_aux]`` (official code). Defaults ``lambda_S = 0.1``, ``m_in = -25``,
    ``m_out = -7`` (GReg's margins); the Energy baseline's own runs use -23/-5 (CIFAR-10) and -27/-5
    (CIFAR-100): set them in the run config. "Energy + Grad" (GReg paper, Table 4) is ``lambda_grad > 0``;
    the regularized score is the energy and its margins default to ``m_in`` / ``m_out``.
    ``margins: auto`` (beyond the paper) replaces ``m_in`` / ``m_out`` by quantiles of the starting model's
    energies (``greg.methods.margins``), fitted in :meth:`setup` before step 0 and kept in :meth:`state_dict`.
    """

    defaults: ClassVar[dict[str, Any]] = {
        "lambda_S": 0.1,
        "m_in": -25.0,
        "m_out": -7.0,
        "margins": "fixed",  # fixed: m_in / m_out as given; auto: fitted (greg.methods.margins)
        "margin_quantiles": list(margins.DEFAULT_QUANTILES),  # [q_in, q_out] of margins: auto
        **grad_reg.grad_defaults("energy"),
    }
    hparam_types: ClassVar[dict[str, tuple[type | None, ...]]] = grad_reg.GRAD_TYPES
    fitted_margins: dict[str, float] | None = None  # set by greg.methods.margins.apply
    needs_aux = True
    detector = "energy"

    def validate(self) -> None:
        grad_reg.validate_grad_hparams(self.name, self.hparams)
        margins.validate_hparams(self.name, self.hparams)

    def setup(
        self,
        model: nn.Module,
        id_data: Any,
        aux_data: Any,
        device: torch.device | str,
        seed: int,
        *,
        from_scratch: bool = False,
    ) -> str | None:
        """``margins: auto``: ``m_in`` / ``m_out`` from the starting model's energies on ``id_data`` and
        ``aux_data`` (:func:`greg.methods.margins.fit_margins`); nothing to do for fixed margins."""
        if self.hparams["margins"] != "auto":
            return None
        if from_scratch:
            raise ValueError("method.hparams.margins: auto fits the margins to the starting model: set "
                             "init.checkpoint (a run from scratch has no model to fit them to)")
        fitted = margins.fit_margins(model, id_data, aux_data, quantiles=tuple(self.hparams["margin_quantiles"]),
                                     seed=seed, device=device)
        margins.apply(self, fitted)
        return (f"margins: auto: m_in = {fitted['m_in']:.4g}, m_out = {fitted['m_out']:.4g} (quantiles "
                f"{fitted['q_in']:g} / {fitted['q_out']:g} of {fitted['n_id']} ID / {fitted['n_aux']} auxiliary "
                "energies)")

    def setup_record(self) -> dict[str, Any] | None:
        return None if self.fitted_margins is None else dict(self.fitted_margins)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.hparams["margins"] == "auto":  # fitted before step 0 from the starting model: never refit
            state["margins"] = self.setup_record()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if self.hparams["margins"] == "auto":
            if not isinstance(state["margins"], dict):
                raise ValueError(f"method {self.name!r}: the state records no fitted margins (margins: auto)")
            margins.apply(self, state["margins"])

    def _grad_fallback_margins(self) -> tuple[float, float] | None:
        if self.hparams["grad_score"] == "energy":
            return float(self.hparams["m_in"]), float(self.hparams["m_out"])
        return None

    def energy_terms(
        self, model: nn.Module, x_id: torch.Tensor, y_id: torch.Tensor, x_aux: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The whole loss on the rows ``[x_id; x_aux]`` (shared by GReg and GReg+)."""
        hp = self.hparams
        if hp["margins"] == "auto" and self.fitted_margins is None:
            raise RuntimeError(
                f"method {self.name!r}: margins: auto, but no margins were fitted (greg train fits them before "
                "step 0; elsewhere call greg.methods.margins.fit_margins and apply)"
            )
        n_id = len(x_id)
        use_grad = float(hp["lambda_grad"]) != 0.0
        x, logits = grad_reg.forward_concat(model, x_id, x_aux, input_grad=use_grad, hp=hp)
        ce = F.cross_entropy(logits[:n_id], y_id)
        s = scores.energy(logits)
        l_s = energy_loss(s[:n_id], s[n_id:], float(hp["m_in"]), float(hp["m_out"]))
        terms = {
            "ce": ce.detach(),
            "energy": l_s.detach(),
            "score_id": s[:n_id].detach().mean(),
            "score_aux": s[n_id:].detach().mean(),
        }
        total = ce + float(hp["lambda_S"]) * l_s
        total = total + grad_reg.add_grad_terms(terms, x, logits, n_id, hp, self._grad_fallback_margins())
        return {"total": total, **terms}

    def compute_loss(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        return self.energy_terms(model, batch["x_id"], batch["y_id"], self._require_aux(batch))
