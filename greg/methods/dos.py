"""DOS (Jiang, Cheng, Chen, Wang & Wei, "DOS: Diverse Outlier Sampling for Out-of-Distribution Detection",
ICLR 2024).

Facts from the released code (github.com/lygjwy/DOS, ``train_diverse.py``):

- a (K+1)-class network; the extra class is "absent" (OOD);
- per step ``300000 / 50000 * 64 = 384`` candidate outliers are scored in eval mode without grad:
  absent-class probability ``softmax(f)_{K+1}`` and the L2-normalized penultimate features;
- K-Means (scikit-learn, ``num_cluster = 64``, ``n_init = 3`` in the paper's runs) on the normalized
  features; from each cluster the candidate with the LOWEST absent-class probability (the hardest, most
  ID-like outlier); a random fill (without repeats) up to 64 outliers;
- ``loss = CE(f(x_id), y) + beta * CE(f(x_ood), K)``, ``beta = 1``, one forward of ``[x_id; x_ood]``;
- SGD LR 0.1, Nesterov, momentum 0.9, weight decay 1e-4, 100 epochs, LR x0.1 at 50 / 75 / 90 % of the
  epochs, batch 64.

The selection is ``greg.sampling.ClusterSampler(score="absent_class", two_way=False)``, the same sampler as
GReg+ with the other criterion; with fewer clusters than outliers (``k < n_selected``) it takes the
``n_selected // k`` lowest of each cluster (a smaller cluster whole), then fills at random, as released
(hparam ``per_cluster`` overrides the count).

Candidate window (``window_start`` / ``window_end``): the paper's DOS runs used o4lc/Greg-OOD
``train_sea.py`` (``Scripts/cifar10ScriptDOS.sh``; README@451d2a0 for ImageNet), which sorts the candidates by
absent-class probability and clusters, picks and fills only from ranks ``--spt .. --ept - 1``, defaults 16 and
384 (``train_sea.py:243,297-307,347,581-582`` at 4761101): the 16 most ID-like candidates are never used. The
preset ``config/methods/dos.yaml`` sets 16 / 384; the class default (0 / None) keeps every candidate, as
lygjwy/DOS ``train_diverse.py``. ``greg.sampling.rank_window`` applies it.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from greg.methods._registry import METHODS
from greg.methods.base import Batch, ClusterSelection, Method


def absent_class_loss(
    logits_id: torch.Tensor, y_id: torch.Tensor, logits_ood: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(total, ce_id, ce_ood)`` with ``total = CE(logits_id, y) + beta * CE(logits_ood, K)``, K = last class."""
    ce = F.cross_entropy(logits_id, y_id)
    k = logits_ood.shape[1] - 1
    target = torch.full((logits_ood.shape[0],), k, dtype=torch.long, device=logits_ood.device)
    ce_ood = F.cross_entropy(logits_ood, target) if len(logits_ood) else logits_ood.sum()
    return ce + beta * ce_ood, ce, ce_ood


@METHODS.register("dos")
class DOS(ClusterSelection, Method):
    """``L = CE(x_id, y) + beta * CE(x_aux[sel], K)``; ``sel`` = per K-Means cluster of the candidates'
    normalized features, the lowest absent-class probability, then a random fill up to ``n_selected``.

    Hparams: ``beta`` [1], ``n_clusters`` [64] (None: a random choice, no clustering), ``n_selected`` [64],
    ``kmeans_backend`` (``greg.sampling.KMEANS``: torch / faiss / sklearn [released code]),
    ``kmeans_n_init`` [3: the paper's DOS runs, o4lc/Greg-OOD train_sea.py@4761101:584 via
    Scripts/cifar10ScriptDOS.sh; config/methods/dos.yaml], ``kmeans_kwargs`` (extra backend arguments),
    ``window_start`` [0], ``window_end`` [None] (score ranks the selection draws from, see the module doc),
    ``seed`` of the CPU generator for the k-means seeds and the fill (state in :meth:`state_dict`).
    """

    defaults: ClassVar[dict[str, Any]] = {
        "beta": 1.0,
        "n_clusters": 64,
        "n_selected": 64,
        "kmeans_backend": "torch",
        "kmeans_n_init": 3,
        "kmeans_kwargs": None,
        "per_cluster": None,  # None: n_selected // n_clusters lowest per cluster (the released rule)
        # Score ranks of the candidates that are clustered and picked (released --spt / --ept); 0 / None =
        # all, as lygjwy/DOS train_diverse.py@d8f623e. The paper's runs: 16 / 384 (config/methods/dos.yaml).
        "window_start": 0,
        "window_end": None,
        "seed": 0,
    }
    needs_aux = True
    extra_classes = 1
    detector = "absent_class"

    def validate(self) -> None:
        hp = self.hparams
        k, n = hp["n_clusters"], hp["n_selected"]
        if int(n) < 1:
            raise ValueError(f"method {self.name!r}: n_selected must be >= 1, got {n!r}")
        if k is not None and not 1 <= int(k) <= int(n):
            raise ValueError(
                f"method {self.name!r}: n_clusters must be None or in [1, n_selected={n}], got {k!r}"
            )
        if int(hp["kmeans_n_init"]) < 1:
            raise ValueError(f"method {self.name!r}: kmeans_n_init must be >= 1, got {hp['kmeans_n_init']!r}")
        start, end = hp["window_start"], hp["window_end"]
        if int(start) < 0 or (end is not None and int(end) - int(start) < int(n)):
            raise ValueError(
                f"method {self.name!r}: need window_start >= 0 and window_end - window_start >= n_selected={n}"
                f" (or window_end null), got {start!r} / {end!r}"
            )
        if float(hp["beta"]) < 0:
            raise ValueError(f"method {self.name!r}: beta must be >= 0, got {hp['beta']!r}")

    selection_score = "absent_class"

    def candidate_window(self) -> tuple[int, int | None] | None:
        start, end = int(self.hparams["window_start"]), self.hparams["window_end"]
        if self.hparams["n_clusters"] is None or (start == 0 and end is None):
            return None  # the released --noCluster path has no window either (spt 0, ept 100000)
        return start, None if end is None else int(end)

    def kmeans_kwargs(self) -> dict[str, Any]:
        return {"n_init": int(self.hparams["kmeans_n_init"]), **super().kmeans_kwargs()}

    def compute_loss(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        x_id, y_id = batch["x_id"], batch["y_id"]
        x_cand = self._require_aux(batch)
        idx = self.select(model, x_cand)
        logits = model(torch.cat([x_id, x_cand[idx]]))
        n = len(x_id)
        total, ce, ce_ood = absent_class_loss(logits[:n], y_id, logits[n:], float(self.hparams["beta"]))
        return {
            "total": total,
            "ce": ce.detach(),
            "absent": ce_ood.detach(),
            "n_aux_selected": torch.tensor(float(len(idx))),
        }
