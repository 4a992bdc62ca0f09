"""Score-based cluster sampling of auxiliary outliers: GReg+ (energy, two-way) and DOS (absent class, one-way)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from greg import scores as score_fns
from greg.device import eval_mode, rows_per_chunk
from greg.sampling.clustering import kmeans
from greg.sampling.select import rank_window, select_from_clusters

#: Pixels per candidate forward chunk (2^22): the default 1024 candidates at 32 x 32 fit 4x over; 224 x 224
#: images go 83 at a time (inference activations of DenseNet-121 at 224 px: ~20 MB per image).
FORWARD_PIXELS = 4 * 1024 * 1024


class ClusterSampler:
    """Pick ``n_total`` of the candidate auxiliary images by clustering their features.

    Per call (GReg paper Sec. 4, "energy-based clustering sampling"; DOS, Jiang et al. ICLR 2024):

    1. no grad, the model in eval mode: ``h = model.features(x)``, ``logits = model.head(h)``,
       ``s = score(logits)`` (``greg.scores``; higher = more OOD);
    2. L2-normalize ``h`` per row; k-means into ``k`` clusters (``backend`` from ``greg.sampling.KMEANS``)
       with a seed drawn from ``generator``, so a run is reproducible and resumes identically;
    3. ``select_from_clusters(s, labels, two_way, n_total, generator, per_cluster)``: ``per_cluster``
       lowest (and, two-way, highest) per cluster, default the released ``n_total // (k * ways)``.

    ``window=(start, end)``: steps 2-3 see only the candidates of score ranks ``start .. end - 1``
    (``greg.sampling.rank_window``, the released ``--spt`` / ``--ept``): they alone are clustered, picked
    and used for the fill. ``None`` (GReg+: ``--spt 0 --ept 10000``) uses every candidate.

    GReg+: ``ClusterSampler(k=64, n_total=128)`` (energy, lowest and highest per cluster; k=16: 4 + 4).
    DOS: ``ClusterSampler(k=64, n_total=64, two_way=False, score="absent_class", window=(16, 384))`` (per
    cluster the candidate with the lowest absent-class probability, among ranks 16-383). ``k=None``: no
    clustering and no window, ``n_total`` random candidates (no forward pass; the released ``--noCluster``). The model's train/eval flags (per submodule) are restored afterwards,
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
        per_cluster: int | None = None,
        window: tuple[int, int | None] | None = None,
    ):
        self.k = k
        self.n_total = n_total
        self.backend = backend
        self.two_way = two_way
        self.per_cluster = per_cluster
        self.window = None if window is None else (int(window[0]), None if window[1] is None else int(window[1]))
        self.score_fn = score_fns.get(score) if isinstance(score, str) else score
        self.kmeans_kwargs = dict(kmeans_kwargs or {})
        self.forward_batch_size = forward_batch_size
        self.check()

    def picks_per_cluster(self) -> int:
        """Members taken from each end of a cluster: ``per_cluster``, or the released rule
        ``n_total // (k * ways)`` with the requested ``k`` (o4lc/Greg-OOD train_sea.py:337-340)."""
        ways = 2 if self.two_way else 1
        return int(self.per_cluster) if self.per_cluster is not None else self.n_total // (self.k * ways)

    def check(self) -> None:
        """Raise ``ValueError`` on an inconsistent configuration (re-run after changing attributes)."""
        k, n_total = self.k, self.n_total
        if k is not None and k < 1:
            raise ValueError(f"ClusterSampler: k must be None or >= 1, got {k}")
        if n_total < 1:
            raise ValueError(f"ClusterSampler: n_total must be >= 1, got {n_total}")
        if self.window is not None:
            start, end = self.window
            if start < 0 or (end is not None and end - start < n_total):
                raise ValueError(
                    f"ClusterSampler: window={self.window} must satisfy 0 <= start and end - start >= "
                    f"n_total={n_total} (the picks come from the window's candidates)"
                )
        if self.per_cluster is not None and int(self.per_cluster) < 1:
            raise ValueError(f"ClusterSampler: per_cluster must be None or >= 1, got {self.per_cluster}")
        if k is not None:
            ways = 2 if self.two_way else 1
            p = self.picks_per_cluster()
            if p < 1 or k * ways * p > n_total:
                raise ValueError(
                    f"ClusterSampler: k={k} clusters x {ways} ways x {max(p, 1)} per cluster give up to "
                    f"{k * ways * max(p, 1)} picks (two_way={self.two_way}), more than n_total={n_total}"
                )

    def chunk_size(self, x: torch.Tensor) -> int:
        """Candidates per forward: ``forward_batch_size``, fewer for large images so that one chunk holds at
        most :data:`FORWARD_PIXELS` pixels (1024 at 32 x 32; 83 at 224 x 224, where 1024 images would keep
        ~20 GB of DenseNet-121 activations alive). Eval mode: the chunking does not change the scores."""
        return rows_per_chunk(x, FORWARD_PIXELS, self.forward_batch_size)

    def score_and_features(self, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores (n,) and L2-normalized penultimate features (n x d) of ``x`` in eval mode, no grad.

        Runs under ``torch.inference_mode`` (no autograd bookkeeping at all) in chunks of
        ``forward_batch_size``; the results are cloned out as ordinary tensors. No bf16 autocast: it
        changes which candidates are selected (``bench_train_step.py --selection-check``,
        benchmarks/README.md); no channels_last: the model's memory format is also the training one.
        """
        with eval_mode(model), torch.inference_mode():
            feats, scores = [], []
            for chunk in torch.split(x, self.chunk_size(x)):
                h = model.features(chunk)
                scores.append(self.score_fn(model.head(h)))
                feats.append(h.flatten(1))
            h = F.normalize(torch.cat(feats).float(), dim=1)
            s = torch.cat(scores).float()
        return s.clone(), h.clone()

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
        pool = None
        if self.window is not None:
            pool = rank_window(s, *self.window)
            if pool.numel() < self.n_total:
                raise ValueError(
                    f"ClusterSampler: the window {self.window} of {n} candidates holds {pool.numel()}, "
                    f"fewer than n_total={self.n_total}"
                )
            s, h = s[pool], h[pool.to(h.device)]
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=gen_dev))
        labels = kmeans(h, self.k, backend=self.backend, seed=seed, **self.kmeans_kwargs).labels
        idx = select_from_clusters(
            s, labels.to(s.device), self.two_way, self.n_total, generator, per_cluster=self.picks_per_cluster()
        )
        if pool is not None:
            idx = pool[idx]
        return idx.to(x_candidates.device)
