"""Score-based cluster sampling of auxiliary outliers: GReg+ (energy, two-way) and DOS (absent class, one-way)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from greg import scores as score_fns
from greg.sampling.clustering import kmeans
from greg.sampling.select import select_from_clusters


class ClusterSampler:
    """Pick ``n_total`` of the candidate auxiliary images by clustering their features.

    Per call (GReg paper Sec. 4, "energy-based clustering sampling"; DOS, Jiang et al. ICLR 2024):

    1. no grad, the model in eval mode: ``h = model.features(x)``, ``logits = model.head(h)``,
       ``s = score(logits)`` (``greg.scores``; higher = more OOD);
    2. L2-normalize ``h`` per row; k-means into ``k`` clusters (``backend`` from ``greg.sampling.KMEANS``)
       with a seed drawn from ``generator``, so a run is reproducible and resumes identically;
    3. ``select_from_clusters(s, labels, two_way, n_total, generator)``.

    GReg+: ``ClusterSampler(k=64, n_total=128)`` (energy, lowest and highest per cluster, random fill).
    DOS: ``ClusterSampler(k=64, n_total=64, two_way=False, score="absent_class")`` (per cluster the
    candidate with the lowest absent-class probability). ``k=None``: no clustering, ``n_total`` random
    candidates (no forward pass). The model's train/eval flags (per submodule) are restored afterwards,
    also when an exception is raised. The candidate forward runs in chunks of ``forward_batch_size``.
    """

    def __init__(
        self,
        k: int | None,
        n_total: int,
        backend: str = "torch",
        two_way: bool = True,
        score: str | Callable[[torch.Tensor], torch.Tensor] = "energy",
        kmeans_kwargs: dict | None = None,
        forward_batch_size: int = 1024,
    ):
        if k is not None and k < 1:
            raise ValueError(f"ClusterSampler: k must be None or >= 1, got {k}")
        if n_total < 1:
            raise ValueError(f"ClusterSampler: n_total must be >= 1, got {n_total}")
        per_cluster = 2 if two_way else 1
        if k is not None and k * per_cluster > n_total:
            raise ValueError(
                f"ClusterSampler: k={k} clusters give up to {k * per_cluster} picks (two_way={two_way}), "
                f"more than n_total={n_total}"
            )
        self.k = k
        self.n_total = n_total
        self.backend = backend
        self.two_way = two_way
        self.score_fn = score_fns.get(score) if isinstance(score, str) else score
        self.kmeans_kwargs = dict(kmeans_kwargs or {})
        self.forward_batch_size = forward_batch_size

    @torch.no_grad()
    def score_and_features(self, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores (n,) and L2-normalized penultimate features (n x d) of ``x`` in eval mode, no grad."""
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            feats, scores = [], []
            for chunk in torch.split(x, self.forward_batch_size):
                h = model.features(chunk)
                scores.append(self.score_fn(model.head(h)))
                feats.append(h.flatten(1))
            h = F.normalize(torch.cat(feats).float(), dim=1)
            return torch.cat(scores).float(), h
        finally:
            for m, mode in modes:
                m.training = mode

    def select(
        self, model: nn.Module, x_candidates: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Indices (LongTensor on ``x_candidates.device``) of the ``n_total`` chosen candidates."""
        n = x_candidates.shape[0]
        if self.n_total > n:
            raise ValueError(f"ClusterSampler: n_total={self.n_total} but only {n} candidates were given")
        gen_dev = generator.device if generator is not None else torch.device("cpu")
        if self.k is None:
            idx = torch.randperm(n, generator=generator, device=gen_dev)[: self.n_total]
            return idx.to(x_candidates.device)
        s, h = self.score_and_features(model, x_candidates)
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=gen_dev))
        labels = kmeans(h, self.k, backend=self.backend, seed=seed, **self.kmeans_kwargs).labels
        return select_from_clusters(s, labels.to(s.device), self.two_way, self.n_total, generator).to(
            x_candidates.device
        )


# The name docs/ARCHITECTURE.md uses for it.
EnergyClusterSampler = ClusterSampler
