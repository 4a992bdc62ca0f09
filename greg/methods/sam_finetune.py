"""SAM fine-tuning for OOD detection with pseudo-OOD data (the SAM appendix; docs/METHOD.md#sam-only-norm).

Fine-tunes a pretrained classifier on ID data plus pseudo-OOD images made from the same batch
(``greg.pseudo_ood``), with a sharpness-aware update (``greg.optim.sam``): ``sam_only_norm`` perturbs only
the normalization-layer parameters, ``sam`` all parameters. No auxiliary outlier dataset is used.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from greg import pseudo_ood, scores
from greg.methods._registry import METHODS
from greg.methods.base import Batch, Method
from greg.methods.energy import EnergyLoss, energy_loss
from greg.methods.oe import oe_loss
from greg.optim.sam import SAM, frozen_norm_stats, norm_parameters

OOD_LOSSES = ("energy", "oe")


@METHODS.register("sam")
class SAMFineTune(Method):
    """``L = CE(f(x_id), y) + lambda_ood * L_ood(f(x_pood))``, minimized with SAM (two passes per step).

    ``x_pood = T(x_id)`` with ``T = pseudo_ood.make(pseudo_ood, **pseudo_ood_kwargs)`` drawn from the
    method's own generator (seeded by ``seed``, checkpointed in :meth:`state_dict`); one forward of
    ``[x_id; x_pood]`` per pass, so batch norm sees both, as in the Energy/OE code. ``L_ood``:

    - ``energy`` (default, our choice: the appendix evaluates energy-based scores and gives no loss):
      the squared hinge of ``greg.methods.energy.energy_loss`` with margins ``m_in`` / ``m_out``
      (defaults those of :class:`~greg.methods.energy.EnergyLoss`, -25 / -7) and ``lambda_ood = 0.1``
      (Energy's ``lambda_S``),
    - ``oe``: cross-entropy of the pseudo-OOD softmax to uniform (``greg.methods.oe.oe_loss``).

    The update (:meth:`train_step`, called by the trainer instead of its own backward/step): gradient at
    ``w``; perturb the SAM subset by ``rho * g / ||g||``; gradient of the same loss on the same batch at the
    perturbed point with batch-norm running statistics frozen (saved/restored: they are updated once per
    step, by the first pass); restore ``w``; step all parameters with the trainer's optimizer. The SAM
    wrapper holds no state between steps, so checkpointing the trainer's optimizer suffices for resume.
    Logged terms are those of the first pass plus ``sam_total`` (loss at the perturbed point) and
    ``sam_grad_norm`` (``||g_P||``).
    """

    only_norm: ClassVar[bool] = False
    defaults: ClassVar[dict[str, Any]] = {
        "rho": 0.05,  # Foret et al. 2021, CIFAR + SGD
        "ood_loss": "energy",
        "lambda_ood": 0.1,
        "m_in": EnergyLoss.defaults["m_in"],
        "m_out": EnergyLoss.defaults["m_out"],
        "pseudo_ood": "patch_shuffle",
        "pseudo_ood_kwargs": {},
        "seed": 0,
    }
    needs_aux = False
    detector = "energy"

    def __init__(self, **hparams: Any):
        super().__init__(**hparams)
        self.transform = pseudo_ood.make(
            self.hparams["pseudo_ood"], **dict(self.hparams["pseudo_ood_kwargs"])
        )
        self._sam: SAM | None = None

    def validate(self) -> None:
        hp = self.hparams
        if not float(hp["rho"]) >= 0:
            raise ValueError(f"method {self.name!r}: rho must be >= 0, got {hp['rho']!r}")
        if hp["ood_loss"] not in OOD_LOSSES:
            raise ValueError(
                f"method {self.name!r}: ood_loss must be one of {OOD_LOSSES}, got {hp['ood_loss']!r}"
            )
        if not isinstance(hp["pseudo_ood_kwargs"], dict):
            raise ValueError(  # noqa: TRY004  (the Method contract: bad hparam values are ValueError)
                f"method {self.name!r}: pseudo_ood_kwargs must be a mapping, got {hp['pseudo_ood_kwargs']!r}"
            )
        try:
            pseudo_ood.make(hp["pseudo_ood"], **hp["pseudo_ood_kwargs"])
        except KeyError as e:
            raise ValueError(f"method {self.name!r}: pseudo_ood: {e.args[0]}") from None

    # -- loss -------------------------------------------------------------------------------------------

    def make_pseudo_ood(self, x_id: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.transform(x_id, self.generator)

    def loss_terms(
        self, model: nn.Module, x_id: torch.Tensor, y_id: torch.Tensor, x_ood: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The loss on ``[x_id; x_ood]`` (one forward); ``total`` differentiable, the rest detached."""
        hp = self.hparams
        n_id = len(x_id)
        logits = model(torch.cat([x_id, x_ood], dim=0))
        ce = F.cross_entropy(logits[:n_id], y_id)
        terms: dict[str, torch.Tensor] = {"ce": ce.detach()}
        if hp["ood_loss"] == "energy":
            s = scores.energy(logits)
            l_ood = energy_loss(s[:n_id], s[n_id:], float(hp["m_in"]), float(hp["m_out"]))
            terms["score_id"] = s[:n_id].detach().mean()
            terms["score_ood"] = s[n_id:].detach().mean()
        else:
            l_ood = oe_loss(logits[n_id:])
        terms[hp["ood_loss"]] = l_ood.detach()
        return {"total": ce + float(hp["lambda_ood"]) * l_ood, **terms}

    def compute_loss(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        """The loss at the current weights (one pass; the trainer uses :meth:`train_step` instead)."""
        x_id = batch["x_id"]
        return self.loss_terms(model, x_id, batch["y_id"], self.make_pseudo_ood(x_id))

    # -- SAM update -------------------------------------------------------------------------------------

    def sam_for(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> SAM:
        """The SAM wrapper around the trainer's optimizer (rebuilt if the optimizer changes; stateless)."""
        if self._sam is None or self._sam.base_optimizer is not optimizer:
            rho = float(self.hparams["rho"])
            if self.only_norm:
                if not norm_parameters(model):
                    raise ValueError(f"method {self.name!r}: the model has no normalization-layer parameters")
                self._sam = SAM.only_norm(model, optimizer, rho)
            else:
                self._sam = SAM(optimizer, rho)
        return self._sam

    def train_step(
        self, model: nn.Module, batch: Batch, optimizer: torch.optim.Optimizer
    ) -> dict[str, torch.Tensor]:
        sam = self.sam_for(model, optimizer)
        x_id, y_id = batch["x_id"], batch["y_id"]
        x_ood = self.make_pseudo_ood(x_id)  # one draw, used by both passes

        optimizer.zero_grad(set_to_none=True)
        terms = self.loss_terms(model, x_id, y_id, x_ood)
        total = terms.pop("total")
        if not torch.isfinite(total):
            return {"total": total.detach(), **terms}  # the trainer stops on it; weights untouched
        total.backward()
        grad_norm = sam.first_step(zero_grad=True)

        with frozen_norm_stats(model):
            perturbed = self.loss_terms(model, x_id, y_id, x_ood)["total"]
            if not torch.isfinite(perturbed):
                sam.restore()
                optimizer.zero_grad(set_to_none=True)
                return {"total": perturbed.detach(), **terms}  # stop with the weights of w, not w + e
            perturbed.backward()
        sam.second_step(zero_grad=True)
        return {"total": total.detach(), **terms, "sam_total": perturbed.detach(), "sam_grad_norm": grad_norm}

    # -- state ------------------------------------------------------------------------------------------


@METHODS.register("sam_only_norm")
class SAMOnlyNormFineTune(SAMFineTune):
    """:class:`SAMFineTune` perturbing only the normalization-layer parameters (``greg.optim.sam``).

    ``rho = 0.5`` by default (our choice; the appendix gives none): the perturbation's norm is spread over
    the few normalization parameters only, and SAM-ON (Mueller et al., NeurIPS 2023) reports that
    perturbing only the norm layers works best with a larger radius than full SAM's 0.05.
    """

    only_norm = True
    defaults: ClassVar[dict[str, Any]] = {**SAMFineTune.defaults, "rho": 0.5}
