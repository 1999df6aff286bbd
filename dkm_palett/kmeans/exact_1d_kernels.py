"""The numba kernels of exact 1-D k-means (:mod:`dkm_palett.kmeans.exact_1d`): the penalised DP and its path.

Imported on first use by ``exact_1d._kernels``, which compiles the two kernels (so importing ``dkm_palett`` does not
import numba). The helpers are inlined into the DP (``inline="always"``), so the compiled loop is the one a single
function would give.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(inline="always")
def _wins(H, W, S1, hb, wb, sb, c, p):
    """Whether the new candidate (``hb, wb, sb`` = its ``H, W, S1``) beats candidate ``c`` at row ``p``."""
    d1 = S1[p] - sb
    d2 = S1[p] - S1[c]
    return hb - d1 * d1 / (W[p] - wb) < H[c] - d2 * d2 / (W[p] - W[c])


@numba.njit(inline="always")
def _first_winning_row(H, W, S1, hb, wb, sb, c, lo, hi, n):
    """The first row after ``lo`` (where the new candidate loses to ``c``) at which it wins, below ``hi``; ``n + 1``
    when it never does. Gallops (checking row ``n`` first when the crossover is far away, so hopeless candidates
    are dropped early), then bisects."""
    step = 1
    while lo + step < hi:
        if step == 16 and hi > n:
            if not _wins(H, W, S1, hb, wb, sb, c, n):
                lo = n
                break
            hi = n
            if lo + step >= hi:
                break
        p = lo + step
        if _wins(H, W, S1, hb, wb, sb, c, p):
            hi = p
            break
        lo = p
        step *= 2
    while hi - lo > 1:
        p = (lo + hi) >> 1
        if _wins(H, W, S1, hb, wb, sb, c, p):
            hi = p
        else:
            lo = p
    return hi


@numba.njit(inline="always")
def _add_candidate(H, W, S1, cand, start, t, b, n):
    """Push row ``b`` as a candidate onto the deque ``cand/start`` (last entry ``t``): pop the candidates it beats
    from their first row on, then start it at its crossover with the last survivor. Returns the new last entry."""
    hb = H[b]
    wb = W[b]
    sb = S1[b]
    hi = n + 1  # first row where b is known to win (n + 1: none known)
    while True:
        c = cand[t]
        s = start[t]
        if s <= b:
            s = b + 1
        if _wins(H, W, S1, hb, wb, sb, c, s):
            if start[t] > b:  # b wins all of c's rows: drop c
                hi = start[t]
                t -= 1
                continue
            t += 1  # c is the front (owns row b); b takes over from row b + 1
            cand[t] = b
            start[t] = b + 1
            break
        hi = _first_winning_row(H, W, S1, hb, wb, sb, c, s, hi, n)
        if hi <= n:
            t += 1
            cand[t] = b
            start[t] = hi
        break
    return t


def penalized_dp(W, S1, lam, H, arg, cand, start):
    """Optimal partition of prefix positions 0..n into any number of clusters at cost ``SSE + lam * count``.

    ``W``/``S1`` are prefix sums (leading 0) of w and w*x; ``H[b] = F(b) - S2[b]`` where F(b) is the optimal
    penalised cost of the first b points, so ``F(b) = min_a F(a) + cost(a, b) + lam`` becomes
    ``H[b] = min_a H[a] + lam - (S1[b]-S1[a])^2 / (W[b]-W[a])``. ``arg[b]`` is that argmin; returns the
    cluster count of the optimum for all n points.

    The cost is concave Monge, so of two candidates a < a' the later one is better on a suffix of rows.
    The deque ``cand/start`` holds the candidates that are still best somewhere, each with the first
    row it owns (:func:`_add_candidate`). Ties keep the older candidate (deterministic). About 5 cost evaluations
    per point, O(n log n) worst case.
    """
    n = W.shape[0] - 1
    H[0] = 0.0
    f = 0
    t = 0
    cand[0] = 0
    start[0] = 1
    for b in range(1, n + 1):
        while f < t and start[f + 1] <= b:
            f += 1
        a = cand[f]
        d = S1[b] - S1[a]
        H[b] = H[a] + lam - d * d / (W[b] - W[a])
        arg[b] = a
        if b == n:
            break
        t = _add_candidate(H, W, S1, cand, start, t, b, n)
    count = 0
    b = n
    while b > 0:
        b = arg[b]
        count += 1
    return count


def trace_path(arg, count):
    """Boundaries 0 = b_0 < ... < b_count = n of the optimum that :func:`penalized_dp` left in ``arg``."""
    out = np.empty(count + 1, dtype=np.int64)
    b = arg.shape[0] - 1
    for m in range(count, 0, -1):
        out[m] = b
        b = arg[b]
    out[0] = b
    return out
