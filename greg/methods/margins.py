"""``margins: auto`` (beyond the paper): energy margins ``m_in`` / ``m_out`` fitted to the starting model.

The paper's margins (``m_in = -25``, ``m_out = -7``; Energy loss: -23 / -5 on CIFAR-10, -27 / -5 on CIFAR-100)
are absolute energies tuned for CIFAR-size networks. A model whose energies live on another scale (a small
CNN on ``tiny``: ID energies around -5) turns them into a squared hinge that is active on every sample with
a huge value, and the energy term swamps cross-entropy. The automatic rule reads the scale off the model
that fine-tuning starts from (docs/METHOD.md, "Automatic margins")::

    m_in  = Q_ID(q_in)     # q_in  = 0.05: 95 % of ID training images start above m_in (hinge active)
    m_out = Q_aux(q_out)   # q_out = 0.95: 95 % of auxiliary images start below m_out (hinge active)

with ``Q`` the empirical quantile (linear interpolation, ``numpy.quantile``'s default) of the eval-mode energy
``S = -logsumexp(f(x))`` over the ID training images and the auxiliary images (eval transform, no
augmentation; at most ``max_samples`` of each, a seeded subsample). Each margin is a level that a few samples
already reach, so it is attainable; nearly every sample starts on the active side of its hinge, as with the
paper's margins on CIFAR; and the rule is invariant to a shift of all energies (margins move with them).

The rule needs ``m_in < m_out``; a starting model that gives auxiliary data lower energies than ID data (the
95th auxiliary percentile below the 5th ID one) has no such pair and is refused with a clear error.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from greg import scores

MODES = ("fixed", "auto")
DEFAULT_QUANTILES = (0.05, 0.95)  # (q_in, q_out): assumption, see the module docstring


def validate_hparams(method_name: str, hp: dict[str, Any]) -> None:
    """Check ``margins`` and ``margin_quantiles`` (``ValueError`` naming the key)."""
    if hp["margins"] not in MODES:
        raise ValueError(f"method {method_name!r}: margins must be one of {MODES}, got {hp['margins']!r}")
    q = hp["margin_quantiles"]
    if (
        not isinstance(q, (list, tuple))
        or len(q) != 2
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v <= 1.0 for v in q)
    ):
        raise ValueError(
            f"method {method_name!r}: margin_quantiles must be [q_in, q_out] with values in [0, 1], got {q!r}"
        )


def auto_margins(
    energy_id: Any, energy_aux: Any, quantiles: tuple[float, float] = DEFAULT_QUANTILES
) -> tuple[float, float]:
    """``(m_in, m_out) = (Q_ID(q_in), Q_aux(q_out))`` of two 1-d arrays of energies; ``ValueError`` if
    either is empty or non-finite, or if the result is not ``m_in < m_out``."""
    q_in, q_out = (float(q) for q in quantiles)
    arrays = []
    for name, e in (("ID", energy_id), ("auxiliary", energy_aux)):
        a = np.asarray(e.detach().cpu() if torch.is_tensor(e) else e, dtype=np.float64).ravel()
        if a.size == 0:
            raise ValueError(f"margins: auto: no {name} energies to fit the margins on")
        if not np.isfinite(a).all():
            raise ValueError(f"margins: auto: the starting model gives non-finite {name} energies")
        arrays.append(a)
    m_in = float(np.quantile(arrays[0], q_in))
    m_out = float(np.quantile(arrays[1], q_out))
    if not m_in < m_out:
        raise ValueError(
            f"margins: auto: the starting model's auxiliary energies lie below its ID energies "
            f"({q_out:.0%} auxiliary quantile {m_out:.4g} <= {q_in:.0%} ID quantile {m_in:.4g}); "
            "no ordered margins: set m_in / m_out by hand"
        )
    return m_in, m_out


@torch.no_grad()
def energies(
    model: nn.Module, batches: Iterable[Any], device: torch.device | str | None = None
) -> torch.Tensor:
    """Eval-mode energies of every image of ``batches`` (tensors or ``(x, y)`` pairs), on CPU, in order.
    The model's train/eval flags are restored afterwards."""
    from greg.device import eval_mode

    if device is None:
        device = next(model.parameters()).device
    out = []
    with eval_mode(model):
        for b in batches:
            x = b[0] if isinstance(b, (list, tuple)) else b
            out.append(scores.energy(model(x.to(device))).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


def subsample_indices(n: int, max_samples: int | None, seed: int) -> list[int]:
    """All of ``range(n)`` if ``max_samples`` is None or ``>= n``, else a sorted seeded subsample."""
    if max_samples is None or max_samples >= n:
        return list(range(n))
    g = torch.Generator().manual_seed(int(seed))
    return sorted(torch.randperm(n, generator=g)[: int(max_samples)].tolist())


def fit_margins(
    model: nn.Module,
    id_dataset: Any,
    aux_dataset: Any,
    *,
    quantiles: tuple[float, float] = DEFAULT_QUANTILES,
    batch_size: int = 256,
    max_samples: int | None = 10000,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Energies of (a seeded subsample of) two datasets of ``(x, y)`` items under ``model`` and the margins of
    :func:`auto_margins`. Returns ``{"m_in", "m_out", "n_id", "n_aux"}`` plus the quantiles used; pass
    datasets with the eval transform (the margins are a property of the model, not of augmentation)."""
    found = []
    for k, ds in enumerate((id_dataset, aux_dataset)):
        idx = subsample_indices(len(ds), max_samples, seed + k)
        # plain batching, no DataLoader: iterating one draws a seed from the global RNG the trainer checkpoints
        batches = (
            torch.stack([ds[i][0] for i in idx[j : j + batch_size]]) for j in range(0, len(idx), batch_size)
        )
        found.append(energies(model, batches, device))
    m_in, m_out = auto_margins(found[0], found[1], quantiles)
    return {
        "m_in": m_in,
        "m_out": m_out,
        "q_in": float(quantiles[0]),
        "q_out": float(quantiles[1]),
        "n_id": len(found[0]),
        "n_aux": len(found[1]),
    }


def apply(method: Any, fitted: dict[str, float]) -> None:
    """Set ``method``'s ``m_in`` / ``m_out`` to the fitted values (also the gradient term's fallback margins)
    and record them in ``method.fitted_margins``; ``fitted`` is what :func:`fit_margins` returned (or what
    a run's state recorded of it)."""
    if method.hparams.get("margins") != "auto":
        raise ValueError(
            f"method {method.name!r}: fitted margins given, but margins is {method.hparams.get('margins')!r}"
        )
    m_in, m_out = float(fitted["m_in"]), float(fitted["m_out"])
    if not (np.isfinite(m_in) and np.isfinite(m_out) and m_in < m_out):
        raise ValueError(
            f"method {method.name!r}: fitted margins must be finite with m_in < m_out, got {m_in}, {m_out}"
        )
    method.hparams["m_in"], method.hparams["m_out"] = m_in, m_out
    method.fitted_margins = dict(fitted)
