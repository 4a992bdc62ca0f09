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
    """Base class. Subclasses implement ``score`` and declare what they need as class attributes:

    - ``needs_fit``: :meth:`fit` must see ID training data before scoring;
    - ``requires_grad``: :meth:`score` takes input gradients (never call it under ``torch.inference_mode``);
    - ``extra_outputs``: outputs the detector reads beyond the K ID logits (1: the (K+1)-th "absent" class
      of DOS / OpenMix networks); ``greg evaluate`` refuses a model without them;
    - ``context_kwargs``: constructor arguments the evaluation fills when not given: ``"std"`` (the ID
      set's per-channel normalization std, for input-perturbation steps in pixel units) and
      ``"max_fit_samples"`` (``greg evaluate --fit-max-samples``).
    """

    needs_fit: ClassVar[bool] = False
    requires_grad: bool = False
    extra_outputs: ClassVar[int] = 0
    context_kwargs: ClassVar[tuple[str, ...]] = ()

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


class FeatureDetector(Detector):
    """A detector fitted on the penultimate features of ID training data (pytorch-ood's ``fit_features`` /
    ``predict_features``): :meth:`fit` collects ``model.features`` of at most ``max_fit_samples`` images
    and hands them to :meth:`fit_features`; :meth:`score` scores ``model.features(x)`` with
    :meth:`score_features`. Features collected once can fit several detectors (``greg evaluate`` with
    several detectors does)."""

    needs_fit: ClassVar[bool] = True
    context_kwargs: ClassVar[tuple[str, ...]] = ("max_fit_samples",)
    max_fit_samples: int | None = None

    def fit(self, model: nn.Module, id_loader: Iterable, device: torch.device | str) -> FeatureDetector:
        h, y = collect_features(model, id_loader, device, max_samples=self.max_fit_samples)
        return self.fit_features(model, h, y)

    def fit_features(self, model: nn.Module, h: torch.Tensor, y: torch.Tensor) -> FeatureDetector:
        """Fit on ID features ``h`` (float32, CPU, N x D) with labels ``y``; ``model`` gives the head."""
        raise NotImplementedError

    def score(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.score_features(model, model.features(x))

    def score_features(self, model: nn.Module, h: torch.Tensor) -> torch.Tensor:
        """Scores of penultimate features ``h`` (B x D, on the model's device)."""
        raise NotImplementedError


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
