"""OOD detection metrics on outlier scores (higher = more OOD), written with numpy only.

Two FPR95 conventions exist and differ by tens of points on wide or tied score distributions
(docs/METHOD.md#metrics), so both are computed and named explicitly:

- ``fpr95`` / ``fpr95_idpos`` (paper convention, the default in every table): ID is the positive class,
  the threshold accepts ~95 % of ID test samples, FPR = fraction of OOD samples accepted as ID. The
  threshold is chosen with the "closest recall" rule of ``fpr_and_fdr_at_recall`` in the
  Outlier-Exposure / energy_ood code (hendrycks/outlier-exposure, wetliu/energy_ood,
  ``utils/display_results.py``): among the distinct thresholds, the ID recall closest to 0.95 wins (it
  may be below 0.95), ties in that distance go to the higher recall, tied scores form one threshold.
- ``fpr95_oodpos`` (OpenOOD v1.5 ``auc_and_fpr_recall``, pytorch-ood ``fpr_at_tpr``): OOD is the positive
  class; the threshold is the first (highest) one at which at least 95 % of OOD samples score at or above
  it; FPR = fraction of ID samples scoring at or above it. This is the point of the full ROC curve; OpenOOD
  calls sklearn's ``roc_curve`` with ``drop_intermediate=True``, which removes collinear ROC points and can,
  in rare tie patterns, move its value to the next kept point; pytorch-ood (torchmetrics) keeps all points
  as done here.

``auroc`` is the Mann-Whitney statistic (ties count 1/2; the same for either positive class). ``aupr_in``
and ``aupr_out`` are average precision (sklearn's step-wise ``average_precision_score``, as in the
energy_ood code) with ID resp. OOD as the positive class; OpenOOD integrates the PR curve with the
trapezoidal rule instead, which gives slightly different values.

All values in the dict returned by :func:`ood_metrics` are fractions in [0, 1]; CSV files written by
``greg evaluate`` hold percent.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from greg.columns import METRIC_COLUMNS, TABLE_COLUMNS

RECALL_LEVEL = 0.95


def _as_scores(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    if np.ndim(x) > 1:
        raise ValueError(f"{name}: expected a 1-D array of scores, got shape {np.shape(x)}")
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    if a.size == 0:
        raise ValueError(f"{name}: empty score array; need at least one sample")
    bad = ~np.isfinite(a)
    if bad.any():
        raise ValueError(
            f"{name}: {int(bad.sum())} of {a.size} scores are NaN or infinite (first at index "
            f"{int(np.flatnonzero(bad)[0])}); metrics need finite scores"
        )
    return a


def stable_cumsum(arr: np.ndarray, rtol: float = 1e-05, atol: float = 1e-08) -> np.ndarray:
    """float64 cumulative sum whose last element is checked against the sum (as sklearn/OE do)."""
    out = np.cumsum(arr, dtype=np.float64)
    expected = np.sum(arr, dtype=np.float64)
    if not np.allclose(out[-1], expected, rtol=rtol, atol=atol):
        raise RuntimeError("cumsum was found to be unstable: its last element does not match the sum")
    return out


def _curve(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """True/false positive counts at each distinct threshold, scores descending ("higher = positive").

    Sorting is a stable ascending sort reversed, positives first in the input (as in the OE code);
    only the last index of each tied group is a threshold, so tie order never matters.
    """
    y_score = np.concatenate([pos, neg])
    y_true = np.concatenate([np.ones(pos.size), np.zeros(neg.size)])
    order = np.argsort(y_score, kind="mergesort")[::-1]
    y_score, y_true = y_score[order], y_true[order]
    last_of_group = np.r_[np.flatnonzero(np.diff(y_score)), y_true.size - 1]
    tps = stable_cumsum(y_true)[last_of_group]
    fps = 1 + last_of_group - tps
    return tps, fps


def fpr_at_recall_closest(pos: np.ndarray, neg: np.ndarray, recall_level: float = RECALL_LEVEL) -> float:
    """FPR of ``neg`` at the threshold whose recall of ``pos`` is closest to ``recall_level``.

    ``pos``/``neg`` are scores where higher = more positive. Reproduces ``fpr_and_fdr_at_recall`` of the
    Outlier-Exposure / energy_ood code: the curve is walked from the lowest threshold reaching full recall
    towards higher thresholds, the OE code's extra point (recall 1, fps 0) is appended, and ``argmin`` of
    ``|recall - level|`` takes the first minimum (i.e. the higher recall on a tie in distance).
    """
    tps, fps = _curve(pos, neg)
    recall = tps / tps[-1]
    last_ind = tps.searchsorted(tps[-1])
    sl = slice(last_ind, None, -1)
    recall = np.r_[recall[sl], 1]
    fps = np.r_[fps[sl], 0]
    cutoff = np.argmin(np.abs(recall - recall_level))
    return float(fps[cutoff] / neg.size)


def fpr_at_tpr_first(pos: np.ndarray, neg: np.ndarray, tpr_level: float = RECALL_LEVEL) -> float:
    """FPR of ``neg`` at the first ROC point (thresholds descending) with TPR of ``pos`` >= ``tpr_level``."""
    tps, fps = _curve(pos, neg)
    tpr = np.r_[0.0, tps / pos.size]
    fpr = np.r_[0.0, fps / neg.size]
    idx = int(np.searchsorted(tpr, tpr_level, side="left"))
    return float(fpr[min(idx, fpr.size - 1)])


def average_precision(pos: np.ndarray, neg: np.ndarray) -> float:
    """Step-wise average precision ``sum_n (R_n - R_{n-1}) P_n`` over distinct thresholds (higher = pos)."""
    tps, fps = _curve(pos, neg)
    precision = tps / (tps + fps)
    recall = tps / pos.size
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def auroc(scores_id: Any, scores_ood: Any) -> float:
    """P(OOD score > ID score) + 1/2 P(equal), via average ranks (Mann-Whitney U)."""
    s_id = _as_scores(scores_id, "scores_id")
    s_ood = _as_scores(scores_ood, "scores_ood")
    allv = np.concatenate([s_id, s_ood])
    _, inv, counts = np.unique(allv, return_inverse=True, return_counts=True)
    first_rank = np.cumsum(counts) - counts + 1  # 1-based rank of the first member of each tie group
    ranks = (first_rank + (counts - 1) / 2.0)[inv]
    n_id, n_ood = s_id.size, s_ood.size
    u = ranks[n_id:].sum() - n_ood * (n_ood + 1) / 2.0
    return float(u / (n_id * n_ood))


def ood_metrics(scores_id: Any, scores_ood: Any, recall_level: float = RECALL_LEVEL) -> dict[str, float]:
    """All detection metrics as fractions: ``fpr95`` (= ``fpr95_idpos``), ``fpr95_oodpos``, ``auroc``,
    ``aupr_in``, ``aupr_out``. Scores: higher = more OOD; arrays or tensors, any length >= 1, finite."""
    s_id = _as_scores(scores_id, "scores_id")
    s_ood = _as_scores(scores_ood, "scores_ood")
    fpr_id = fpr_at_recall_closest(-s_id, -s_ood, recall_level)
    return {
        "fpr95": fpr_id,
        "fpr95_idpos": fpr_id,
        "fpr95_oodpos": fpr_at_tpr_first(s_ood, s_id, recall_level),
        "auroc": auroc(s_id, s_ood),
        "aupr_in": average_precision(-s_id, -s_ood),
        "aupr_out": average_precision(s_ood, s_id),
    }


def id_threshold(scores_id: Any, tpr: float = RECALL_LEVEL) -> float:
    """Smallest ID score ``gamma`` with at least ``tpr`` of ID samples at ``S <= gamma`` (detection: ID iff
    ``S <= gamma``)."""
    s = np.sort(_as_scores(scores_id, "scores_id"))
    if not 0.0 < tpr <= 1.0:
        raise ValueError(f"tpr must be in (0, 1], got {tpr}")
    k = int(np.ceil(tpr * s.size - 1e-9))
    return float(s[max(k, 1) - 1])


def accuracy(logits: Any, labels: Any) -> float:
    """Top-1 accuracy (fraction) of ``argmax(logits, 1)`` against integer ``labels``."""
    if isinstance(logits, torch.Tensor):
        logits = logits.detach().cpu().numpy()
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    logits = np.asarray(logits)
    labels = np.asarray(labels).reshape(-1)
    if logits.ndim != 2:
        raise ValueError(f"logits: expected shape (N, K), got {logits.shape}")
    if logits.shape[0] != labels.size:
        raise ValueError(f"logits has {logits.shape[0]} rows but labels has {labels.size} entries")
    if labels.size == 0:
        raise ValueError("accuracy of an empty set is undefined")
    return float(np.mean(logits.argmax(axis=1) == labels))




def metrics_table(
    scores_id: np.ndarray,
    ood_scores: Mapping[str, np.ndarray],
    id_acc: float | None = None,
    scale: float = 100.0,
):
    """One row per OOD set plus ``mean`` (unweighted over sets; its ``n_ood`` is the total), columns
    :data:`TABLE_COLUMNS`; metrics and ``id_acc`` (a fraction) multiplied by ``scale`` (percent by default)."""
    import pandas as pd

    rows = []
    for name, s_ood in ood_scores.items():
        try:
            m = ood_metrics(scores_id, s_ood)
        except ValueError as e:
            raise ValueError(f"metrics for OOD set {name!r}: {e}") from e
        rows.append(
            {
                "ood_set": name,
                "n_id": int(np.size(scores_id)),
                "n_ood": int(np.size(s_ood)),
                "id_acc": math.nan if id_acc is None else scale * id_acc,
                **{c: scale * m[c] for c in METRIC_COLUMNS},
            }
        )
    if not rows:
        raise ValueError("no OOD sets to evaluate")
    df = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    mean = {
        "ood_set": "mean",
        "n_id": int(np.size(scores_id)),
        "n_ood": int(df["n_ood"].sum()),
        "id_acc": rows[0]["id_acc"],
        **{c: float(df[c].mean()) for c in METRIC_COLUMNS},
    }
    return pd.concat([df, pd.DataFrame([mean], columns=TABLE_COLUMNS)], ignore_index=True)
