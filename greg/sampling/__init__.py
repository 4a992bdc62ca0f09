"""Auxiliary-outlier sampling: k-means backends, per-cluster selection, the GReg+ / DOS cluster sampler."""

from greg.sampling.clustering import KMEANS, KMeansResult, inertia_of, kmeans
from greg.sampling.sampler import ClusterSampler
from greg.sampling.select import rank_window, select_from_clusters

__all__ = [
    "KMEANS",
    "ClusterSampler",
    "KMeansResult",
    "inertia_of",
    "kmeans",
    "rank_window",
    "select_from_clusters",
]
