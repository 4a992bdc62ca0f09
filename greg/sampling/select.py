"""Pick auxiliary samples from clusters by their outlier score (GReg+ and DOS sampling), as a pure function."""

from __future__ import annotations

import torch


def select_from_clusters(
    scores: torch.Tensor,
    labels: torch.Tensor,
    two_way: bool = True,
    n_total: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Indices of the per-cluster extremes of ``scores``, then a uniform random fill up to ``n_total``.

    GReg+ (Sec. 4 of the GReg paper; ``two_way=True``): from each cluster the lowest-score member (most
    ID-like, feeds the energy loss) and the highest-score member (most OOD-like, feeds the gradient loss);
    a one-member cluster gives its one member once. DOS (Jiang et al. 2024; ``two_way=False``): only the
    lowest-score member (with ``scores`` = absent-class probability).

    Output order: the minima in increasing cluster label, then the maxima in increasing cluster label
    (clusters with at least two members), then the random fill. No index appears twice. Ties go to the
    lowest index; the maximum of a cluster whose scores are all equal is its second-lowest index, so it
    never repeats the minimum.

    ``n_total=None``: no fill. Otherwise the fill draws ``n_total - n_picked`` of the not-yet-chosen
    indices uniformly without replacement using ``generator`` (the global RNG if None). If the
    per-cluster picks alone exceed ``n_total`` this raises ``ValueError`` (a configuration error, e.g.
    ``k > n_total / 2`` with two-way picks; the paper uses ``k = batch_id``, ``n_total = 2 * batch_id``),
    as it does if ``n_total`` exceeds the number of candidates.

    Vectorized with two stable sorts (no loop over clusters); runs on ``scores``' device.
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

    # Lexicographic (label, score, index) order via two stable sorts: the index order survives the ties.
    def order(descending: bool) -> torch.Tensor:
        by_score = torch.sort(scores, descending=descending, stable=True).indices
        return by_score[torch.sort(labels[by_score], stable=True).indices]

    _, counts = torch.unique_consecutive(torch.sort(labels).values, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts  # first position of each cluster in the sorted orders
    lows = order(descending=False)[starts]
    multi = counts > 1
    by_high = order(descending=True)
    highs = by_high[starts[multi]]
    # All scores of a cluster tie: its highest (lowest index first) is its lowest; take the next one.
    second = by_high[starts[multi] + 1]
    highs = torch.where(highs == lows[multi], second, highs)
    picked = torch.cat([lows, highs]) if two_way else lows

    if n_total is None:
        return picked
    if picked.numel() > n_total:
        raise ValueError(
            f"select_from_clusters: the per-cluster picks ({picked.numel()} from {counts.numel()} clusters, "
            f"two_way={two_way}) exceed n_total={n_total}; use fewer clusters or a larger n_total"
        )
    free = torch.ones(n, dtype=torch.bool, device=dev)
    free[picked] = False
    rest = torch.nonzero(free).flatten()
    n_fill = n_total - picked.numel()
    gen_dev = generator.device if generator is not None else torch.device("cpu")
    perm = torch.randperm(rest.numel(), generator=generator, device=gen_dev)[:n_fill].to(dev)
    return torch.cat([picked, rest[perm]])
