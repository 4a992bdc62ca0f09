"""GReg+ (Sharifi et al., ECCV 2024, Algorithm 1): GReg from scratch with energy-based clustering of the
auxiliary candidates at every step; and "energy-only clustering" (paper Table 5, ``lambda_grad = 0``)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from greg.methods._registry import METHODS
from greg.methods.base import Batch, ClusterSelection
from greg.methods.greg import GReg


@METHODS.register("greg_plus")
class GRegPlus(ClusterSelection, GReg):
    """Per step (paper Algorithm 1; docs/METHOD.md "Energy-based clustering sampling"): ``batch["x_aux"]``
    holds the *candidates* (CIFAR: 384 =
    300000 / 50000 * 64). ``greg.sampling.ClusterSampler`` scores them in eval mode without grad, clusters
    the L2-normalized penultimate features into ``n_clusters`` clusters (K-Means), takes from each cluster
    the ``per_cluster`` lowest-energy members (feed the energy loss) and, with ``two_way``, the ``per_cluster``
    highest-energy ones (feed the gradient loss), and fills at random up to ``n_selected`` (= 2 * batch_id,
    128). ``per_cluster=None`` is the released rule ``n_selected // (n_clusters * ways)`` (k = 64: 1 + 1,
    k = 16: 4 + 4), see ``greg.sampling.select_from_clusters``. ``n_clusters = None``: no
    clustering, a random choice of ``n_selected``. The GReg loss then runs on ``[x_id; x_aux[idx]]``; all
    selected samples enter both terms and the hinges pick which act.

    The method owns a CPU ``torch.Generator`` seeded with ``seed`` (default 0; the trainer may pass the run
    seed) for the sampler's random choices; its state is in :meth:`state_dict` so a resumed run draws the
    same selections. ``kmeans_kwargs`` go to the K-Means backend (released code: scikit-learn, ``n_init=3``).
    """

    defaults: ClassVar[dict[str, Any]] = {
        **GReg.defaults,
        "n_clusters": 64,
        "n_selected": 128,
        "kmeans_backend": "torch",
        "kmeans_kwargs": None,
        "two_way": True,
        "per_cluster": None,  # None: n_selected // (n_clusters * ways), the released rule (select_from_clusters)
        "seed": 0,
    }

    def validate(self) -> None:
        super().validate()
        k, n = self.hparams["n_clusters"], self.hparams["n_selected"]
        if k is not None and int(k) < 1:
            raise ValueError(f"method {self.name!r}: n_clusters must be >= 1 or None, got {k!r}")
        if int(n) < 1:
            raise ValueError(f"method {self.name!r}: n_selected must be >= 1, got {n!r}")

    selection_score = "energy"

    def compute_loss(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        x_cand = self._require_aux(batch)
        idx = self.select(model, x_cand)
        out = self.energy_terms(model, batch["x_id"], batch["y_id"], x_cand[idx])
        out["n_aux_selected"] = torch.tensor(float(len(idx)))
        return out


@METHODS.register("energy_clustering")
class EnergyClustering(GRegPlus):
    """GReg+ without the gradient loss (``lambda_grad = 0``): "energy-only clustering", paper Table 5."""

    defaults: ClassVar[dict[str, Any]] = {**GRegPlus.defaults, "lambda_grad": 0.0}
