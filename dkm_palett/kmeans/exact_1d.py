"""Globally optimal weighted 1-D k-means (exact; Lagrangian relaxation of the k-cluster DP).

torch and numpy do the work, except the two per-point loops, numba kernels in :mod:`exact_1d_kernels` that are
imported on first use (so importing this module does not import numba).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from dkm_palett.kmeans.inputs import as_numpy_1d, check_k, merge_duplicates, pad_centroids, weights_numpy

__all__ = ["kmeans_1d_exact"]


@functools.lru_cache(maxsize=None)
def _kernels():
    """numba-compiled ``(penalized_dp, trace_path)`` of :mod:`dkm_palett.kmeans.exact_1d_kernels`; numba is imported
    on first use only. Compiled code is cached on disk when a cache location is writable, else compiled once per
    process."""
    import numba

    from dkm_palett.kmeans import exact_1d_kernels

    def jit(fn):
        try:
            return numba.njit(cache=True, nogil=True)(fn)
        except RuntimeError:  # "cannot cache function ...: no locator available"
            return numba.njit(nogil=True)(fn)

    return jit(exact_1d_kernels.penalized_dp), jit(exact_1d_kernels.trace_path)


def _splice(P: np.ndarray, Q: np.ndarray, k: int) -> np.ndarray:
    """A k-cluster path from boundary paths P (c1 < k clusters) and Q (c2 > k) that are both optimal
    for the same penalty: some Q-edge (q_j, q_j+1) lies inside a P-edge (p_i, p_i+1) with j - i = k - c1
    (j - i grows by at most 1 per Q-edge, and only at such nested edges), and by the Monge inequality
    ``Q[:j+1] + P[i+1:]`` (k clusters) is optimal for that penalty too, hence for k clusters."""
    d = k - (P.shape[0] - 1)
    i = 0
    for j in range(Q.shape[0] - 1):
        while P[i + 1] <= Q[j]:
            i += 1
        if j - i == d and Q[j + 1] <= P[i + 1]:
            return np.concatenate((Q[: j + 1], P[i + 1:]))
    raise RuntimeError("internal error: no nested edge to splice")  # impossible by the argument above


def _optimal_bounds(x: np.ndarray, w: np.ndarray, W: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """Boundaries 0 = b_0 < ... < b_k = n of an optimal k-partition of sorted distinct points (1 < k < n),
    and the penalty that produced them; ``W`` is the prefix sum of ``w`` with a leading 0."""
    solve, trace = _kernels()
    n = x.shape[0]
    H = np.empty(n + 1)
    np.multiply(w, x, out=H[1:])
    s2 = float(np.dot(H[1:], x))
    S1 = _prefix(H[1:])
    idx = np.int32 if n < 2**31 - 1 else np.int64
    arg, cand, start = (np.empty(n + 1, dtype=idx) for _ in range(3))

    def run(lam):
        count = solve(W, S1, lam, H, arg, cand, start)
        return count, float(H[n]) + s2 - lam * count  # (clusters, SSE) of the penalised optimum

    # Known points on the lower convex hull of c -> OPT(c), the nearest ones with fewer / more than k
    # clusters: (count, SSE, penalty that produced them, path; None = trivial path).
    lo_c, lo_cost, lo_lam, lo_path = 1, s2 - S1[n] ** 2 / W[n], math.inf, None
    hi_c, hi_cost, hi_lam, hi_path = n, 0.0, 0.0, None
    lam = _first_penalty(x, W, S1, k)
    chord = not 0 < lam < math.inf
    stalls = 0
    while True:
        if chord:  # the penalty at which both hull points are equally good
            lam = (lo_cost - hi_cost) / (hi_c - lo_c)
        count, cost = run(lam)
        if count == k:
            return trace(arg, count), lam
        progress = lo_c < count < hi_c
        if progress:
            if count < k:
                lo_c, lo_cost, lo_lam, lo_path = count, cost, lam, trace(arg, count)
            else:
                hi_c, hi_cost, hi_lam, hi_path = count, cost, lam, trace(arg, count)
        elif chord:  # the chord is a hull edge: both ends are optimal for this penalty
            P = np.array([0, n]) if lo_path is None else lo_path
            Q = np.arange(n + 1) if hi_path is None else hi_path
            return _splice(P, Q, k), lam
        if chord:
            continue
        # Guesses, using count ~ lam^(-1/3): until both sides are known, aim past k by half the gap in
        # log scale (more after each step without progress); then secants in log-log. Chords (which
        # always progress) take over once a guess fails or leaves the bracket.
        if lo_path is None or hi_path is None:
            stalls = 0 if progress else stalls + 1
            lam *= (count / k) ** (3.0 * (1.0 + 0.5 * 2.0 ** stalls))
        elif progress:
            slope = math.log(hi_lam / lo_lam) / math.log(hi_c / lo_c)
            lam = lo_lam * math.exp(slope * math.log(k / lo_c))
        chord = not (progress or lo_path is None or hi_path is None) or not hi_lam < lam < lo_lam


def _first_penalty(x: np.ndarray, W: np.ndarray, S1: np.ndarray, k: int) -> float:
    """Guess of the penalty per cluster that yields k clusters. Large inputs: the penalty that gives k
    clusters for a coarsened instance, the means of ~64k cells (32k equal-weight, 32k equal-width). Otherwise ``-dOPT/dk =
    2 OPT(k) / k`` with the high-resolution (Panter-Dite) estimate ``OPT(k) ~ (int p^(1/3))^3 / (12 k^2)``,
    the density p read off 4k equal-weight cells."""
    n = x.shape[0]
    if n > 256 * k:
        m = np.arange(32 * k + 1) / (32 * k)
        cuts = np.unique(np.concatenate((np.searchsorted(W, W[n] * m),  # 0, ..., n
                                         np.searchsorted(x, x[0] + (x[-1] - x[0]) * m[1:-1]))))
        if cuts.shape[0] > k + 1:
            cw = np.diff(W[cuts])
            cx = np.diff(S1[cuts]) / cw
            if np.all(np.diff(cx) > 0):
                return _optimal_bounds(cx, cw, _prefix(cw), k)[1]
    m = min(4 * k, n - 1)
    edges = x[np.minimum(np.searchsorted(W, W[n] * np.arange(m + 1) / m), n - 1)]
    integral = float(np.sum(np.diff(edges) ** (2.0 / 3.0))) * (W[n] / m) ** (1.0 / 3.0)
    return integral ** 3 / (6.0 * k ** 3)


def _prefix(v: np.ndarray) -> np.ndarray:
    out = np.empty(v.shape[0] + 1)
    out[0] = 0.0
    np.cumsum(v, out=out[1:])
    return out


def _exact_1d_sorted(x: np.ndarray, w: np.ndarray, k: int) -> np.ndarray:
    """Optimal k-partition (k <= n) of sorted distinct points; returns the k cluster means (float64).
    Overwrites ``x`` and ``w`` (private copies)."""
    n = x.shape[0]
    if k == 1:
        return np.array([np.dot(w, x) / w.sum()])
    if k == n:
        return x.copy()
    w /= w.sum()
    W = _prefix(w)
    live = W[1:] > W[:-1]
    if not np.all(live):  # weights below float64 resolution of the prefix sums: no measurable effect
        x, w = x[live], w[live]
        if x.shape[0] <= k:
            return pad_centroids(x, k)
        W = _prefix(w)
    del live
    mean = float(np.dot(w, x))
    x -= mean
    scale = float(np.abs(x).max())
    x /= scale
    starts = _optimal_bounds(x, w, W, k)[0][:-1]
    del W
    return mean + scale * (np.add.reduceat(w * x, starts) / np.add.reduceat(w, starts))


def kmeans_1d_exact(values: torch.Tensor, k: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Globally optimal weighted 1-D k-means: minimises ``sum_i w_i (x_i - c_{a(i)})^2``.

    Returns exactly ``k`` centroids sorted ascending (float32), each the weighted mean of its
    cluster. With fewer than ``k`` distinct values (of positive weight) every distinct value is a
    centroid and the remaining slots repeat existing centroids.

    Algorithm (exact; Lagrangian relaxation of the k-cluster DP, cf. Gronlund et al., "Fast exact
    k-means, k-medians and Bregman divergence clustering in 1D", 2017): identical values are merged
    (weights summed), leaving n sorted distinct points, centred and scaled; float64 prefix sums of
    w and w*x give O(1) cluster costs. The cost is concave Monge, so ``OPT(c)`` is convex in the
    cluster count c and, for a penalty ``lam`` per cluster, the unconstrained optimum of
    ``SSE + lam * c`` (one pass over the points, `_penalized_dp`) is an optimal clustering for its
    own c. The first ``lam`` comes from a coarsened instance (large n) or a high-resolution estimate
    (`_first_penalty`), then power-law/secant guesses and finally chords of the convex hull of
    ``OPT`` until a pass returns exactly k clusters; if k lies inside a hull edge (no penalty gives
    k), the optimal paths at both ends of the edge are spliced into an optimal k-path (`_splice`).
    Unlike a layered DP (k passes, plus checkpointed recomputation to backtrack without an n x k
    table), the cost does not grow with k: usually one full-size pass (~0.1 s per million points),
    e.g. ~0.15 s for 2^20 distinct values and k = 256 on one core. Memory O(n): three float64 and
    three int32 arrays of n + 1 entries. The two kernels are compiled by numba on first use (cached
    on disk when a cache location is writable).
    """
    c = _kmeans_1d_exact_f64(values, k, weights)
    return torch.from_numpy(np.ascontiguousarray(c)).to(torch.float32)


def _kmeans_1d_exact_f64(values, k: int, weights=None) -> np.ndarray:
    """:func:`kmeans_1d_exact` returning float64 numpy centroids (used by tests and the dispatcher)."""
    k = check_k(k)
    if isinstance(values, torch.Tensor) and values.dim() > 1:
        if not (values.dim() == 2 and values.shape[1] == 1):
            raise ValueError(f"values must be 1-D (or (N, 1)), got shape {tuple(values.shape)}")
    x = as_numpy_1d(values, "values")
    xu, wu = merge_duplicates(x, None if weights is None else weights_numpy(weights, x.shape[0]))
    del x
    if xu.shape[0] <= k:
        return pad_centroids(xu, k)
    return _exact_1d_sorted(xu, wu, k)
