"""Clustering primitives for palettization.

* :func:`kmeans_1d_exact` -- globally optimal weighted 1-D k-means (dynamic programming).
* :func:`kmeans_plus_plus` -- weighted k-means++ seeding + weighted Lloyd iterations (any D).
* :func:`uniform_centroids` -- evenly spaced 1-D centroids.
* :func:`kmeans` -- dispatcher used by the DKM layer and post-training palettization.
* :func:`nearest_centroid`, :func:`weighted_sse` -- memory-bounded assignment helpers.

Only torch and numpy are used. All heavy work is vectorised; there are no per-element Python loops.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = [
    "kmeans_1d_exact",
    "kmeans_plus_plus",
    "uniform_centroids",
    "kmeans",
    "nearest_centroid",
    "weighted_sse",
]

_METHODS = ("auto", "opt1d", "kmeans++", "uniform")

# Distance entries per chunk in kmeans++ / Lloyd.
_LLOYD_CHUNK = 1 << 22
# Memory the exact 1-D DP may spend on int32 argmin rows before it switches to checkpointing
# (layers beyond the budget are recomputed during backtracking; see _exact_1d_sorted).
_DP_TABLE_BYTES = 256 << 20
# Certified pruning of the exact DP is tried when n >= max(_PRUNE_MIN_N, _PRUNE_K2 * k^2);
# its bin tables hold at most _PRUNE_MAX_ENTRIES float64 entries.
_PRUNE_MIN_N = 20000
_PRUNE_K2 = 16
_PRUNE_MAX_ENTRIES = 1 << 23
# ... and only when the predicted surviving fraction of points is below this.
_PRUNE_MAX_SURVIVORS = 0.5


# ----------------------------------------------------------------------------------------------
# input helpers
# ----------------------------------------------------------------------------------------------
def _check_k(k: int) -> int:
    if isinstance(k, bool) or int(k) != k or int(k) < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return int(k)


def _as_numpy_1d(values: torch.Tensor | np.ndarray, name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        arr = values.detach().to(device="cpu", dtype=torch.float64).reshape(-1).numpy()
    else:
        arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite (found NaN or inf)")
    return arr


def _weights_numpy(weights, n: int) -> np.ndarray:
    if weights is None:
        return np.ones(n, dtype=np.float64)
    w = _as_numpy_1d(weights, "weights")
    if w.shape[0] != n:
        raise ValueError(f"weights has {w.shape[0]} entries but there are {n} points")
    if np.any(w < 0):
        raise ValueError("weights must be >= 0")
    return w


def _merge_duplicates(x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct values among the points with positive weight, with summed weights."""
    keep = w > 0
    if not np.all(keep):
        x, w = x[keep], w[keep]
    if x.size == 0:
        raise ValueError("need at least one point with positive weight")
    order = np.argsort(x, kind="stable")
    xs, ws = x[order], w[order]
    first = np.empty(xs.shape[0], dtype=bool)
    first[0] = True
    np.not_equal(xs[1:], xs[:-1], out=first[1:])
    starts = np.flatnonzero(first)
    return xs[starts], np.add.reduceat(ws, starts)


def _pad_centroids(c: np.ndarray, k: int) -> np.ndarray:
    """Fill up to k centroids by repeating the existing ones cyclically; sorted for 1-D rows."""
    if c.shape[0] >= k:
        return c[:k]
    reps = np.resize(np.arange(c.shape[0]), k)
    out = c[reps]
    if out.ndim == 1:
        out = np.sort(out)
    return out


# ----------------------------------------------------------------------------------------------
# exact 1-D k-means
# ----------------------------------------------------------------------------------------------
def _level_argmin(pre: _Prefix, E: np.ndarray, rows: np.ndarray, lo: np.ndarray, hi: np.ndarray):
    """One divide & conquer level: for every row b (sorted ascending) with inclusive column range
    [lo, hi] (lo <= hi < b; ranges ordered, overlapping at most in one shared endpoint) return
    ``min_a E[a] - (S1[b]-S1[a])^2/(W[b]-W[a])`` and its argmin.

    The half-open ranges [lo, hi) and the gaps between them tile one contiguous block of columns, so
    the whole level is a handful of contiguous numpy passes (no fancy gathers over the big arrays);
    the right endpoints ``hi`` are evaluated separately (one candidate per row).
    """
    W, S1 = pre.W, pre.S1
    nseg = rows.shape[0]
    c0, c1 = int(lo[0]), int(hi[-1])
    # right endpoints (always valid)
    d = S1[rows] - S1[hi]
    best = E[hi] - d * d / (W[rows] - W[hi])
    arg = hi.copy()
    if c1 > c0:
        # pieces: [lo_s, hi_s) belongs to row s, [hi_s, lo_{s+1}) to a dummy row (ignored)
        lens = np.empty(2 * nseg, dtype=np.int64)
        lens[0::2] = hi - lo
        lens[1:-1:2] = lo[1:] - hi[:-1]
        lens[-1] = 0
        ids = np.empty(2 * nseg, dtype=np.int32)
        ids[0::2] = np.arange(nseg, dtype=np.int32)
        ids[1::2] = nseg
        seg = np.repeat(ids, lens)
        rS1 = np.append(S1[rows], 0.0)
        rW = np.append(W[rows], np.inf)
        dd = rS1[seg]
        dd -= S1[c0:c1]
        dw = rW[seg]
        dw -= W[c0:c1]
        dd *= dd
        dd /= dw
        val = np.empty(c1 - c0 + 1)  # one +inf sentinel so every piece start is a valid index
        np.subtract(E[c0:c1], dd, out=val[:-1])
        val[-1] = np.inf
        del dd, dw
        starts = np.cumsum(lens) - lens
        pmin = np.minimum.reduceat(val, starts[:-1])  # per piece (empty pieces: garbage, unused)
        real = lens[0::2] > 0
        m = pmin[0::2][real]
        mp = np.full(2 * nseg, np.nan)
        mp[0::2][real] = m
        lens[-1] = 1
        hit = np.flatnonzero(val == np.repeat(mp, lens))  # NaN never compares equal
        a_in = hit[np.searchsorted(hit, starts[0::2][real])] + c0
        better = m <= best[real]
        idx = np.flatnonzero(real)[better]
        best[idx] = m[better]
        arg[idx] = a_in[better]
    return best, arg


def _dp_layer(pre: _Prefix, E: np.ndarray, lower: np.ndarray, c_lo: int, b_lo: int, b_hi: int,
              D_out: np.ndarray, opt_out: np.ndarray) -> None:
    """Fill rows b in [b_lo, b_hi] (b_lo > c_lo) of a DP layer:

    ``D_out[b] = min_{a in [c_lo, b-1]} D_{m-1}[a] + cost(a, b)`` and ``opt_out[b]`` its argmin,
    given ``E = D_{m-1} - S2``. Uses divide & conquer over rows (the argmin is monotone in b), run
    level by level so that every recursion level is one vectorised pass; ``lower[b]`` (the argmin
    of layer m-1) is an extra lower bound on the argmin of layer m.
    """
    L = np.array([b_lo], dtype=np.int64)
    R = np.array([b_hi], dtype=np.int64)
    cL = np.array([c_lo], dtype=np.int64)
    cR = np.array([b_hi - 1], dtype=np.int64)
    S2 = pre.S2
    while L.shape[0]:
        mid = (L + R) >> 1
        hi = np.minimum(cR, mid - 1)
        lo = np.maximum.accumulate(np.maximum(cL, lower[mid]))
        np.minimum(lo, hi, out=lo)  # only bites if float noise broke monotonicity
        best, arg = _level_argmin(pre, E, mid, lo, hi)
        D_out[mid] = best + S2[mid]
        opt_out[mid] = arg
        # children, kept sorted by row: (L, mid-1, cL, arg) then (mid+1, R, arg, cR)
        nL = np.stack((L, mid + 1), axis=1).ravel()
        nR = np.stack((mid - 1, R), axis=1).ravel()
        ncL = np.stack((cL, arg), axis=1).ravel()
        ncR = np.stack((arg, cR), axis=1).ravel()
        keep = nL <= nR
        L, R, cL, cR = nL[keep], nR[keep], ncL[keep], ncR[keep]


class _Prefix:
    """Prefix sums (float64, leading zero) of weight, w*x and w*x^2 over sorted centred points.

    The cost of the cluster made of points ``a..b-1`` is
    ``S2[b]-S2[a] - (S1[b]-S1[a])**2 / (W[b]-W[a])``. A subset of the prefix positions is again
    a valid instance (consecutive points between kept positions act as one merged point), which is
    how both the coarse bins and the pruned problem are represented.
    """

    def __init__(self, W: np.ndarray, S1: np.ndarray, S2: np.ndarray):
        self.W, self.S1, self.S2 = W, S1, S2
        self.n = W.shape[0] - 1

    @classmethod
    def from_points(cls, x: np.ndarray, w: np.ndarray) -> "_Prefix":
        z = np.zeros(1)
        return cls(np.concatenate((z, np.cumsum(w))), np.concatenate((z, np.cumsum(w * x))),
                   np.concatenate((z, np.cumsum(w * x * x))))

    def subset(self, pos: np.ndarray) -> "_Prefix":
        return _Prefix(self.W[pos], self.S1[pos], self.S2[pos])

    def reversed(self) -> "_Prefix":
        """The mirrored instance (points in reverse order); costs are reflection invariant."""
        return _Prefix(self.W[-1] - self.W[::-1], self.S1[-1] - self.S1[::-1], self.S2[-1] - self.S2[::-1])

    def cost(self, a, b):
        dw = self.W[b] - self.W[a]
        d1 = self.S1[b] - self.S1[a]
        return np.maximum(self.S2[b] - self.S2[a] - d1 * d1 / dw, 0.0)

    def means(self) -> np.ndarray:
        return np.diff(self.S1) / np.diff(self.W)


def _optimal_bounds(pre: _Prefix, k: int) -> np.ndarray:
    """Exact DP: positions 0 = b_0 < ... < b_k = n of an optimal k-partition (2 <= k < n)."""
    n, S2 = pre.n, pre.S2
    # Layer m is only needed for rows b in [m, n-k+m] (every later cluster needs one point).
    # Argmin rows (int32) are kept for a block of `s` layers; DP rows at the block starts are
    # checkpointed and the earlier blocks are recomputed while backtracking.
    s = max(int(math.ceil(math.sqrt(max(k - 2, 1)))), _DP_TABLE_BYTES // (4 * (n + 1)), 1)
    ckpts = sorted({1} | {c for c in range(k - 1 - s, 1, -s)})
    ckpt_set = set(ckpts)
    store: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def run_layers(m_start, m_end, D_prev, opt_prev, b_cap, keep_from):
        """Compute layers m_start..m_end from layer m_start-1; keep argmin rows of layers > keep_from."""
        kept = {}
        for m in range(m_start, m_end + 1):
            b0, b1 = m, min(n - k + m, b_cap)
            D_new = np.full(n + 1, np.inf)
            opt_new = np.full(n + 1, m - 1, dtype=np.int64)
            if b0 <= b1:
                _dp_layer(pre, D_prev - S2, opt_prev, m - 1, b0, b1, D_new, opt_new)
            if m > keep_from:
                kept[m] = opt_new.astype(np.int32)
            if b_cap == n and m in ckpt_set:
                store[m] = (D_new, opt_new.astype(np.int32))
            D_prev, opt_prev = D_new, opt_new
        return D_prev, opt_prev, kept

    D1 = np.full(n + 1, np.inf)
    D1[1:n - k + 2] = pre.cost(0, np.arange(1, n - k + 2))
    store[1] = (D1, np.zeros(n + 1, dtype=np.int32))
    D_prev, _, kept = run_layers(2, k - 1, D1, np.zeros(n + 1, dtype=np.int64), n, ckpts[-1])

    # last layer: only row n
    a = np.arange(k - 1, n)
    tot = D_prev[a] - S2[a] - (pre.S1[n] - pre.S1[a]) ** 2 / (pre.W[n] - pre.W[a])
    b = int(a[int(np.argmin(tot))])
    bounds = [n, b]
    del D_prev
    m = k - 1
    while m >= 2:
        if m not in kept:
            c = max(c for c in ckpts if c <= m)
            D_c, opt_c = store[c]
            kept = {c: opt_c}
            if c < m:
                _, _, more = run_layers(c + 1, m, D_c, opt_c.astype(np.int64), b, c)
                kept.update(more)
            for c2 in [c2 for c2 in store if c2 >= c]:
                del store[c2]
        b = int(kept[m][b])
        bounds.append(b)
        m -= 1
    bounds.append(0)
    return np.array(bounds[::-1], dtype=np.int64)


def _partition_cost(pre: _Prefix, bounds: np.ndarray) -> float:
    return float(pre.cost(bounds[:-1], bounds[1:]).sum())


def _lloyd_polish(pre: _Prefix, bounds: np.ndarray, iters: int = 50) -> tuple[np.ndarray, float]:
    """Run 1-D Lloyd from the partition `bounds`; returns the best partition seen and its cost."""
    xs = pre.means()
    best, best_cost = bounds, _partition_cost(pre, bounds)
    for _ in range(iters):
        c = (pre.S1[bounds[1:]] - pre.S1[bounds[:-1]]) / (pre.W[bounds[1:]] - pre.W[bounds[:-1]])
        nb = np.concatenate(([0], np.searchsorted(xs, (c[:-1] + c[1:]) / 2, side="right"), [pre.n]))
        if np.any(np.diff(nb) <= 0) or np.array_equal(nb, bounds):
            break
        bounds = nb
        cost = _partition_cost(pre, bounds)
        if cost < best_cost:
            best, best_cost = bounds, cost
    return best, best_cost


def _relaxed_covers(pre: _Prefix, droppable: np.ndarray, cmax: int):
    """Lower bounds for covering prefixes of a binned instance (see `_prune`).

    Yields, for c = 0..cmax, T_c[J] = a lower bound on the cost of any partition of the points of
    bins [0, J) that uses at most c cut points, where a cut is a cluster boundary at a bin edge or a
    bin containing boundaries (such a bin is dropped: its points are ignored, which can only lower
    the cost). Runs of full bins between cuts are charged their exact cluster cost.
    """
    G, S2 = pre.n, pre.S2
    zeros = np.zeros(G + 1, dtype=np.int64)
    C = np.full(G + 1, np.inf)  # covers ending with a cut exactly at edge J
    C[0] = 0.0
    R = np.full(G + 1, np.inf)  # covers ending with a non-empty run of full bins
    R[1:] = pre.cost(0, np.arange(1, G + 1))
    T = np.minimum(R, C)
    yield T
    for _ in range(cmax):
        newC = C.copy()
        np.minimum(newC, R, out=newC)  # edge cut right after a run
        drop_from = np.minimum(R[:-1], C[:-1])  # run or cut ending at J-1, then bin J-1 dropped
        np.minimum(newC[1:], np.where(droppable, drop_from, np.inf), out=newC[1:])
        C = newC
        newR = np.full(G + 1, np.inf)
        opt = np.zeros(G + 1, dtype=np.int64)
        E = C - S2
        _dp_layer(pre, E, zeros, 0, 1, G, newR, opt)
        R = np.minimum(R, newR)
        T = np.minimum(R, C)
        yield T


def _prune(pre: _Prefix, k: int) -> np.ndarray | None:
    """Positions (sorted, incl. 0 and n) that can hold a boundary of an optimal k-partition.

    Exact, certified pruning. The points are grouped into G equal-count bins. An upper bound UB is
    the cost of the optimal partition over bin edges, polished by 1-D Lloyd on all points. For every
    bin (and bin edge) a lower bound on the cost of any partition whose m-th boundary lies there is
    the relaxed prefix cover plus the relaxed suffix cover (`_relaxed_covers`). Bins/edges whose
    bound exceeds UB cannot hold a boundary of any optimal partition, so the points between the
    remaining positions can be merged without changing the optimum. Returns None when pruning is
    not expected to pay off (it removes roughly all but ~4 k sqrt(b/n) of the points, b = n/G).
    """
    n = pre.n
    b = float(np.clip((1.5 * math.sqrt(n) / k) ** (2.0 / 3.0), 2.0, 256.0))
    G = int(min(n / b, _PRUNE_MAX_ENTRIES // k))
    if G < 4 * k or 4.0 * k * math.sqrt(1.0 / G) > _PRUNE_MAX_SURVIVORS:
        return None
    edges = np.unique(np.linspace(0, n, G + 1).round().astype(np.int64))
    G = edges.shape[0] - 1
    bins = pre.subset(edges)
    droppable = np.diff(edges) >= 2
    _, ub = _lloyd_polish(pre, edges[_optimal_bounds(bins, k)])
    thr = ub + 1e-9 * abs(ub) + 1e-12 * float(pre.S2[-1])

    fwd = np.empty((k - 1, G + 1))
    for c, T in enumerate(_relaxed_covers(bins, droppable, k - 2)):
        fwd[c] = T
    best_edge = np.full(G + 1, np.inf)
    best_int = np.full(G, np.inf)
    for c, Tr in enumerate(_relaxed_covers(bins.reversed(), droppable[::-1], k - 2)):
        # c cuts in the suffix <-> boundary index m = k-1-c, prefix uses m-1 = k-2-c cuts
        P = fwd[k - 2 - c]
        sfx = Tr[::-1]  # suffix cover starting at edge J
        np.minimum(best_edge, P + sfx, out=best_edge)
        np.minimum(best_int, P[:-1] + sfx[1:], out=best_int)
    del fwd
    keep = np.zeros(n + 1, dtype=bool)
    keep[[0, n]] = True
    keep[edges[best_edge <= thr]] = True
    live = np.flatnonzero((best_int <= thr) & droppable)
    if live.size:
        lens = edges[live + 1] - edges[live] - 1
        inner = np.repeat(edges[live] + 1 - np.cumsum(lens) + lens, lens) + np.arange(int(lens.sum()))
        keep[inner] = True
    return np.flatnonzero(keep)


def _exact_1d_sorted(x: np.ndarray, w: np.ndarray, k: int) -> np.ndarray:
    """Optimal k-partition (k <= n) of sorted distinct points; returns the k cluster means."""
    n = x.shape[0]
    mean = float(np.dot(w, x) / w.sum())
    if k == 1:
        return np.array([mean])
    if k == n:
        return x.copy()
    xc = x - mean
    scale = float(np.abs(xc).max())
    pre = _Prefix.from_points(xc / scale, w)
    pos = np.arange(n + 1)
    cur = pre
    if n >= max(_PRUNE_MIN_N, _PRUNE_K2 * k * k):
        keep = _prune(cur, k)
        if keep is not None and keep.shape[0] - 1 >= k:
            pos = pos[keep]
            cur = cur.subset(keep)
    bounds = pos[_optimal_bounds(cur, k)]
    sw = pre.W[bounds[1:]] - pre.W[bounds[:-1]]
    s1 = pre.S1[bounds[1:]] - pre.S1[bounds[:-1]]
    return s1 / sw * scale + mean


def kmeans_1d_exact(values: torch.Tensor, k: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Globally optimal weighted 1-D k-means: minimises ``sum_i w_i (x_i - c_{a(i)})^2``.

    Returns exactly ``k`` centroids sorted ascending (float32), each the weighted mean of its
    cluster. With fewer than ``k`` distinct values (of positive weight) every distinct value is a
    centroid and the remaining slots repeat existing centroids.

    Algorithm: identical values are merged (weights summed), leaving n sorted distinct points.
    Data are centred/scaled and float64 prefix sums give O(1) cluster costs. Layer m of the DP,
    ``D_m(b) = min_a D_{m-1}(a) + cost(a, b)``, has an argmin monotone in b, so each layer is solved
    by divide & conquer over rows, executed level by level (one contiguous vectorised numpy pass
    per level, plus the bound ``argmin_{m-1}(b) <= argmin_m(b)``): time O(k n log n) + O(n log n)
    sort, no per-point Python loop. When n >> k^2 an exact, certified pruning step first removes
    the points that cannot be next to a boundary of any optimal partition (lower bounds from a
    relaxed DP over equal-count bins vs. an upper bound; see ``_prune``) -- typically >75% of them.
    Memory O(n sqrt(k)): the int32 argmin rows of the last block of
    ``s = max(sqrt(k), _DP_TABLE_BYTES / 4n)`` layers are kept, DP rows at earlier block starts are
    checkpointed, and those blocks are recomputed (only up to the row still needed) while
    backtracking -- no k x n table is stored once k * n * 4 bytes exceeds that budget.
    """
    c = _kmeans_1d_exact_f64(values, k, weights)
    return torch.from_numpy(np.ascontiguousarray(c)).to(torch.float32)


def _kmeans_1d_exact_f64(values, k: int, weights=None) -> np.ndarray:
    """:func:`kmeans_1d_exact` returning float64 numpy centroids (used by tests and the dispatcher)."""
    k = _check_k(k)
    if isinstance(values, torch.Tensor) and values.dim() > 1:
        if not (values.dim() == 2 and values.shape[1] == 1):
            raise ValueError(f"values must be 1-D (or (N, 1)), got shape {tuple(values.shape)}")
    x = _as_numpy_1d(values, "values")
    w = _weights_numpy(weights, x.shape[0])
    xu, wu = _merge_duplicates(x, w)
    if xu.shape[0] <= k:
        return _pad_centroids(xu, k)
    return _exact_1d_sorted(xu, wu, k)


# ----------------------------------------------------------------------------------------------
# assignment helpers
# ----------------------------------------------------------------------------------------------
def _as_2d(x: torch.Tensor, name: str = "x") -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x)
    if x.dim() == 1:
        x = x.unsqueeze(1)
    if x.dim() != 2:
        raise ValueError(f"{name} must have shape (N, D), got {tuple(x.shape)}")
    return x


def nearest_centroid(x: torch.Tensor, centroids: torch.Tensor, *, max_chunk_elems: int = 2**24) -> torch.Tensor:
    """Index (int64, shape (N,)) of the nearest centroid (Euclidean) for every row of x.

    ``x`` is (N, D) (1-D means D = 1), ``centroids`` (K, D). Ties go to the lower centroid index.
    D == 1 uses sort + searchsorted (O(N log K), exact distances ``|x - c|`` in float64); D > 1
    computes squared distances in float64 chunks of at most ``max_chunk_elems`` entries.
    """
    x = _as_2d(x)
    c = _as_2d(centroids, "centroids")
    if x.shape[1] != c.shape[1]:
        raise ValueError(f"x has D={x.shape[1]} but centroids have D={c.shape[1]}")
    if c.shape[0] == 0:
        raise ValueError("need at least one centroid")
    device = x.device
    x = x.detach().to(torch.float64)
    c = c.detach().to(device=device, dtype=torch.float64)
    n, kc = x.shape[0], c.shape[0]
    if n == 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    if x.shape[1] == 1:
        cv = c[:, 0]
        order = torch.argsort(cv, stable=True)
        cs = cv[order]
        # first sorted position of every group of equal centroid values (lowest original index)
        pos = torch.arange(kc, device=device)
        new_group = torch.ones(kc, dtype=torch.bool, device=device)
        new_group[1:] = cs[1:] != cs[:-1]
        first = torch.cummax(torch.where(new_group, pos, torch.zeros_like(pos)), 0).values
        out = torch.empty(n, dtype=torch.int64, device=device)
        step = max(1, int(max_chunk_elems) // 4)
        for s in range(0, n, step):
            xv = x[s:s + step, 0]
            right = torch.searchsorted(cs, xv).clamp_(max=kc - 1)  # first value >= x
            left = first[(right - 1).clamp_(min=0)]
            right = first[right]
            dl = (xv - cs[left]).abs()
            dr = (xv - cs[right]).abs()
            il, ir = order[left], order[right]
            take_left = (dl < dr) | ((dl == dr) & (il < ir))
            out[s:s + step] = torch.where(take_left, il, ir)
        return out
    out = torch.empty(n, dtype=torch.int64, device=device)
    c_sq = (c * c).sum(1)
    step = max(1, int(max_chunk_elems) // kc)
    for s in range(0, n, step):
        xs = x[s:s + step]
        d = torch.addmm(c_sq.unsqueeze(0), xs, c.t(), alpha=-2.0)  # |c|^2 - 2 x.c  (+|x|^2 const)
        out[s:s + step] = torch.argmin(d, dim=1)
    return out


def weighted_sse(x: torch.Tensor, centroids: torch.Tensor, weights: torch.Tensor | None = None) -> float:
    """Weighted sum of squared distances of the rows of x (N, D) to their nearest centroid."""
    x = _as_2d(x).detach().to(torch.float64)
    c = _as_2d(centroids, "centroids").detach().to(device=x.device, dtype=torch.float64)
    idx = nearest_centroid(x, c)
    total = 0.0
    step = 1 << 20
    w = None if weights is None else weights.detach().reshape(-1).to(device=x.device, dtype=torch.float64)
    for s in range(0, x.shape[0], step):
        d = ((x[s:s + step] - c[idx[s:s + step]]) ** 2).sum(1)
        total += float((d if w is None else d * w[s:s + step]).sum())
    return total


# ----------------------------------------------------------------------------------------------
# k-means++ (any dimension)
# ----------------------------------------------------------------------------------------------
def _sq_dist_to(xt32: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """|x - center|^2 (float32) for all points; ``xt32`` is x transposed (D, N), so every pass is
    contiguous and exact copies of the centre get exactly 0."""
    c = center.to(torch.float32)
    d = (xt32[0] - c[0]).square_()
    for j in range(1, xt32.shape[0]):
        d.add_((xt32[j] - c[j]).square_())
    return d


def _sample_index(p: torch.Tensor, generator: torch.Generator | None) -> int:
    """One index drawn with probability proportional to p (>= 0) using only `generator`."""
    cdf = torch.cumsum(p, 0)
    u = torch.rand((), generator=generator, dtype=torch.float64) * cdf[-1]
    return int(torch.searchsorted(cdf, u.reshape(1), right=True).clamp_(max=p.shape[0] - 1))


def _kpp_seed(x, xt32, w, k, generator) -> torch.Tensor:
    """Weighted k-means++ seeding (P ~ w * D^2). Returns fewer than k rows iff x has fewer than k
    distinct rows (then every row coincides with a returned seed)."""
    centers = [x[_sample_index(w, generator)]]
    best = _sq_dist_to(xt32, centers[0])
    for _ in range(1, k):
        p = w * best
        if not bool(p.sum() > 0):  # every point coincides with a chosen centre
            break
        c = x[_sample_index(p, generator)]
        centers.append(c)
        torch.minimum(best, _sq_dist_to(xt32, c), out=best)
    return torch.stack(centers)


def _assign(x32, x_sq32, c, chunk) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centre index and squared distance per row (chunked float32 matmul)."""
    n, kc = x32.shape[0], c.shape[0]
    idx = torch.empty(n, dtype=torch.int64)
    dist = torch.empty(n, dtype=torch.float32)
    c32 = c.to(torch.float32)
    c_sq = (c32 * c32).sum(1)
    step = max(1, chunk // kc)
    for s in range(0, n, step):
        d = torch.addmm(c_sq.unsqueeze(0), x32[s:s + step], c32.t(), alpha=-2.0)
        v, i = torch.min(d, dim=1)
        idx[s:s + step] = i
        dist[s:s + step] = (v + x_sq32[s:s + step]).clamp_(min=0.0)
    return idx, dist


def _exact_sse(x, w, c, idx) -> float:
    total = 0.0
    step = 1 << 20
    for s in range(0, x.shape[0], step):
        d = ((x[s:s + step] - c[idx[s:s + step]]) ** 2).sum(1)
        total += float((d * w[s:s + step]).sum())
    return total


def _lloyd(x, x32, x_sq32, w, c, max_iter, chunk) -> tuple[torch.Tensor, float]:
    """Weighted Lloyd iterations (float64 centroid updates); returns centres and weighted SSE."""
    k = c.shape[0]
    prev = None
    for _ in range(max_iter):
        idx, dist = _assign(x32, x_sq32, c, chunk)
        wsum = torch.zeros(k, dtype=torch.float64).index_add_(0, idx, w)
        sums = torch.zeros_like(c).index_add_(0, idx, x * w.unsqueeze(1))
        nonempty = wsum > 0
        new_c = c.clone()
        new_c[nonempty] = sums[nonempty] / wsum[nonempty].unsqueeze(1)
        empty = torch.nonzero(~nonempty).flatten()
        if empty.numel():
            # re-seed empty clusters at the points with the largest weighted error
            far = torch.topk(w * dist.to(torch.float64), min(int(empty.numel()), x.shape[0])).indices
            new_c[empty[: far.numel()]] = x[far]
        converged = prev is not None and empty.numel() == 0 and torch.equal(idx, prev)
        c, prev = new_c, idx
        if converged:
            break
    idx, _ = _assign(x32, x_sq32, c, chunk)
    return c, _exact_sse(x, w, c, idx)


def kmeans_plus_plus(x: torch.Tensor, k: int, weights: torch.Tensor | None = None, *, n_init: int = 3,
                     max_iter: int = 30, generator: torch.Generator | None = None) -> torch.Tensor:
    """Weighted k-means++ seeding (P ~ w * D^2) + weighted Lloyd iterations; best of ``n_init``
    restarts by weighted SSE. ``x`` is (N, D); returns (k, D) float32.

    Randomness comes only from ``generator`` (reproducible for a seeded generator). Duplicate rows
    are merged first; with fewer than k distinct rows (of positive weight) all of them are returned
    and the remaining slots repeat them. Empty clusters are re-seeded at the points with the largest
    weighted error. Distances are computed in float64 chunks (memory O(N D + chunk)).
    """
    k = _check_k(k)
    if int(n_init) < 1 or int(max_iter) < 0:
        raise ValueError("n_init must be >= 1 and max_iter >= 0")
    x = _as_2d(x).detach().to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x must be finite (found NaN or inf)")
    w = torch.from_numpy(_weights_numpy(weights, x.shape[0]))
    keep = w > 0
    if not bool(keep.all()):
        x, w = x[keep], w[keep]
    if x.shape[0] == 0:
        raise ValueError("need at least one point with positive weight")
    x32 = x.to(torch.float32)
    xt32 = x32.t().contiguous()
    x_sq32 = (x32 * x32).sum(1)
    best_c, best_sse = None, math.inf
    for _ in range(int(n_init)):
        c = _kpp_seed(x, xt32, w, k, generator)
        if c.shape[0] < k:  # fewer distinct rows than k: the seeds are exactly the distinct rows
            order = np.lexsort(c.numpy().T[::-1])
            return torch.from_numpy(_pad_centroids(c.numpy()[order], k)).to(torch.float32)
        c, sse = _lloyd(x, x32, x_sq32, w, c, int(max_iter), _LLOYD_CHUNK)
        if sse < best_sse:
            best_c, best_sse = c, sse
    if best_c.shape[1] == 1:
        best_c = torch.sort(best_c, dim=0).values
    return best_c.to(torch.float32)


# ----------------------------------------------------------------------------------------------
# uniform + dispatcher
# ----------------------------------------------------------------------------------------------
def uniform_centroids(values: torch.Tensor, k: int) -> torch.Tensor:
    """k evenly spaced centroids from min(values) to max(values), both ends included; (k,) float32.

    If min == max all centroids are equal; k == 1 gives the midpoint of the range.
    """
    k = _check_k(k)
    v = _as_numpy_1d(values, "values")
    if v.size == 0:
        raise ValueError("values is empty")
    lo, hi = float(v.min()), float(v.max())
    c = np.array([(lo + hi) / 2.0]) if k == 1 else np.linspace(lo, hi, k)
    return torch.from_numpy(c).to(torch.float32)


def kmeans(x: torch.Tensor, k: int, weights: torch.Tensor | None = None, *, method: str = "auto",
           generator: torch.Generator | None = None, opt1d_threshold: int | None = None) -> torch.Tensor:
    """Cluster the rows of x (N, D) into k centroids; returns (k, D) float32.

    method: ``"auto"`` (D == 1 -> ``"opt1d"``, else ``"kmeans++"``), ``"opt1d"`` (exact 1-D DP,
    D must be 1), ``"kmeans++"`` (any D) or ``"uniform"`` (D must be 1; weights ignored).
    ``opt1d_threshold`` is accepted for API compatibility and currently unused.
    """
    if method not in _METHODS:
        raise ValueError(f"unknown k-means method {method!r}; allowed: {', '.join(map(repr, _METHODS))}")
    x = _as_2d(x)
    d = x.shape[1]
    if method == "auto":
        method = "opt1d" if d == 1 else "kmeans++"
    if method in ("opt1d", "uniform") and d != 1:
        raise ValueError(f"method {method!r} needs 1-D data (D == 1), got D = {d}")
    if method == "opt1d":
        return kmeans_1d_exact(x[:, 0], k, weights).unsqueeze(1)
    if method == "uniform":
        return uniform_centroids(x[:, 0], k).unsqueeze(1)
    return kmeans_plus_plus(x, k, weights, generator=generator)
