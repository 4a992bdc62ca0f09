"""K-Means backends behind one signature, chosen by name from the ``KMEANS`` registry.

``kmeans(x, k, backend="torch", seed=0, **kw) -> KMeansResult(labels, centroids, inertia)``

- ``torch`` (default): k-means++ (greedy, as scikit-learn) + Lloyd on the tensor's own device, all restarts
  batched into one set of matmuls. Fast enough to run every training step on the GPU.
- ``faiss``: ``faiss.Kmeans`` (random init, several redos); on the GPU when faiss has one.
- ``sklearn``: ``sklearn.cluster.KMeans(n_init=3)``, what the released GReg+ code runs (CPU, numpy).

Every backend returns labels / centroids on ``x``'s device and the inertia (sum of squared distances of each
point to its centroid) recomputed in float64 from the returned labels, so the numbers are comparable.
``k >= n`` gives every point its own cluster (``n`` clusters). Duplicate points (fewer distinct points than
``k``) never give NaNs: empty clusters are re-seeded and may stay empty (then no label points to them).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from greg.registry import Registry

KMEANS: Registry["KMeansResult"] = Registry("kmeans backend")


@dataclass
class KMeansResult:
    labels: torch.Tensor  # (n,) int64 in [0, k)
    centroids: torch.Tensor  # (k, d), or (n, d) when k >= n
    inertia: float


def inertia_of(x: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor) -> float:
    """Sum of squared Euclidean distances of each point to its assigned centroid (float64)."""
    diff = x.double() - centroids.double()[labels]
    return float((diff * diff).sum())


def kmeans(x: torch.Tensor, k: int, backend: str = "torch", seed: int = 0, **kw) -> KMeansResult:
    """Cluster the rows of ``x`` (n x d) into ``k`` clusters with the named backend, seeded by ``seed``."""
    if x.dim() != 2:
        raise ValueError(f"kmeans expects a 2-D tensor (n x d), got shape {tuple(x.shape)}")
    if k < 1:
        raise ValueError(f"kmeans needs k >= 1, got k={k}")
    n = x.shape[0]
    if n == 0:
        raise ValueError("kmeans got no points (n = 0)")
    if not torch.isfinite(x).all():
        raise ValueError("kmeans got non-finite values (NaN or inf) in x")
    fn = KMEANS.get(backend)
    x = x.detach()
    if not x.is_floating_point():
        x = x.float()
    if k >= n:
        labels = torch.arange(n, device=x.device)
        return KMeansResult(labels=labels, centroids=x.clone(), inertia=0.0)
    return fn(x, k, seed=seed, **kw)


# ----------------------------------------------------------------------------------------------- torch


def _sq_dists(x: torch.Tensor, x_sq: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Squared distances between points ``x`` (n x d) and batched centres ``c`` (R x m x d): (R x n x m)."""
    c_sq = (c * c).sum(-1)  # R x m
    d = torch.baddbmm(c_sq.unsqueeze(1), x.unsqueeze(0).expand(c.shape[0], -1, -1), c.transpose(1, 2), alpha=-2)
    d.add_(x_sq.view(1, -1, 1))
    return d.clamp_(min=0)


def _kmeanspp(
    x: torch.Tensor, x_sq: torch.Tensor, k: int, n_init: int, n_local_trials: int, gen: torch.Generator
) -> torch.Tensor:
    """Greedy k-means++ (Arthur & Vassilvitskii 2007; scikit-learn's variant), ``n_init`` runs batched.

    Returns initial centres (n_init x k x d). Each new centre is the best of ``n_local_trials`` candidates
    drawn proportionally to the squared distance to the nearest chosen centre. The candidates are points,
    so for moderate n the n x n distance matrix is computed once and each step is a row lookup; all
    uniform numbers are drawn up front on the CPU generator, so the loop never syncs with the device.
    """
    n, d = x.shape
    dev = x.device
    runs = torch.arange(n_init, device=dev)
    if n <= _PAIRWISE_MAX_N:
        pair = _sq_dists(x, x_sq, x.unsqueeze(0)).squeeze(0)  # n x n
        pair.fill_diagonal_(0)

        def rows(idx: torch.Tensor) -> torch.Tensor:  # (R x L) -> (R x L x n)
            return pair[idx]
    else:

        def rows(idx: torch.Tensor) -> torch.Tensor:
            return _sq_dists(x, x_sq, x[idx]).transpose(1, 2)

    u = torch.rand(k, n_init, n_local_trials, generator=gen, device=gen.device, dtype=torch.float64).to(dev)
    first = torch.randint(0, n, (n_init,), generator=gen, device=gen.device).to(dev)
    chosen = torch.empty(n_init, k, dtype=torch.long, device=dev)
    chosen[:, 0] = first
    closest = rows(first.view(-1, 1)).squeeze(1)  # R x n
    for j in range(1, k):
        cum = closest.double().cumsum(1)
        pot = cum[:, -1:]
        # All points coincide with chosen centres (duplicates): sample uniformly instead of from zeros.
        cum = torch.where(pot > 0, cum, torch.arange(1, n + 1, device=dev, dtype=cum.dtype).expand(n_init, n))
        target = u[j] * cum[:, -1:]
        # side="right": the first index whose cumulative weight exceeds the target has weight > 0.
        cand = torch.searchsorted(cum, target, right=True).clamp_(max=n - 1)  # R x L
        new_closest = torch.minimum(closest.unsqueeze(1), rows(cand))  # R x L x n
        best = new_closest.sum(2).argmin(1)  # R
        closest = new_closest[runs, best]
        chosen[:, j] = cand[runs, best]
    return x[chosen]


_PAIRWISE_MAX_N = 4096


def _lloyd(
    x: torch.Tensor, x_sq: torch.Tensor, centres: torch.Tensor, max_iter: int, tol: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched Lloyd iterations until the labels stop changing or the centre shift is below ``tol``.

    Returns (labels R x n, centres R x k x d, inertia R) with labels consistent with the final centres.
    """
    r, k, d = centres.shape
    n = x.shape[0]
    dev = x.device
    offset = (torch.arange(r, device=dev) * k).view(r, 1)
    labels = None
    for _ in range(max_iter):
        dist = _sq_dists(x, x_sq, centres)
        new_labels = dist.argmin(2)  # R x n
        if labels is not None and torch.equal(new_labels, labels):
            break
        labels = new_labels
        flat = (labels + offset).view(-1)
        counts = torch.bincount(flat, minlength=r * k).view(r, k)
        sums = torch.zeros(r * k, d, device=dev, dtype=x.dtype)
        sums.index_add_(0, flat, x.repeat(r, 1))
        new_centres = sums.view(r, k, d) / counts.clamp(min=1).unsqueeze(2).to(x.dtype)
        empty = counts == 0
        if bool(empty.any()):
            new_centres = _reseed_empty(x, dist, labels, new_centres, empty)
        shift = ((new_centres - centres) ** 2).sum((1, 2))
        centres = new_centres
        if bool((shift <= tol).all()):
            break
    dist = _sq_dists(x, x_sq, centres)
    min_d, labels = dist.min(2)
    return labels, centres, min_d.sum(1)


def _reseed_empty(
    x: torch.Tensor, dist: torch.Tensor, labels: torch.Tensor, centres: torch.Tensor, empty: torch.Tensor
) -> torch.Tensor:
    """Move each empty centre onto the point farthest from its current centre (as scikit-learn does).

    Rare (duplicates, bad init), so a loop over the runs that need it is fine.
    """
    own = dist.gather(2, labels.unsqueeze(2)).squeeze(2)  # R x n
    for ri in torch.nonzero(empty.any(1)).flatten().tolist():
        ks = torch.nonzero(empty[ri]).flatten()
        far = own[ri].argsort(descending=True, stable=True)[: ks.numel()]
        centres[ri, ks[: far.numel()]] = x[far]
    return centres


@KMEANS.register("torch")
def kmeans_torch(
    x: torch.Tensor,
    k: int,
    seed: int = 0,
    n_init: int = 1,
    max_iter: int = 50,
    tol: float = 1e-4,
    n_local_trials: int | None = None,
) -> KMeansResult:
    """Greedy k-means++ + Lloyd in torch on ``x.device``; the best of ``n_init`` batched restarts.

    ``tol`` is relative, as in scikit-learn: iterations stop when the summed squared centre shift is below
    ``tol * mean per-feature variance of x`` or when no label changes. Defaults (``n_init=1``,
    ``max_iter=50``) were chosen with benchmarks/bench_train_step.py: on 384 x 342 L2-normalized
    features into 64 clusters the inertia is within 2 % of scikit-learn's ``n_init=3`` (greedy k-means++
    already lands in a good basin), at a fraction of the time. Random numbers come from a CPU generator
    seeded with ``seed``, so results do not depend on the device's RNG.
    """
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    x_sq = (xf * xf).sum(1)
    trials = n_local_trials if n_local_trials is not None else 2 + int(math.log(k))
    centres = _kmeanspp(xf, x_sq, k, n_init, trials, gen)
    abs_tol = tol * float(xf.var(0, unbiased=False).mean()) * 1.0
    labels, centres, inertia = _lloyd(xf, x_sq, centres, max_iter, abs_tol)
    best = int(inertia.argmin())
    lab = labels[best]
    cen = centres[best].to(x.dtype)
    return KMeansResult(labels=lab, centroids=cen, inertia=inertia_of(x, lab, cen))


# ----------------------------------------------------------------------------------------------- faiss


@KMEANS.register("faiss")
def kmeans_faiss(
    x: torch.Tensor, k: int, seed: int = 0, n_init: int = 3, max_iter: int = 25, gpu: bool | None = None
) -> KMeansResult:
    """``faiss.Kmeans`` (random init, ``nredo=n_init`` restarts, ``niter=max_iter``); GPU if faiss has one.

    ``min_points_per_centroid=1`` silences faiss' "please provide at least 39 * k points" warning: 384
    candidates into 64 clusters is the intended use here.
    """
    import faiss
    import numpy as np

    if gpu is None:
        gpu = hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0
    xn = np.ascontiguousarray(x.detach().float().cpu().numpy())
    km = faiss.Kmeans(
        xn.shape[1], k, niter=max_iter, nredo=n_init, seed=int(seed), gpu=bool(gpu), verbose=False,
        min_points_per_centroid=1, max_points_per_centroid=max(256, xn.shape[0]),
    )
    km.train(xn)
    _, lab = km.index.search(xn, 1)
    labels = torch.from_numpy(lab[:, 0].astype("int64")).to(x.device)
    cen = torch.from_numpy(km.centroids.copy()).to(device=x.device, dtype=x.dtype)
    return KMeansResult(labels=labels, centroids=cen, inertia=inertia_of(x, labels, cen))


# --------------------------------------------------------------------------------------------- sklearn


@KMEANS.register("sklearn")
def kmeans_sklearn(x: torch.Tensor, k: int, seed: int = 0, n_init: int = 3, **kw) -> KMeansResult:
    """``sklearn.cluster.KMeans(n_clusters=k, n_init=3, random_state=seed)``: the released GReg+ code's choice.

    Extra keywords (``max_iter``, ``tol``, ``algorithm``) go to ``KMeans``.
    """
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    xn = x.detach().cpu().numpy()
    with warnings.catch_warnings():
        # Duplicates: "Number of distinct clusters found smaller than n_clusters" is expected, not an error.
        warnings.simplefilter("ignore", ConvergenceWarning)
        km = KMeans(n_clusters=k, n_init=n_init, random_state=int(seed), **kw).fit(xn)
    labels = torch.from_numpy(km.labels_.astype("int64")).to(x.device)
    cen = torch.from_numpy(km.cluster_centers_).to(device=x.device, dtype=x.dtype)
    return KMeansResult(labels=labels, centroids=cen, inertia=inertia_of(x, labels, cen))
