"""Gradient regularization of an outlier score w.r.t. the input (GReg, Sharifi et al., ECCV 2024).

Generic over the score ``S`` of the logits (``greg.scores``: energy, msp, ...; higher = more OOD), so that
"X + Grad" (paper Table 4) is one hparam (``lambda_grad``) on any method with a single training forward.

Official value (``reduction="official"``, the scaling for which ``lambda_grad = 1`` holds; docs/METHOD.md#gradient-regularizer),
on ONE train-mode forward of ``x = [x_id; x_aux]`` (N = n_id + n_aux rows, the same forward that gives the
CE / energy terms)::

    J      = -mean_ID relu(m_in - S) + mean_aux relu(S - m_out)
    G      = dJ/dx                              (create_graph=True: double backprop)
    L_grad = (1/N) * sum_i ||G_i||_2

``reduction="paper"`` (paper Eq. 3)::

    L_grad = mean_ID 1{S < m_in} ||grad_x S|| + mean_aux 1{S > m_out} ||grad_x S||

computed as per-group means of the row norms of ``G' = d J'/dx`` with the unscaled
``J' = -sum_ID relu(m_in - S) + sum_aux relu(S - m_out)``.
How the two differ: in eval mode rows are independent, ``G_i = 1{active} grad S_i / n_group`` and
``official = paper / N`` exactly. In train mode batch norm couples the rows: ``G_i`` (and ``G'_i``) also holds
the derivatives of the *other* rows' hinges through the batch statistics, and those cross terms are weighted
``1/n_id`` vs ``1/n_aux`` in ``J`` but ``1`` in ``J'``, so then the two differ by more than the factor N
(and an inactive row can have a non-zero ``G_i``).

The norm is ``torch.linalg.vector_norm`` whose backward is 0 (not NaN, as ``sqrt(sum(g**2))``) at a zero
row, e.g. when every sample is on the flat side of the hinge.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

from greg import scores
from greg.methods import finite_diff, fused_backward

REDUCTIONS = ("official", "paper")
# How the parameter gradient of L_grad is computed (greg.methods.fused_backward, greg.methods.finite_diff): "exact" double backprop
# with a hand-written batch-norm and ReLU double backward; "exact_native" the same with PyTorch's own (the
# reference); "exact_compiled" = "exact" with the batch-norm double backward through torch.compile (eager
# fallback); "fd" a finite difference of two first-order backward passes (the penalty value stays exact).
GRAD_BACKENDS = ("exact", "exact_native", "exact_compiled", "fd")
GRAD_BACKEND_DEFAULT = "exact"
# Step of "fd" in score units: the first-order change of the hinge-weighted scores along the difference
# (finite_diff.fd_step_size; docs/METHOD.md, "Finite-difference gradient regularization": float32 error
# vs step measured on the released DenseNet-100 CIFAR-10 checkpoint).
FD_STEP = 3e-3

# Hinge margins per score when a method gives none. energy: GReg's (docs/METHOD.md#gradient-regularizer). msp (S = -max softmax,
# in [-1, -1/K]): not known from the paper (Table 4 "OE + Grad" gives no margins); our choice penalizes ID
# samples with max softmax > 0.9 and auxiliary samples with max softmax < 0.5.
DEFAULT_MARGINS: dict[str, tuple[float, float]] = {"energy": (-25.0, -7.0), "msp": (-0.9, -0.5)}


def grad_defaults(score: str) -> dict[str, Any]:
    """The "X + Grad" hparams: off by default (``lambda_grad = 0``), gradient of the method's own score.

    ``grad_m_in`` / ``grad_m_out`` = None take the method's own margins if it has energy margins and
    ``grad_score == "energy"``, else :data:`DEFAULT_MARGINS`.
    """
    return {
        "lambda_grad": 0.0,
        "grad_score": score,
        "grad_m_in": None,
        "grad_m_out": None,
        "grad_reduction": "official",
        "grad_backend": GRAD_BACKEND_DEFAULT,
        "grad_fd_step": FD_STEP,
    }


# The grad hparams whose default (None) stands for "unset": the types they take (greg.methods.Method.hparam_types).
GRAD_TYPES: dict[str, tuple[type | None, ...]] = {"grad_m_in": (float, None), "grad_m_out": (float, None)}


def resolve_margins(
    score: str, m_in: float | None, m_out: float | None, fallback: tuple[float, float] | None = None
) -> tuple[float, float]:
    """Margins for ``score``: explicit values, else ``fallback``, else :data:`DEFAULT_MARGINS`."""
    base = fallback if fallback is not None else DEFAULT_MARGINS.get(score)
    if (m_in is None or m_out is None) and base is None:
        raise ValueError(
            f"gradient regularizer: no default margins for score {score!r} "
            f"(known: {sorted(DEFAULT_MARGINS)}); set grad_m_in and grad_m_out"
        )
    return (
        float(base[0] if m_in is None else m_in),  # type: ignore[index]
        float(base[1] if m_out is None else m_out),  # type: ignore[index]
    )


def validate_grad_hparams(method_name: str, hp: dict[str, Any]) -> None:
    if hp["grad_reduction"] not in REDUCTIONS:
        raise ValueError(
            f"method {method_name!r}: grad_reduction must be one of {REDUCTIONS}, got {hp['grad_reduction']!r}"
        )
    if hp["grad_score"] not in scores.SCORES:
        raise ValueError(
            f"method {method_name!r}: unknown grad_score {hp['grad_score']!r}; known: {scores.SCORES.names()}"
        )
    if hp.get("grad_backend", GRAD_BACKEND_DEFAULT) not in GRAD_BACKENDS:
        raise ValueError(
            f"method {method_name!r}: grad_backend must be one of {GRAD_BACKENDS}, got {hp['grad_backend']!r}"
        )
    if not float(hp.get("grad_fd_step", FD_STEP)) > 0:
        raise ValueError(f"method {method_name!r}: grad_fd_step must be > 0, got {hp['grad_fd_step']!r}")
    if float(hp["lambda_grad"]) < 0:
        raise ValueError(f"method {method_name!r}: lambda_grad must be >= 0, got {hp['lambda_grad']!r}")


def _mean0(t: torch.Tensor) -> torch.Tensor:
    """Mean that is 0 (not NaN) for an empty group."""
    return t.mean() if t.numel() else t.sum()


def hinge_objective(
    s: torch.Tensor, n_id: int, m_in: float, m_out: float, reduction: str = "official"
) -> torch.Tensor:
    """``J`` whose input gradient is penalized: rows ``[:n_id]`` are ID, the rest auxiliary outliers."""
    hinge_id = torch.relu(m_in - s[:n_id])
    hinge_aux = torch.relu(s[n_id:] - m_out)
    if reduction == "official":
        return -_mean0(hinge_id) + _mean0(hinge_aux)
    if reduction == "paper":
        return -hinge_id.sum() + hinge_aux.sum()
    raise ValueError(f"unknown grad_reduction {reduction!r}; expected one of {REDUCTIONS}")


class GradPenalty(NamedTuple):
    loss: torch.Tensor  # differentiable w.r.t. the parameters (double backprop)
    row_norms: torch.Tensor  # detached ||G_i||_2, shape (N,)


def gradient_penalty(
    x: torch.Tensor, s: torch.Tensor, n_id: int, m_in: float, m_out: float, reduction: str = "official"
) -> GradPenalty:
    """``L_grad`` of the scores ``s`` (computed from ``x`` by one forward) w.r.t. the input leaf ``x``."""
    if not x.requires_grad:
        raise ValueError("gradient_penalty: x must require grad (the leaf the forward was run on)")
    j = hinge_objective(s, n_id, m_in, m_out, reduction)
    if j.requires_grad:
        (g,) = torch.autograd.grad(j, x, create_graph=True, allow_unused=True)
    else:  # s does not depend on anything differentiable
        g = None
    if g is None:
        g = torch.zeros_like(x)
    norms = torch.linalg.vector_norm(g.flatten(1), ord=2, dim=1)
    if reduction == "official":
        loss = _mean0(norms)
    else:
        loss = _mean0(norms[:n_id]) + _mean0(norms[n_id:])
    return GradPenalty(loss, norms.detach())


def forward_concat(
    model: nn.Module,
    x_id: torch.Tensor,
    x_aux: torch.Tensor | None,
    input_grad: bool,
    hp: dict[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward of ``[x_id; x_aux]``; returns ``(x, logits)`` with ``x`` a grad-requiring leaf if asked.

    With ``input_grad``, ``hp["grad_backend"]`` (default ``"exact"``; ``hp=None``: ``"exact_native"``) picks
    how the forward is recorded for :func:`add_grad_terms`: ``exact`` (``exact_compiled``) records
    train-mode batch norms and ReLUs with the cheap double backward; ``fd`` keeps the model and the RNG
    state for the second forward.
    """
    x = x_id if x_aux is None else torch.cat([x_id, x_aux], dim=0)
    if not input_grad:
        return x, model(x)
    x = x.detach().clone().requires_grad_(True)
    backend = "exact_native" if hp is None else hp.get("grad_backend", GRAD_BACKEND_DEFAULT)
    if backend in ("exact", "exact_compiled"):
        with fused_backward.fused_batchnorm(compiled=backend == "exact_compiled"):
            return x, model(x)
    if backend == "fd":
        gates = finite_diff.ReluGates()
        x._greg_fd = (model, finite_diff.RngState(x.device), gates)  # type: ignore[attr-defined]
        with gates:
            return x, model(x)
    return x, model(x)


def add_grad_terms(
    terms: dict[str, torch.Tensor],
    x: torch.Tensor,
    logits: torch.Tensor,
    n_id: int,
    hp: dict[str, Any],
    fallback_margins: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Adds ``"grad"`` (L_grad) and ``"grad_row_norm"`` (mean ||G_i||) to ``terms``; returns the
    differentiable ``lambda_grad * L_grad`` (0 without any work when ``lambda_grad == 0``)."""
    lam = float(hp["lambda_grad"])
    if lam == 0.0:
        return logits.new_zeros(())
    m_in, m_out = resolve_margins(hp["grad_score"], hp["grad_m_in"], hp["grad_m_out"], fallback_margins)
    score_fn = scores.get(hp["grad_score"])
    s = score_fn(logits)
    if hp.get("grad_backend", GRAD_BACKEND_DEFAULT) == "fd":
        pen = fd_gradient_penalty(x, s, n_id, m_in, m_out, hp["grad_reduction"], score_fn, hp["grad_fd_step"])
    else:
        pen = gradient_penalty(x, s, n_id, m_in, m_out, hp["grad_reduction"])
    terms["grad"] = pen.loss.detach()
    terms["grad_row_norm"] = pen.row_norms.mean()
    return lam * pen.loss


def _row_weights(n: int, n_id: int, reduction: str, like: torch.Tensor) -> torch.Tensor:
    """``w_i`` in ``L_grad = sum_i w_i ||G_i||``: ``1/N`` (official), ``1/n_group`` (paper)."""
    w = like.new_empty(n)
    if reduction == "official":
        w.fill_(1.0 / n)
    else:
        w[:n_id] = 1.0 / max(n_id, 1)
        w[n_id:] = 1.0 / max(n - n_id, 1)
    return w


def fd_gradient_penalty(
    x: torch.Tensor,
    s: torch.Tensor,
    n_id: int,
    m_in: float,
    m_out: float,
    reduction: str,
    score_fn: Any,
    step: float = FD_STEP,
) -> GradPenalty:
    """:func:`gradient_penalty` without double backprop (``grad_backend: fd``): ``loss`` has the exact value
    and a parameter gradient from a finite difference (``greg.methods.finite_diff.fd_surrogate``).

    ``x`` must come from :func:`forward_concat` with ``grad_backend = "fd"`` (it carries the model and the
    RNG state of the training forward). The training graph is kept (``retain_graph``) for the main backward.
    """
    state = getattr(x, "_greg_fd", None)
    if state is None:
        raise ValueError("grad_backend 'fd': x must come from forward_concat(..., hp) with grad_backend 'fd'")
    model, rng, gates = state
    j = hinge_objective(s, n_id, m_in, m_out, reduction)
    if not j.requires_grad:
        zero = s.new_zeros(())
        return GradPenalty(zero, s.new_zeros(len(x)))
    # dJ/dS (the hinge activity) and G = dJ/dx in one first-order pass; the graph stays for the main backward
    coef, g = torch.autograd.grad(j, (s, x), retain_graph=True, allow_unused=True)
    coef = torch.zeros_like(s) if coef is None else coef
    g = torch.zeros_like(x) if g is None else g
    norms = torch.linalg.vector_norm(g.flatten(1), ord=2, dim=1)
    w = _row_weights(len(x), n_id, reduction, norms)
    value = (w * norms).sum()
    j_lin_base = (coef.detach() * s).sum()
    sur = finite_diff.fd_surrogate(model, x, g, w, coef.detach(), j_lin_base, score_fn, step, rng, gates)
    return GradPenalty(value + (sur - sur.detach()), norms)
