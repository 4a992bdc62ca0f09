"""The detector interface (pytorch-ood style) and helpers shared by the detectors.

A detector turns a trained classifier into an outlier score, **higher = more OOD**:

- ``fit(model, id_loader, device)`` computes statistics on ID training data (a loader of ``(x, y)``);
  a no-op for detectors that need none (``needs_fit = False``);
- ``score(model, x) -> Tensor[B]`` scores a batch already on the model's device. It is plain
  differentiable torch code, so callers choose the autograd context: ``greg evaluate`` runs detectors
  with ``requires_grad = False`` under ``torch.inference_mode()``; detectors with
  ``requires_grad = True`` (input perturbation: ODIN, Mahalanobis with ``eps > 0``) take input gradients
  themselves and must not be called under inference mode.

Models follow the contract of docs/ARCHITECTURE.md: ``features(x)``, ``head``, ``feature_map(x)``,
``pool(fmap)``. Logit formulas come from :mod:`greg.scores`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from greg.device import eval_mode
from greg.registry import Registry


class Detector:
    """Base class. Subclasses set ``needs_fit`` / ``requires_grad`` and implement ``score``."""

    needs_fit: ClassVar[bool] = False
    requires_grad: bool = False

    def fit(self, model: nn.Module, id_loader: Iterable, device: torch.device | str) -> Detector:
        return self

    def score(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hparams().items())
        return f"{type(self).__name__}({args})"

    def hparams(self) -> dict[str, Any]:
        """Constructor arguments, for meta.json."""
        return {}

    def _check_fitted(self, *attrs: str) -> None:
        missing = [a for a in attrs if getattr(self, a, None) is None]
        if missing:
            raise RuntimeError(
                f"{type(self).__name__}.score called before fit(): missing {', '.join(missing)}; "
                "call fit(model, id_train_loader, device) first"
            )


DETECTORS: Registry[Detector] = Registry("detector")


def collect_features(
    model: nn.Module,
    loader: Iterable,
    device: torch.device | str,
    *,
    max_samples: int | None = None,
    desc: str = "ID features",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Penultimate features ``model.features(x)`` (float32, CPU) and labels (int64, CPU) of a loader."""
    feats: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    n = 0
    with eval_mode(model), torch.inference_mode():
        for batch in tqdm(loader, desc=desc, leave=False, disable=None):
            x, y = batch[0], batch[1]
            h = model.features(x.to(device, non_blocking=True))
            feats.append(h.float().cpu())
            labels.append(torch.as_tensor(y).long().reshape(-1).cpu())
            n += h.shape[0]
            if max_samples is not None and n >= max_samples:
                break
    if not feats:
        raise ValueError("the ID loader given to fit() yielded no batches")
    h = torch.cat(feats)
    y = torch.cat(labels)
    if max_samples is not None:
        h, y = h[:max_samples], y[:max_samples]
    return h, y


def std_tensor(std: Sequence[float] | float | None, like: torch.Tensor) -> torch.Tensor:
    """Per-channel normalization std shaped ``1 x C x 1 x 1`` (1 where not given)."""
    if std is None:
        return torch.ones((), dtype=like.dtype, device=like.device)
    t = torch.as_tensor(std, dtype=like.dtype, device=like.device).reshape(-1)
    if t.numel() == 1:
        return t.reshape(())
    if like.dim() != 4 or t.numel() != like.shape[1]:
        raise ValueError(f"std has {t.numel()} entries but the input has shape {tuple(like.shape)}")
    return t.view(1, -1, 1, 1)


def sign_perturb(x: torch.Tensor, grad: torch.Tensor, eps: float, std: Any) -> torch.Tensor:
    """``x - eps * sign(grad) / std`` with the sign convention of the ODIN / Mahalanobis code
    (``torch.ge(grad, 0)`` mapped to +-1, so a zero gradient counts as +1)."""
    sign = grad.ge(0).to(x.dtype) * 2 - 1
    return (x - eps * sign / std_tensor(std, x)).detach()


def percentile(a: torch.Tensor | np.ndarray, q: float, axis: int | None = None) -> np.ndarray:
    """``np.percentile`` (linear interpolation) in float64; torch.quantile caps the input size."""
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().double().numpy()
    return np.percentile(np.asarray(a, dtype=np.float64), q, axis=axis)


def to_device(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.to(device=like.device, dtype=like.dtype if t.is_floating_point() else t.dtype)
