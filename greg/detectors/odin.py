"""ODIN: temperature scaling plus input pre-processing."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from greg import scores
from greg.detectors.base import DETECTORS, Detector, sign_perturb


@DETECTORS.register("odin")
class ODIN(Detector):
    """ODIN score ``-max_k softmax(f(x') / T)_k`` with ``x' = x - eps * sign(grad_x CE(f(x)/T, yhat)) / std``.

    ``yhat`` is the predicted class; the step lowers the cross-entropy, i.e. raises the (temperature
    scaled) max softmax, which helps ID inputs more than OOD ones. The step is taken in pixel units, so
    on the normalized input it is divided by the per-channel normalization ``std`` (pass the ID
    dataset's std; ``None`` = no division). Defaults ``T = 1000``, ``eps = 0.0014`` as in the GReg
    tables (docs/METHOD.md#post-hoc-detectors). ``T = 1, eps = 0`` is MSP.

    Source: Liang et al., "Enhancing the Reliability of Out-of-distribution Image Detection in Neural
    Networks", ICLR 2018 (code: facebookresearch/odin; energy_ood ``get_ood_scores_odin``).
    """

    requires_grad = True
    context_kwargs = ("std",)

    def __init__(
        self, temperature: float = 1000.0, eps: float = 0.0014, std: Sequence[float] | float | None = None
    ):
        if not temperature > 0:
            raise ValueError(f"odin detector: temperature must be > 0, got {temperature!r}")
        if not eps >= 0:
            raise ValueError(f"odin detector: eps must be >= 0, got {eps!r}")
        self.temperature = float(temperature)
        self.eps = float(eps)
        self.std = None if std is None else [float(s) for s in (std if isinstance(std, Sequence) else [std])]

    def hparams(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "eps": self.eps, "std": self.std}

    def score(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        x = x.detach()
        if self.eps != 0.0:
            with torch.enable_grad():
                xg = x.clone().requires_grad_(True)
                logits = model(xg) / self.temperature
                loss = F.cross_entropy(logits, logits.argmax(dim=1), reduction="sum")
                (grad,) = torch.autograd.grad(loss, xg)
            x = sign_perturb(x, grad, self.eps, self.std)
        with torch.no_grad():
            return scores.msp(model(x) / self.temperature)
