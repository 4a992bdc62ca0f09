"""Robustness of OOD scores (beyond the paper): certified radius of paper Eq. 4 and detection under attack.

Everything works on a differentiable *score function* ``score_fn(x) -> Tensor[B]`` (higher = more OOD) of
the **normalized** input, e.g. ``detector_score_fn(greg.detectors.create("energy"), model)``. Radii and
attack budgets are therefore in normalized-input units, and no pixel box constraint is enforced unless
``clamp`` bounds are given.

Certified radius (Eq. 4, docs/METHOD.md#gradient-regularizer): with ``gamma`` the threshold that accepts 95 % of ID test
samples (ID iff ``S <= gamma``) and the local Lipschitz constant replaced by the gradient norm (exact
inside a linear region of a ReLU network, a first-order estimate otherwise), an ID sample is certified up to
``r(x) = min(eps, (gamma - S(x)) / ||grad_x S(x)||_*)`` (``r = 0`` if ``S(x) > gamma``), where ``||.||_*``
is the dual of the perturbation norm: L2 for L2 balls, L1 for L-inf balls.

Attack: k-step PGD inside an ``eps`` ball around each input (L-inf: signed-gradient steps of size
``alpha``; L2: normalized-gradient steps of length ``alpha``), projected after each step. OOD inputs are
pushed to lower scores (to look ID), ID inputs to higher scores (to look OOD); then the usual metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from greg.metrics import METRIC_COLUMNS, id_threshold, metrics_table

ScoreFn = Callable[[torch.Tensor], torch.Tensor]
NORMS = ("l2", "linf")


def _check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def detector_score_fn(detector: Any, model: nn.Module) -> ScoreFn:
    """``x -> detector.score(model, x)``; the detector must be differentiable (no input pre-processing)."""
    if getattr(detector, "requires_grad", False):
        raise ValueError(
            f"{type(detector).__name__} perturbs its input with gradient signs and is not differentiable; "
            "robustness needs a differentiable score (e.g. energy, msp, react)"
        )
    return lambda x: detector.score(model, x)


def _flat_norm(t: torch.Tensor, ord: float) -> torch.Tensor:
    return torch.linalg.vector_norm(t.flatten(1), ord=ord, dim=1)


def score_and_grad(score_fn: ScoreFn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores ``S(x)`` (detached) and per-sample input gradients ``grad_x S(x)`` (rows are independent
    as long as the model has no batch coupling, i.e. is in eval mode)."""
    with torch.enable_grad():
        xg = x.detach().clone().requires_grad_(True)
        s = score_fn(xg)
        (g,) = torch.autograd.grad(s.sum(), xg)
    return s.detach(), g.detach()


def certified_radius(
    score_fn: ScoreFn, x: torch.Tensor, gamma: float, eps: float, norm: str = "l2"
) -> torch.Tensor:
    """Eq. 4 per sample: ``min(eps, (gamma - S) / ||grad S||_*)``, 0 where ``S > gamma``; ``eps`` where the
    gradient vanishes and ``S <= gamma``."""
    _check_norm(norm)
    s, g = score_and_grad(score_fn, x)
    dual = _flat_norm(g, 2.0 if norm == "l2" else 1.0)
    margin = gamma - s
    radius = torch.where(
        dual > 0, margin / dual.clamp_min(torch.finfo(dual.dtype).tiny), torch.full_like(s, eps)
    )
    radius = radius.clamp(max=eps)
    return torch.where(margin >= 0, radius, torch.zeros_like(radius))


def _batches(loader: Iterable, device: torch.device | str, desc: str) -> Iterable[torch.Tensor]:
    for batch in tqdm(loader, desc=desc, leave=False, disable=None):
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        yield x.to(device, non_blocking=True)


def certified_radii(
    score_fn: ScoreFn,
    loader: Iterable,
    gamma: float,
    eps: float,
    device: torch.device | str,
    norm: str = "l2",
) -> np.ndarray:
    """:func:`certified_radius` over a loader of ``(x, y)`` (or ``x``) batches, as a float64 array."""
    out = [certified_radius(score_fn, x, gamma, eps, norm).cpu() for x in _batches(loader, device, "radius")]
    return torch.cat(out).double().numpy()


def summarize_radii(radii: np.ndarray, eps: float) -> dict[str, float]:
    """Median radius and the fraction of samples certified at ``eps`` (radius reaches the cap)."""
    radii = np.asarray(radii, dtype=np.float64)
    if radii.size == 0:
        raise ValueError("no radii to summarize")
    return {
        "median_radius": float(np.median(radii)),
        "mean_radius": float(np.mean(radii)),
        "certified_frac": float(np.mean(radii >= eps)),
        "eps": float(eps),
        "n": int(radii.size),
    }


def _project(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    if norm == "linf":
        return delta.clamp(-eps, eps)
    n = _flat_norm(delta, 2.0).clamp_min(1e-12)
    factor = (eps / n).clamp(max=1.0)
    return delta * factor.view(-1, *([1] * (delta.dim() - 1)))


def pgd_attack(
    score_fn: ScoreFn,
    x: torch.Tensor,
    *,
    direction: int,
    eps: float,
    alpha: float,
    steps: int,
    norm: str = "linf",
    random_start: bool = False,
    generator: torch.Generator | None = None,
    clamp: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Inputs within ``eps`` of ``x`` that move the score in ``direction`` (+1: up / more OOD, -1: down).

    ``random_start`` draws the initial offset uniformly from the L-inf box (or a random L2 direction at a
    uniform radius) with ``generator`` (CPU generator; the noise is moved to ``x``'s device).
    """
    _check_norm(norm)
    if direction not in (1, -1):
        raise ValueError(f"direction must be +1 or -1, got {direction}")
    if eps < 0 or alpha < 0 or steps < 0:
        raise ValueError(f"eps, alpha and steps must be >= 0, got {eps}, {alpha}, {steps}")
    x0 = x.detach()
    delta = torch.zeros_like(x0)
    if random_start and eps > 0:
        noise = torch.rand(x0.shape, generator=generator, dtype=torch.float32).to(x0)
        if norm == "linf":
            delta = (2 * noise - 1) * eps
        else:
            dirs = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0)
            r = torch.rand(x0.shape[0], generator=generator, dtype=torch.float32).to(x0) * eps
            dirs = dirs / _flat_norm(dirs, 2.0).clamp_min(1e-12).view(-1, *([1] * (x0.dim() - 1)))
            delta = dirs * r.view(-1, *([1] * (x0.dim() - 1)))
    for _ in range(steps):
        xa = x0 + delta
        if clamp is not None:
            xa = xa.clamp(*clamp)
        _, g = score_and_grad(score_fn, xa)
        if norm == "linf":
            step = g.sign()
        else:
            step = g / _flat_norm(g, 2.0).clamp_min(1e-12).view(-1, *([1] * (g.dim() - 1)))
        delta = _project(delta + direction * alpha * step, eps, norm)
    xa = x0 + delta
    return xa.clamp(*clamp) if clamp is not None else xa


def attacked_scores(
    score_fn: ScoreFn,
    loader: Iterable,
    device: torch.device | str,
    *,
    direction: int,
    desc: str = "attack",
    **attack: Any,
) -> np.ndarray:
    """Scores of PGD-attacked inputs (see :func:`pgd_attack` for ``attack`` keywords), float64."""
    out = []
    for x in _batches(loader, device, desc):
        xa = pgd_attack(score_fn, x, direction=direction, **attack)
        with torch.no_grad():
            out.append(score_fn(xa).detach().float().cpu())
    return torch.cat(out).double().numpy()


def attack_metrics(
    score_fn: ScoreFn,
    id_loader: Iterable,
    ood_loaders: Mapping[str, Iterable],
    device: torch.device | str,
    *,
    eps: float,
    alpha: float,
    steps: int,
    norm: str = "linf",
    scale: float = 1.0,
) -> tuple[dict[str, np.ndarray], pd.DataFrame]:
    """Detection metrics (times ``scale``: fractions by default) when ID is attacked up and every OOD set down. Returns the attacked
    scores (``"id"`` and each OOD name) and one row per OOD set plus ``mean``."""
    kw = {"eps": eps, "alpha": alpha, "steps": steps, "norm": norm}
    scores = {"id": attacked_scores(score_fn, id_loader, device, direction=1, desc="attack id", **kw)}
    for name, loader in ood_loaders.items():
        scores[name] = attacked_scores(score_fn, loader, device, direction=-1, desc=f"attack {name}", **kw)
    ood = {k: v for k, v in scores.items() if k != "id"}
    df = metrics_table(scores["id"], ood, scale=scale)[["ood_set", *METRIC_COLUMNS]]
    for k, v in kw.items():
        df[k] = v
    return scores, df


def certify(
    score_fn: ScoreFn,
    id_loader: Iterable,
    device: torch.device | str,
    *,
    eps: float,
    norm: str = "l2",
    scores_id: np.ndarray | None = None,
    tpr: float = 0.95,
) -> tuple[np.ndarray, dict[str, float]]:
    """Per-sample certified radii of the ID set and their summary; ``gamma`` comes from ``scores_id``
    (clean ID scores; computed with ``score_fn`` when not given)."""
    if scores_id is None:
        with torch.no_grad():
            scores_id = torch.cat([score_fn(x).float().cpu() for x in _batches(id_loader, device, "scores")])
        scores_id = scores_id.double().numpy()
    gamma = id_threshold(scores_id, tpr)
    radii = certified_radii(score_fn, id_loader, gamma, eps, device, norm)
    return radii, {**summarize_radii(radii, eps), "gamma": gamma, "tpr": tpr, "norm": norm}
