"""Clustering primitives for palettization.

* :func:`kmeans_1d_exact` -- globally optimal weighted 1-D k-means (``exact_1d``: Lagrangian DP, numba kernels).
* :func:`kmeans_plus_plus` -- weighted k-means++ seeding + weighted Lloyd iterations, any D (``lloyd``).
* :func:`uniform_centroids` -- evenly spaced 1-D centroids.
* :func:`kmeans` -- the dispatcher used by the DKM layer and post-training palettization.
* :func:`nearest_centroid`, :func:`weighted_sse` -- memory-bounded assignment helpers (``lloyd``).
"""

from __future__ import annotations

import numpy as np
import torch

from dkm_palett.kmeans.exact_1d import kmeans_1d_exact
from dkm_palett.kmeans.inputs import as_2d, as_numpy_1d, check_k, pad_centroids  # noqa: F401 (re-export)
from dkm_palett.kmeans.lloyd import kmeans_plus_plus, nearest_centroid, weighted_sse

__all__ = [
    "kmeans_1d_exact",
    "kmeans_plus_plus",
    "uniform_centroids",
    "kmeans",
    "nearest_centroid",
    "weighted_sse",
    "pad_centroids",
]

_METHODS = ("auto", "opt1d", "kmeans++", "uniform")


def uniform_centroids(values: torch.Tensor, k: int) -> torch.Tensor:
    """k evenly spaced centroids from min(values) to max(values), both ends included; (k,) float32.

    If min == max all centroids are equal; k == 1 gives the midpoint of the range.
    """
    k = check_k(k)
    v = as_numpy_1d(values, "values")
    if v.size == 0:
        raise ValueError("values is empty")
    lo, hi = float(v.min()), float(v.max())
    c = np.array([(lo + hi) / 2.0]) if k == 1 else np.linspace(lo, hi, k)
    return torch.from_numpy(c).to(torch.float32)


def kmeans(x: torch.Tensor, k: int, weights: torch.Tensor | None = None, *, method: str = "auto",
           generator: torch.Generator | None = None, n_init: int = 3, max_iter: int = 30) -> torch.Tensor:
    """The one k-means entry point: cluster the rows of x (N, D) into k centroids; returns (k, D) float32.

    method: ``"auto"`` (D == 1 -> ``"opt1d"``, else ``"kmeans++"``), ``"opt1d"`` (exact 1-D k-means,
    D must be 1), ``"kmeans++"`` (any D; ``n_init`` restarts of ``max_iter`` Lloyd iterations, randomness
    only from ``generator``) or ``"uniform"`` (D must be 1; weights ignored). Weights that are all zero
    count as uniform. With at most k distinct rows, those rows are the centroids (repeated to fill k).
    """
    if method not in _METHODS:
        raise ValueError(f"unknown k-means method {method!r}; allowed: {', '.join(map(repr, _METHODS))}")
    x = as_2d(x).detach()
    d = x.shape[1]
    if method == "auto":
        method = "opt1d" if d == 1 else "kmeans++"
    if method in ("opt1d", "uniform") and d != 1:
        raise ValueError(f"method {method!r} needs 1-D data (D == 1), got D = {d}")
    if weights is not None:
        weights = weights.detach().reshape(-1)
        if x.shape[0] and not bool((weights > 0).any()):
            weights = None
    if method == "opt1d":
        return kmeans_1d_exact(x[:, 0], k, weights).unsqueeze(1)
    if method == "uniform":
        return uniform_centroids(x[:, 0], k).unsqueeze(1)
    return kmeans_plus_plus(x, k, weights, n_init=n_init, max_iter=max_iter, generator=generator)
