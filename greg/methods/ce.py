"""Plain cross-entropy on the ID batch (pretraining; the model is evaluated with post-hoc detectors)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from greg.methods._registry import METHODS
from greg.methods.base import Batch, Method


@METHODS.register("ce")
class CrossEntropy(Method):
    """``L = CE(f(x_id), y_id)``. Auxiliary data, if present in the batch, is ignored.

    ``detector = "msp"`` is only the default: the evaluation of a CE model runs every post-hoc detector
    (MSP, ODIN, Energy, ReAct, DICE, ...; docs/METHOD.md#post-hoc-detectors).
    """

    defaults: ClassVar[dict[str, Any]] = {"label_smoothing": 0.0}
    detector = "msp"

    def compute_loss(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        logits = model(batch["x_id"])
        ce = F.cross_entropy(logits, batch["y_id"], label_smoothing=float(self.hparams["label_smoothing"]))
        return {"total": ce, "ce": ce.detach()}
