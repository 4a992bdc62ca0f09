"""greg.sampling: select_from_clusters, the k-means backends, ClusterSampler (GReg+ / DOS)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from nets import FeatNet

from greg.sampling import KMEANS, ClusterSampler, inertia_of, kmeans, select_from_clusters
from greg.sampling import clustering as kmeans_mod

BACKENDS = ["torch", "faiss", "sklearn"]


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ------------------------------------------------------------------------------------ select_from_clusters

# Hand-made: cluster 0 = {0: 3.0, 1: 1.0, 2: 2.0}, cluster 1 = {3: 5.0, 4: 4.0, 6: 7.0}, cluster 2 = {5: 0.0}.
SCORES = torch.tensor([3.0, 1.0, 2.0, 5.0, 4.0, 0.0, 7.0])
LABELS = torch.tensor([0, 0, 0, 1, 1, 2, 1])


def test_select_two_way_by_hand():
    # minima by cluster: 1, 4, 5; maxima of clusters with >= 2 members: 0 (cluster 0), 6 (cluster 1)
    assert select_from_clusters(SCORES, LABELS).tolist() == [1, 4, 5, 0, 6]


def test_select_one_way_by_hand():
    assert select_from_clusters(SCORES, LABELS, two_way=False).tolist() == [1, 4, 5]


def test_select_label_values_need_not_be_contiguous():
    assert select_from_clusters(SCORES, LABELS * 7 + 3).tolist() == [1, 4, 5, 0, 6]


def test_select_singletons_and_ties_never_repeat_an_index():
    # cluster 4: all scores tie -> min = lowest index (1), max = next lowest (3); cluster 9: singleton 2;
    # cluster 0: min tie between 0 and 5 -> 0, max tie between 4 and 6 -> 4.
    scores = torch.tensor([1.0, 2.0, 9.0, 2.0, 8.0, 1.0, 8.0])
    labels = torch.tensor([0, 4, 9, 4, 0, 0, 0])
    out = select_from_clusters(scores, labels)
    assert out.tolist() == [0, 1, 2, 4, 3]
    assert len(set(out.tolist())) == out.numel()
    # every point its own cluster: each index exactly once
    assert select_from_clusters(torch.randn(5), torch.arange(5)).tolist() == [0, 1, 2, 3, 4]


def test_select_matches_a_plain_loop_on_random_data():
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        scores = torch.randint(0, 6, (200,), generator=g).float()  # many ties
        labels = torch.randint(0, 30, (200,), generator=g)
        lows, highs = [], []
        for c in sorted(set(labels.tolist())):
            members = [i for i in range(200) if labels[i] == c]
            lo = min(members, key=lambda i: (scores[i].item(), i))
            lows.append(lo)
            rest = [i for i in members if i != lo]
            if rest:
                highs.append(min(rest, key=lambda i: (-scores[i].item(), i)))
        assert select_from_clusters(scores, labels).tolist() == lows + highs
        assert select_from_clusters(scores, labels, two_way=False).tolist() == lows


def test_select_random_fill():
    picks = [1, 4, 5, 0, 6]
    out = select_from_clusters(SCORES, LABELS, n_total=7, generator=torch.Generator().manual_seed(0))
    assert out[:5].tolist() == picks
    assert sorted(out.tolist()) == list(range(7))  # the fill is exactly the two unchosen ones, no repeats

    g = torch.Generator().manual_seed(0)
    scores, labels = torch.randn(384, generator=g), torch.randint(0, 32, (384,), generator=g)
    # one per cluster (64 picks) and 64 random: the released rule would give 2 per cluster and no fill
    a, b, c = (
        select_from_clusters(scores, labels, n_total=128, generator=torch.Generator().manual_seed(s), per_cluster=1)
        for s in (5, 5, 6)
    )
    picked = select_from_clusters(scores, labels)
    assert a.numel() == 128 and a.unique().numel() == 128
    assert a.dtype == torch.long
    assert torch.equal(a, b)
    assert torch.equal(a[: picked.numel()], picked) and torch.equal(c[: picked.numel()], picked)
    assert not torch.equal(a, c)


def _striped(k: int, n: int = 384) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate i has score i and cluster i % k: cluster c = {c, c + k, c + 2k, ...} in increasing score."""
    return torch.arange(n, dtype=torch.float32), torch.arange(n) % k


@pytest.mark.parametrize("k", [64, 32, 16])
def test_select_released_per_cluster_rule(k):
    # 64 ID per step: two-way 128 outliers, p = 128 // (2k) = 64 // k lowest AND highest per cluster
    # (released train_sea.py: int(batch_size_sampled_ood / k)); 16 -> 4 + 4, all 128 chosen by score.
    n, p = 384, 64 // k
    scores, labels = _striped(k, n)
    lows = [c + j * k for c in range(k) for j in range(p)]
    highs = [n - k + c - j * k for c in range(k) for j in range(p)]
    g = torch.Generator().manual_seed(0)
    assert select_from_clusters(scores, labels, n_total=128, generator=g).tolist() == lows + highs
    assert select_from_clusters(scores, labels, per_cluster=p).tolist() == lows + highs
    # one-way (DOS): 64 outliers, the 64 // k lowest per cluster, no fill needed
    assert select_from_clusters(scores, labels, two_way=False, n_total=64, generator=g).tolist() == lows


# Small clusters (per_cluster 2): A = {0} is taken whole; B = {1: 3, 2: 1, 3: 2} has 3 < 2p members: lows
# 2, 3 and the remaining 1; C = {4: 10, 5: 14, 6: 12, 7: 11, 8: 13}: lows 4, 7, highs 5, 8 (6 left);
# D = {9..16} with scores 27..20: lows 16, 15, highs 9, 10 (11..14 left).
SMALL_SCORES = torch.tensor([5.0, 3, 1, 2, 10, 14, 12, 11, 13] + [27.0 - j for j in range(8)])
SMALL_LABELS = torch.tensor([0, 1, 1, 1, 2, 2, 2, 2, 2] + [3] * 8)


def test_select_small_clusters_whole_and_fill_short_total():
    g = torch.Generator().manual_seed(1)
    out = select_from_clusters(SMALL_SCORES, SMALL_LABELS, n_total=16, generator=g).tolist()  # p = 16 // 8
    assert out[:12] == [0, 2, 3, 4, 7, 16, 15, 1, 5, 8, 9, 10]
    assert len(set(out[12:])) == 4 and set(out[12:]) <= {6, 11, 12, 13, 14}  # random fill of the 4 missing
    out = select_from_clusters(SMALL_SCORES, SMALL_LABELS, two_way=False, n_total=8, generator=g).tolist()
    assert out[:7] == [0, 2, 3, 4, 7, 16, 15] and out[7] not in out[:7]  # p = 8 // 4 = 2, one fill
    with pytest.raises(ValueError, match="exceed n_total"):
        select_from_clusters(SMALL_SCORES, SMALL_LABELS, n_total=16, per_cluster=3)


def test_select_n_total_errors():
    with pytest.raises(ValueError, match="exceed n_total"):
        select_from_clusters(SCORES, LABELS, n_total=4)  # 5 per-cluster picks
    with pytest.raises(ValueError, match="n_total"):
        select_from_clusters(SCORES, LABELS, n_total=8)  # only 7 candidates
    with pytest.raises(ValueError, match="NaN"):
        select_from_clusters(torch.tensor([0.0, float("nan")]), torch.tensor([0, 0]))
    assert select_from_clusters(SCORES, LABELS, two_way=False, n_total=3).tolist() == [1, 4, 5]


# ------------------------------------------------------------------------------------------------ k-means


def _features(kind: str, seed: int, n: int = 384, d: int = 342) -> torch.Tensor:
    """L2-normalized features like the GReg+ candidates: isotropic random, or ReLU'd noisy blobs."""
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        x = torch.randn(n, d, generator=g)
    else:
        centres = torch.randn(40, d, generator=g)
        x = torch.relu(
            centres[torch.randint(0, 40, (n,), generator=g)] * 0.5 + 0.6 * torch.randn(n, d, generator=g)
        )
    return F.normalize(x, dim=1)


def _same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_registry_names():
    assert KMEANS.names() == sorted(BACKENDS)
    with pytest.raises(KeyError, match="unknown kmeans backend"):
        kmeans(torch.randn(10, 2), 2, backend="nope")


@pytest.mark.parametrize("backend", BACKENDS)
def test_kmeans_seeded_deterministic(backend):
    x = _features("blob", 1, n=200, d=32)
    a = kmeans(x, 16, backend=backend, seed=7)
    b = kmeans(x, 16, backend=backend, seed=7)
    assert torch.equal(a.labels, b.labels) and torch.equal(a.centroids, b.centroids)
    assert a.inertia == b.inertia
    assert a.labels.dtype == torch.long and a.labels.shape == (200,)
    assert a.centroids.shape == (16, 32) and int(a.labels.max()) < 16
    assert a.inertia == pytest.approx(inertia_of(x, a.labels, a.centroids), rel=1e-4)


def test_inertia_of_by_hand():
    x = torch.tensor([[0.0, 0.0], [2.0, 0.0], [10.0, 1.0]])
    c = torch.tensor([[1.0, 0.0], [10.0, 0.0]])
    assert inertia_of(x, torch.tensor([0, 0, 1]), c) == pytest.approx(1.0 + 1.0 + 1.0)


@pytest.mark.parametrize("kind,seed", [("random", 0), ("blob", 0), ("blob", 1)])
def test_kmeans_inertia_within_2_percent_of_sklearn(kind, seed):
    x = _features(kind, seed)
    ref = kmeans(x, 64, backend="sklearn", seed=seed).inertia  # n_init=3, the released code's setting
    for backend in ("torch", "faiss"):
        res = kmeans(x, 64, backend=backend, seed=seed)
        assert res.inertia <= 1.02 * ref, (backend, res.inertia, ref)
        assert len(res.labels.unique()) == 64


@pytest.mark.parametrize("backend", BACKENDS)
def test_kmeans_finds_well_separated_blobs(backend):
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(8, 16, generator=g) * 10
    truth = torch.arange(200) % 8
    x = centres[truth] + 0.1 * torch.randn(200, 16, generator=g)
    res = kmeans(x, 8, backend=backend, seed=0)
    assert _same_partition(res.labels, truth)
    assert res.inertia == pytest.approx(inertia_of(x, truth, _means(x, truth)), rel=1e-4)


def _means(x, labels):
    return torch.stack([x[labels == c].mean(0) for c in range(int(labels.max()) + 1)])


@pytest.mark.parametrize("backend", BACKENDS)
def test_kmeans_k_at_least_n(backend):
    x = torch.randn(5, 3)
    for k in (5, 9):
        res = kmeans(x, k, backend=backend)
        assert res.labels.tolist() == [0, 1, 2, 3, 4]
        assert torch.equal(res.centroids, x) and res.inertia == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_kmeans_duplicates_no_nan(backend):
    base = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    x = base.repeat(10, 1)  # 60 points, 6 distinct, 20 clusters asked
    res = kmeans(x, 20, backend=backend, seed=1)
    assert torch.isfinite(res.centroids).all()
    assert res.labels.min() >= 0 and res.labels.max() < 20
    assert _same_partition(res.labels, torch.arange(60) % 6)
    if backend != "sklearn":  # scikit-learn's empty-cluster relocation leaves its centres off the means
        assert res.inertia == pytest.approx(0.0, abs=1e-3)


def test_kmeans_rejects_bad_input():
    with pytest.raises(ValueError, match="non-finite"):
        kmeans(torch.tensor([[0.0], [float("nan")]]), 1)
    with pytest.raises(ValueError, match="2-D"):
        kmeans(torch.randn(4), 2)
    with pytest.raises(ValueError, match="k >= 1"):
        kmeans(torch.randn(4, 2), 0)


def test_torch_kmeans_large_n_path_matches_pairwise(monkeypatch):
    x = _features("blob", 2, n=120, d=16)
    a = kmeans(x, 10, seed=3, n_init=2)
    monkeypatch.setattr(kmeans_mod, "_PAIRWISE_MAX_N", 50)  # forces distance rows computed on the fly
    b = kmeans(x, 10, seed=3, n_init=2)
    assert torch.equal(a.labels, b.labels)
    assert a.inertia == pytest.approx(b.inertia, rel=1e-6)


def test_faiss_random_init_option():
    x = _features("blob", 0, n=200, d=32)
    res = kmeans(x, 8, backend="faiss", init="random", n_init=2, seed=0)
    assert res.labels.shape == (200,) and math.isfinite(res.inertia)
    with pytest.raises(ValueError, match="init"):
        kmeans(x, 8, backend="faiss", init="bogus")


# ----------------------------------------------------------------------------------------- ClusterSampler


def _two_cluster_candidates() -> torch.Tensor:
    """Two clusters (dominant coordinate 0 or 1); coordinates 2..4 are the logits (W selects them)."""
    logits = [
        [2.0, 0.0, 0.0],  # 0: energy -2.2395, absent prob 1/(e^2+2) = 0.107
        [0.0, 0.0, 3.0],  # 1: energy -3.0949, absent prob e^3/(e^3+2) = 0.909
        [1.0, 1.0, 1.0],  # 2: energy -2.0986, absent prob 1/3
        [0.0, 0.0, 3.0],  # 3 (cluster 1): energy -3.0949, absent 0.909
        [0.0, 0.0, 0.0],  # 4 (cluster 1): energy -1.0986, absent 1/3
        [0.0, 2.5, 0.0],  # 5 (cluster 1): energy -2.6557, absent 1/(e^2.5+2) = 0.0704
        [1.5, 0.0, 0.0],  # 6 (cluster 0): energy -1.8133, absent 1/(e^1.5+2) = 0.1550
    ]
    cluster = [0, 0, 0, 1, 1, 1, 0]
    x = torch.zeros(7, 5)
    for i, (lg, c) in enumerate(zip(logits, cluster)):
        x[i, c] = 40.0
        x[i, 2:] = torch.tensor(lg)
    return x


def _head_weight() -> torch.Tensor:
    w = torch.zeros(3, 5)
    w[0, 2] = w[1, 3] = w[2, 4] = 1.0
    return w


@pytest.mark.parametrize("backend", BACKENDS)
def test_cluster_sampler_energy_two_way_by_hand(backend):
    model = FeatNet(_head_weight()).train()
    sampler = ClusterSampler(k=2, n_total=4, backend=backend)
    out = sampler.select(model, _two_cluster_candidates(), torch.Generator().manual_seed(0))
    # energy: cluster 0 = {0, 1, 2, 6}: min 1, max 6; cluster 1 = {3, 4, 5}: min 3, max 4
    assert sorted(out.tolist()) == [1, 3, 4, 6]
    assert model.training and model.drop.training


def test_cluster_sampler_dos_lowest_absent_class_probability():
    model = FeatNet(_head_weight())
    sampler = ClusterSampler(k=2, n_total=2, two_way=False, score="absent_class")
    out = sampler.select(model, _two_cluster_candidates(), torch.Generator().manual_seed(0))
    # absent-class probability: cluster 0 min is 0 (0.107), cluster 1 min is 5 (0.070)
    assert sorted(out.tolist()) == [0, 5]
    filled = ClusterSampler(k=2, n_total=5, two_way=False, score="absent_class", per_cluster=1).select(
        model, _two_cluster_candidates(), torch.Generator().manual_seed(0)
    )
    assert sorted(filled[:2].tolist()) == [0, 5] and filled.unique().numel() == 5


def test_cluster_sampler_reproducible_and_chunked():
    torch.manual_seed(0)
    model = FeatNet(torch.randn(10, 16))
    x = torch.randn(96, 16)
    s = ClusterSampler(k=16, n_total=40)
    a = s.select(model, x, torch.Generator().manual_seed(1))
    b = ClusterSampler(k=16, n_total=40, forward_batch_size=7).select(
        model, x, torch.Generator().manual_seed(1)
    )
    assert torch.equal(a, b)
    assert a.numel() == 40 and a.unique().numel() == 40
    # the k-means seed is drawn from the generator: consuming it moves the next selection on
    g = torch.Generator().manual_seed(1)
    first, second = s.select(model, x, g), s.select(model, x, g)
    assert torch.equal(first, a) and not torch.equal(first, second)


def test_candidate_chunks_shrink_with_the_image_size():
    s = ClusterSampler(k=4, n_total=8)  # forward_batch_size 1024
    assert s.chunk_size(torch.empty(0, 3, 32, 32)) == 1024  # CIFAR: as before, 2^22 // 1024 = 4096 > 1024
    assert s.chunk_size(torch.empty(0, 3, 64, 64)) == 1024  # 2^22 // 4096
    assert s.chunk_size(torch.empty(0, 3, 224, 224)) == 83  # 4194304 // 50176
    assert s.chunk_size(torch.empty(0, 3, 4096, 4096)) == 1
    assert ClusterSampler(k=4, n_total=8, forward_batch_size=7).chunk_size(torch.empty(0, 3, 224, 224)) == 7
    assert s.chunk_size(torch.empty(0, 16)) == 1024  # feature vectors: no pixel count
    # the forward really goes in those chunks
    seen = []

    class Spy(FeatNet):
        def features(self, x):
            seen.append(x.shape[0])
            return super().features(x)

    torch.manual_seed(0)
    model = Spy(torch.randn(10, 16))
    s.chunk_size = lambda x: 7
    s.score_and_features(model, torch.randn(20, 16))
    assert seen == [7, 7, 6]


def test_cluster_sampler_no_clustering_is_random_subset():
    model = FeatNet(torch.randn(10, 16))
    x = torch.randn(50, 16)
    s = ClusterSampler(k=None, n_total=20)
    a = s.select(model, x, torch.Generator().manual_seed(4))
    assert a.unique().numel() == 20 and int(a.max()) < 50
    assert torch.equal(a, torch.randperm(50, generator=torch.Generator().manual_seed(4))[:20])


def test_cluster_sampler_restores_modes_also_on_error():
    model = FeatNet(torch.randn(10, 16))
    model.train()
    model.head.eval()  # a mixed state must come back as it was
    ClusterSampler(k=4, n_total=8).select(model, torch.randn(30, 16), torch.Generator().manual_seed(0))
    assert model.training and model.drop.training and not model.head.training

    def boom(_logits):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        ClusterSampler(k=4, n_total=8, score=boom).select(model, torch.randn(30, 16))
    assert model.training and model.drop.training and not model.head.training


def test_cluster_sampler_config_errors():
    with pytest.raises(ValueError, match="n_total"):
        ClusterSampler(k=64, n_total=100)  # two-way: up to 128 picks
    with pytest.raises(ValueError, match="n_total"):
        ClusterSampler(k=16, n_total=128, per_cluster=5)  # 16 x 2 x 5 = 160 picks
    assert ClusterSampler(k=16, n_total=128).picks_per_cluster() == 4  # released: int(64 / 16)
    assert ClusterSampler(k=32, n_total=64, two_way=False).picks_per_cluster() == 2
    with pytest.raises(ValueError, match="candidates"):
        ClusterSampler(k=2, n_total=10).select(FeatNet(torch.randn(3, 4)), torch.randn(5, 4))
    with pytest.raises(KeyError, match="unknown score"):
        ClusterSampler(k=2, n_total=4, score="nope")


def test_numpy_kmeanspp_draws_proportional_to_distance():
    # 1-D points 0, 1, 3 with the first centre forced at 0: weights 1 and 9 -> P(pick 3) = 0.9.
    x = torch.tensor([[0.0], [1.0], [3.0]])
    x_sq = (x * x).sum(1)
    trials = 400
    picks = [kmeans_mod._kmeanspp(x, x_sq, 2, 1, 1, s)[0] for s in range(trials)]
    after_zero = [int(p[1]) for p in picks if p[0] == 0]
    frac = sum(1 for p in after_zero if p == 2) / len(after_zero)
    assert abs(frac - 0.9) < 0.08
    assert all(int(p[1]) != int(p[0]) for p in picks)  # a chosen centre (weight 0) is never redrawn


def test_cluster_sums_matmul_path_matches_index_add():
    # the accelerator path (one-hot matmul, deterministic there) checked against the CPU one
    x = torch.randn(50, 6)
    labels = torch.randint(0, 7, (3, 50))
    c1, s1 = kmeans_mod._cluster_sums(x, labels, 7, matmul=False)
    c2, s2 = kmeans_mod._cluster_sums(x, labels, 7, matmul=True)
    assert torch.equal(c1, c2)
    assert torch.allclose(s1, s2, atol=1e-5)
    assert torch.allclose(s1[1, 3], x[labels[1] == 3].sum(0), atol=1e-5)
    assert c1[2].tolist() == [int((labels[2] == j).sum()) for j in range(7)]


def test_cluster_sampler_on_a_zoo_model():
    from greg import models

    torch.manual_seed(0)
    model = models.create("small_cnn", num_classes=10).train()
    x = torch.randn(48, 3, 32, 32)
    idx = ClusterSampler(k=8, n_total=16).select(model, x, torch.Generator().manual_seed(0))
    assert idx.numel() == 16 and idx.unique().numel() == 16 and int(idx.max()) < 48
    assert all(m.training for m in model.modules())
    # the picks are the per-cluster energy extremes of the clustering the sampler used
    with torch.no_grad():
        model.eval()
        h = model.features(x)
        s = -torch.logsumexp(model.head(h), dim=1)
        model.train()
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=torch.Generator().manual_seed(0)))
    labels = kmeans(F.normalize(h, dim=1), 8, seed=seed).labels
    for c in labels.unique():
        members = torch.nonzero(labels == c).flatten()
        assert int(members[s[members].argmin()]) in idx.tolist()
        assert int(members[s[members].argmax()]) in idx.tolist()


def test_greg_plus_and_dos_use_the_released_per_cluster_rule():
    from greg.methods import METHODS

    # GReg+ k = 16, 32, 64 with 128 outliers two-way: 4, 2, 1 per end of each cluster (64 ID per step)
    for k, p in [(16, 4), (32, 2), (64, 1)]:
        assert METHODS.create("greg_plus", n_clusters=k).sampler.picks_per_cluster() == p
    assert METHODS.create("greg_plus", n_clusters=16, per_cluster=1).sampler.picks_per_cluster() == 1
    assert METHODS.create("dos", n_clusters=16).sampler.picks_per_cluster() == 4  # 64 // 16, one-way
    # the per_cluster hparam reaches the sampler of every ClusterSelection method (base make_sampler)
    for name in ("greg_plus", "energy_clustering", "dos"):
        assert METHODS.create(name, n_clusters=16, per_cluster=2).sampler.per_cluster == 2
    with pytest.raises(ValueError, match="n_total"):
        METHODS.create("greg_plus", n_clusters=16, per_cluster=5).sampler  # noqa: B018 (16 x 2 x 5 > 128)


# ------------------------------------------------------------------------------- DOS candidate window


def _released_dos_selection(weights, feats, spt, ept, k, batch_sampled):
    """Re-implementation of o4lc/Greg-OOD train_sea.py@4761101:297-361 (``--oodMethod abs``, one-way, ``--repr
    norm``), numpy + scikit-learn as released. Returns (picks, fill pool): the random fill is only
    described, by the set it is drawn from (``set(idxs_sorted[spt:ept]) - set(idxs_sampled)``)."""
    import numpy as np
    from sklearn.cluster import KMeans

    idxs_sorted = np.argsort(weights)
    weights_prox = weights[list(idxs_sorted[spt:ept])]
    repr_prox = F.normalize(torch.from_numpy(feats), dim=-1).numpy()[list(idxs_sorted[spt:ept])]
    labels = KMeans(n_clusters=k, n_init=3, random_state=0).fit(repr_prox).labels_
    sampled = []
    size = 1 if k > batch_sampled else int(batch_sampled / k)
    for i in range(min(k, batch_sampled)):
        valid = np.where(labels == i)[0]
        if len(valid) <= size:
            sampled.extend(idxs_sorted[spt:][valid])
        else:
            order = np.argsort(weights_prox[valid])
            sampled.extend(idxs_sorted[spt:][valid[order[:size]]])
    pool = set(idxs_sorted[spt:ept].tolist()) - {int(i) for i in sampled}
    return sorted(int(i) for i in sampled), pool


def _window_problem():
    """384 candidates in 8 far-apart blobs (any k-means with k = 8 finds them) (sizes 6 x 54, 57, 3); fixed distinct scores in the last column.
    Blob 7's three members hold the two lowest scores overall (ranks 0, 1) and one mid score."""
    g = torch.Generator().manual_seed(0)
    sizes = [54] * 6 + [57, 3]
    blob = torch.cat([torch.full((n,), c) for c, n in enumerate(sizes)])
    x = torch.zeros(384, 9, dtype=torch.float64)
    x[torch.arange(384), blob] = 10.0
    x[:, :8] += 0.01 * torch.randn(384, 8, generator=g, dtype=torch.float64)
    score = (torch.randperm(384, generator=g).double() + 1) / 384  # distinct, in (0, 1]
    members7 = torch.nonzero(blob == 7).flatten()
    score[members7] = torch.tensor([-1.0, -0.5, 0.5], dtype=torch.float64)
    x[:, 8] = score
    head = torch.zeros(1, 9, dtype=torch.float64)
    head[0, 8] = 1.0
    return FeatNet(head.float()).double(), x, score


@pytest.mark.parametrize(("k", "n_total"), [(8, 8), (8, 16), (8, 24)])
def test_dos_window_matches_the_released_selection(k, n_total):
    model, x, score = _window_problem()
    sampler = ClusterSampler(k, n_total, backend="torch", two_way=False, score=lambda lg: lg[:, 0],
                             window=(16, 384))
    idx = sampler.select(model, x, torch.Generator().manual_seed(0))
    picks, pool = _released_dos_selection(score.numpy(), x.numpy(), 16, 384, k, n_total)
    n_picked = len(picks)
    assert sorted(idx[:n_picked].tolist()) == picks
    assert set(idx[n_picked:].tolist()) <= pool and idx.unique().numel() == n_total == idx.numel()
    # the 16 most ID-like candidates never enter; without the window the selection differs
    assert not set(idx.tolist()) & set(torch.argsort(score)[:16].tolist())
    everyone = ClusterSampler(k, n_total, two_way=False, score=lambda lg: lg[:, 0]).select(
        model, x, torch.Generator().manual_seed(0))
    assert sorted(everyone[:n_picked].tolist()) != picks


def test_dos_window_small_cluster_fills_from_the_window_only():
    # blob 7 keeps one member in ranks 16..383: 2 per cluster gives 15 picks, the 16th is a fill
    model, x, score = _window_problem()
    sampler = ClusterSampler(8, 16, two_way=False, score=lambda lg: lg[:, 0], window=(16, 384))
    picks, pool = _released_dos_selection(score.numpy(), x.numpy(), 16, 384, 8, 16)
    assert len(picks) == 15
    for seed in range(5):
        idx = sampler.select(model, x, torch.Generator().manual_seed(seed))
        assert sorted(idx[:15].tolist()) == picks and int(idx[15]) in pool


def test_rank_window_by_hand_and_errors():
    from greg.sampling import rank_window

    s = torch.tensor([0.3, 0.1, 0.4, 0.1, 0.2])
    assert rank_window(s, 1, 4).tolist() == [3, 4, 0]  # ties: lower index first (1 before 3)
    assert rank_window(s, 2).tolist() == [4, 0, 2] and rank_window(s, 0, 99).numel() == 5
    for bad in [(-1, 3), (3, 3), (3, 2)]:
        with pytest.raises(ValueError, match="start"):
            rank_window(s, *bad)
    with pytest.raises(ValueError, match="n_total"):  # a window smaller than the picks
        ClusterSampler(2, 8, two_way=False, window=(16, 20))
    with pytest.raises(ValueError, match="fewer than n_total"):  # fewer candidates than the window needs
        ClusterSampler(2, 8, two_way=False, window=(16, 384)).select(
            FeatNet(torch.eye(4)), torch.randn(20, 4), torch.Generator().manual_seed(0))


def test_dos_window_hparams_reach_the_sampler():
    from greg.methods import METHODS

    assert METHODS.create("dos").sampler.window is None  # class default: every candidate (lygjwy/DOS)
    assert METHODS.create("greg_plus").sampler.window is None  # GReg+: --spt 0 --ept 10000
    assert METHODS.create("dos", window_start=16, window_end=384).sampler.window == (16, 384)
    assert METHODS.create("dos", window_start=16, window_end=384, n_clusters=None).sampler.window is None
    with pytest.raises(ValueError, match="window_end"):
        METHODS.create("dos", window_start=16, window_end=64, n_selected=64)
