"""Pick auxiliary samples from clusters by their outlier score (GReg+ and DOS sampling), as pure functions."""

from __future__ import annotations

import torch


def select_from_clusters(
    scores: torch.Tensor,
    labels: torch.Tensor,
    two_way: bool = True,
    n_total: int | None = None,
    generator: torch.Generator | None = None,
    per_cluster: int | None = None,
) -> torch.Tensor:
    """Indices of the ``per_cluster`` lowest (and, two-way, highest) scores of every cluster, then a uniform
    random fill up to ``n_total``.

    The released GReg+ / DOS rule (o4lc/Greg-OOD ``train_sea.py:337-361`` at the paper's commit 4761101):
    with ``k`` clusters and ``n_total`` outliers per step, ``p = n_total // (k * ways)`` per cluster
    (``ways`` = 2 two-way, else 1), i.e. ``floor(batch_sampled / k)``: k = 64 -> 1, 32 -> 2, 16 -> 4 with
    64 ID (n_total 128 two-way, 64 one-way). From each cluster: its ``p`` lowest-score members (GReg+: feed
    the energy loss; DOS, ``scores`` = absent-class probability: the hardest outliers) and, with
    ``two_way``, its ``p`` highest-score members (GReg+: feed the gradient loss). A cluster with at most
    ``p`` members is taken whole (once); one with ``p < size < 2p`` gives its lowest ``p`` and the rest
    (the union of both ends, no repeats, as the released ``np.unique``). When clusters are small the picks
    fall short of ``n_total`` and the random fill (from the not-yet-chosen candidates, as released) makes
    up the difference.

    ``per_cluster=None``: the released rule, with ``k`` = the number of distinct labels here
    (``ClusterSampler`` passes ``p`` computed from its requested ``k``, which counts empty clusters as the
    released code does); ``1`` without ``n_total``.

    Output order: the low picks by increasing cluster label (within a cluster by increasing score), then
    the high picks by increasing label (within a cluster by decreasing score), then the fill. No index
    appears twice. Ties go to the lowest index, on both ends (so a cluster whose scores all tie gives
    its lowest-index members as lows and the next ones as highs).

    ``n_total=None``: no fill. Otherwise the fill draws ``n_total - n_picked`` of the not-yet-chosen
    indices uniformly without replacement using ``generator`` (the global RNG if None). If the
    per-cluster picks can exceed ``n_total`` (``per_cluster * k * ways > n_total``, or the rule gives 0)
    this raises ``ValueError``, as it does if ``n_total`` exceeds the number of candidates.

    Vectorized with stable sorts (no loop over clusters); runs on ``scores``' device.

    Over 60 lines because half of it is this docstring stating the released rule; the code (input checks,
    the low picks, the high picks, the fill) stays one function, as parity-tested against the released rule.
    """
    if scores.dim() != 1 or labels.dim() != 1 or scores.shape[0] != labels.shape[0]:
        raise ValueError(
            f"select_from_clusters: scores and labels must be 1-D of equal length, got "
            f"{tuple(scores.shape)} and {tuple(labels.shape)}"
        )
    n = scores.shape[0]
    dev = scores.device
    if n_total is not None and not 0 <= n_total <= n:
        raise ValueError(
            f"select_from_clusters: n_total={n_total} must be in [0, {n}] (the number of candidates)"
        )
    if bool(torch.isnan(scores).any()):
        raise ValueError("select_from_clusters: scores contain NaN")
    labels = labels.to(dev)
    _, inv, counts = torch.unique(labels, sorted=True, return_inverse=True, return_counts=True)
    k = counts.numel()
    ways = 2 if two_way else 1
    if per_cluster is None:
        per_cluster = 1 if n_total is None else n_total // (k * ways)
    p = int(per_cluster)
    if p < 1 or (n_total is not None and p * k * ways > n_total):
        raise ValueError(
            f"select_from_clusters: the per-cluster picks ({max(p, 1)} x {k} clusters x {ways} ways) exceed "
            f"n_total={n_total}; use fewer clusters, a smaller per_cluster or a larger n_total"
        )
    starts = torch.cumsum(counts, 0) - counts  # first position of each cluster in the sorted orders
    arange = torch.arange(n, device=dev)

    # Lexicographic (cluster, key..., index) orders via stable sorts: the index order survives the ties.
    def by_cluster(perm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        perm = perm[torch.sort(inv[perm], stable=True).indices]
        return perm, arange - starts[inv[perm]]  # the order and each entry's rank inside its cluster

    asc, rank = by_cluster(torch.sort(scores, stable=True).indices)
    lows = asc[rank < p]
    picked = lows
    if two_way:
        is_low = torch.zeros(n, dtype=torch.bool, device=dev)
        is_low[lows] = True
        by_score = torch.sort(scores, descending=True, stable=True).indices
        # Non-low members first inside each cluster, so the p highest are drawn from the rest only.
        desc, rank = by_cluster(by_score[torch.sort(is_low[by_score].to(torch.uint8), stable=True).indices])
        highs = desc[(rank < p) & ~is_low[desc]]
        picked = torch.cat([lows, highs])

    if n_total is None:
        return picked
    free = torch.ones(n, dtype=torch.bool, device=dev)
    free[picked] = False
    rest = torch.nonzero(free).flatten()
    n_fill = n_total - picked.numel()
    gen_dev = generator.device if generator is not None else torch.device("cpu")
    perm = torch.randperm(rest.numel(), generator=generator, device=gen_dev)[:n_fill].to(dev)
    return torch.cat([picked, rest[perm]])


def rank_window(scores: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
    """Indices of the candidates of score ranks ``start .. end - 1`` (rank 0 = lowest score), by increasing score.

    The released candidate window (o4lc/Greg-OOD ``train_sea.py:297-307`` at 4761101, ``--spt`` / ``--ept``):
    ``idxs_sorted = np.argsort(scores)``, then only ``idxs_sorted[spt:ept]`` are clustered, picked and used
    for the fill. The paper's DOS runs use the defaults ``spt = 16, ept = 384`` (``train_sea.py:581-582``):
    the 16 candidates with the lowest absent-class probability are never used. ``end=None`` (or past the
    last candidate) keeps everything from ``start`` on, like the slice. Ties go to the lower index (a stable
    sort; numpy's default argsort breaks ties in no fixed order).
    """
    if scores.dim() != 1:
        raise ValueError(f"rank_window: scores must be 1-D, got shape {tuple(scores.shape)}")
    if start < 0 or (end is not None and end <= start):
        raise ValueError(f"rank_window: need 0 <= start < end, got start={start}, end={end}")
    if bool(torch.isnan(scores).any()):
        raise ValueError("rank_window: scores contain NaN")
    return torch.sort(scores, stable=True).indices[start:end]
