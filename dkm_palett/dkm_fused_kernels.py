"""The numba kernels of the exact fused DKM (:mod:`dkm_palett.dkm_fused` runs them): one pass over the weights
per k-means iteration, forward and backward.

Each pass walks the weights in blocks of ``BLOCK`` points and computes, per block, the distances to the ``K``
centroids, the softmax and the per-centroid sums it needs, so no ``N x K`` tensor is ever built and nothing per
weight is kept between forward and backward (the backward recomputes the attention from the weight).

Exactness: float32 throughout, within float32 rounding of the float64 reference (tests/test_dkm_engines.py). The
softmax is shifted by the nearest centroid's squared distance and evaluated in base 2 (``2^t`` by exponent bits and
a degree-6 polynomial, within 2 ulp, vectorisable, unlike libm's ``exp``); fused multiply-add is allowed
(``fastmath={"contract"}``), nothing else that reorders float math. The per-centroid sums add float32 per-lane
partials in float64. Work is split into fixed chunks of ``CHUNK`` points whose partial sums are added in a fixed
order, so results do not depend on the thread count.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic
from numpy.polynomial import Chebyshev, Polynomial

BLOCK = 512  # points per block (the (K, BLOCK) rows stay in L2; 512 measured faster than 128-256: fewer loop set-ups)
CHUNK = 64 * BLOCK  # points per work item (fixed, so the summation order is fixed)

_LOG2E = 1.4426950408889634
# Softmax terms under 2^-64 of the largest (which is 1) are 0: far below float32 rounding of their sum, and it keeps
# denormal numbers (which cost a slow microcode assist per operation on x86) out of the products that use them.
_EXP2_MIN = np.float32(-64.0)
# 1.5 * 2^23 + 127: adding it to t in [-64, 0] rounds t to an integer n and leaves n + 127 (2^n's biased exponent)
# in the low bits (the 1.5 keeps the sum in [2^23, 2^24) for negative t; bits(1.5 * 2^23) << 23 wraps to 0)
_ROUND = np.float32(1.5 * 2 ** 23 + 127)
# 2^f for |f| <= 1/2: the degree-6 polynomial interpolating it at the Chebyshev points (near-minimax: 2.5e-9
# relative in float64; evaluated in float32, 1.8 units of 2^-24, against 1.5 for the degree-7 Taylor polynomial)
_P = tuple(np.float32(v) for v in Chebyshev.interpolate(lambda f: np.exp2(f), 6, domain=[-0.5, 0.5])
           .convert(kind=Polynomial, domain=[-1, 1], window=[-1, 1]).coef)
# The kernels allow fused multiply-add (more accurate, not less) and nothing else that reorders float math.
_FAST = {"contract"}


@intrinsic
def _f32_from_bits(typingctx, bits):
    """Reinterpret an int32 as float32 (builds ``2^n`` from its exponent bits)."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@intrinsic
def _bits_from_f32(typingctx, value):
    """Reinterpret a float32 as int32 (reads the integer :func:`_exp2_nonpos`'s rounding leaves in the bits)."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


@numba.njit(inline="always", fastmath=_FAST)
def _exp2_nonpos(t):
    """``2^t`` for float32 ``t <= 0`` (slightly positive rounding noise allowed): ``2^n * 2^f`` with ``|f| <= 1/2``
    and a degree-6 polynomial; 0 below ``_EXP2_MIN``.

    ``y = t + _ROUND`` rounds ``t`` to the nearest integer ``n`` (float32 spacing is 1 in ``[2^23, 2^24)``) and
    leaves ``n + 127`` in ``y``'s low bits, so ``bits(y) << 23`` is ``2^n``'s float32 bit pattern and
    ``f = t - (y - _ROUND)`` is exact: 4 vector operations for what ``floor``, a conversion and integer arithmetic
    took 6."""
    tc = t if t > _EXP2_MIN else _EXP2_MIN
    y = tc + _ROUND
    f = tc - (y - _ROUND)
    p = _P[6]
    p = p * f + _P[5]
    p = p * f + _P[4]
    p = p * f + _P[3]
    p = p * f + _P[2]
    p = p * f + _P[1]
    p = p * f + _P[0]
    e = p * _f32_from_bits(_bits_from_f32(y) << np.int32(23))
    return e if t > _EXP2_MIN else np.float32(0.0)


@numba.njit(inline="always", fastmath=_FAST)
def _nearest(xs, n, c, m):
    """``m[:n]``: each point's squared distance to its nearest centroid (the softmax's shift)."""
    for i in range(n):
        m[i] = np.inf
    for k in range(c.shape[0]):
        ck = c[k]
        for i in range(n):
            d = xs[i] - ck
            q = d * d
            m[i] = q if q < m[i] else m[i]  # a select, which vectorises (min() on floats does not)


@numba.njit(inline="always", fastmath=_FAST)
def _terms(xs, n, c, tau, lam, a, r, m, tot):
    """Unnormalised softmax terms ``a[k, :n]`` of the points ``xs`` to the centroids ``c (K,)`` and ``tot[:n]`` = one
    over their sum; with palett_lambda also the robust weights ``r[k, :n] = 1 / (1 + lam * d / tau)``.

    ``softmax(-d / tau)`` with ``d = (x - c_k)^2`` is evaluated as ``2^((d_min - d) log2(e) / tau)`` normalised:
    the nearest centroid's distance is the softmax's shift, and the squared distances are recomputed rather than
    stored (cheaper than a pass over memory)."""
    s = np.float32(_LOG2E / tau)
    _nearest(xs, n, c, m)
    for i in range(n):
        tot[i] = 0
    for k in range(c.shape[0]):
        ck = c[k]
        ak = a[k]
        for i in range(n):
            d = xs[i] - ck
            e = _exp2_nonpos((m[i] - d * d) * s)
            ak[i] = e
            tot[i] += e
        if lam > 0:
            rk = r[k]
            for i in range(n):
                d = xs[i] - ck
                rk[i] = np.float32(1.0) / (np.float32(1.0) + lam * ((d * d) / tau))
    for i in range(n):
        tot[i] = np.float32(1.0) / tot[i]


@numba.njit(inline="always", fastmath=_FAST)
def _point_weights(om_rows, om_cols, om_floor, b0, n, tot):
    """``tot[:n] *= om_rows[p // C] * om_cols[p % C] + om_floor`` for the points ``p = b0 .. b0 + n - 1``: the
    block's normalisers times its point weights, made from their factors (:mod:`dkm_palett.dkm_sensitivity`) one
    stretch of a row at a time, so the inner loop runs over contiguous columns."""
    cols = om_cols.shape[0]
    row, col, done = b0 // cols, b0 % cols, 0
    while done < n:
        stretch = min(n - done, cols - col)
        weight = om_rows[row]
        for i in range(stretch):
            tot[done + i] *= weight * om_cols[col + i] + om_floor
        done += stretch
        row += 1
        col = 0


@numba.njit(inline="always")
def _scratch(k):
    """A block's ``(a, r, m, tot)``: the terms and robust weights ``(K, BLOCK)``, shifts and normalisers."""
    return (np.empty((k, BLOCK), np.float32), np.empty((k, BLOCK), np.float32), np.empty(BLOCK, np.float32),
            np.empty(BLOCK, np.float32))


@numba.njit(parallel=True, cache=True, fastmath=_FAST)
def _sums_kernel(x, c, tau, lam, om_rows, om_cols, om_floor, weighted, s_out, z_out):
    """One k-means iteration's sums per work item: ``s[k] = sum_i w_ik x_i``, ``z[k] = sum_i w_ik`` with
    ``w = a`` (times ``r`` with palett_lambda; times the point weight ``om_rows[g, i // C] * om_cols[i % C] +
    om_floor`` when ``weighted``, otherwise ``om_*`` are not read). ``s_out``, ``z_out``: ``(G * items, K)``
    float64."""
    groups, n = x.shape
    k_n = c.shape[1]
    items = (n + CHUNK - 1) // CHUNK
    for job in numba.prange(groups * items):
        g, lo = job // items, (job % items) * CHUNK
        a, r, m, tot = _scratch(k_n)
        acc_s = np.zeros((k_n, BLOCK), np.float32)
        acc_z = np.zeros((k_n, BLOCK), np.float32)
        wx = np.empty(BLOCK, np.float32)
        for b0 in range(lo, min(n, lo + CHUNK), BLOCK):
            nb = min(BLOCK, n - b0)
            xs = x[g, b0:b0 + nb]
            _terms(xs, nb, c[g], tau, lam, a, r, m, tot)  # a unnormalised, tot = 1 / sum
            if weighted:  # the point weights fold into the normaliser: no extra work per centroid
                _point_weights(om_rows[g], om_cols, om_floor, b0, nb, tot)
            for i in range(nb):
                wx[i] = xs[i] * tot[i]
            for k in range(k_n):
                ak, rk, sk, zk = a[k], r[k], acc_s[k], acc_z[k]
                if lam > 0:
                    for i in range(nb):
                        w = ak[i] * rk[i]
                        sk[i] += w * wx[i]
                        zk[i] += w * tot[i]
                else:
                    for i in range(nb):
                        sk[i] += ak[i] * wx[i]
                        zk[i] += ak[i] * tot[i]
        for k in range(k_n):
            s_out[job, k] = acc_s[k].astype(np.float64).sum()
            z_out[job, k] = acc_z[k].astype(np.float64).sum()


@numba.njit(parallel=True, cache=True, fastmath=_FAST)
def _table_kernel(x, c, cq, tau, out, sq_out):
    """The output ``out[g, i] = sum_k a(x_i; c)_k cq_k`` (the softmax terms summed as they are made, then
    normalised: no attention rows), and per work item ``sq_out[job] = sum_i (out_i - x_i)^2`` (the layer's RMS
    clustering error, from values already in registers)."""
    groups, n = x.shape
    k_n = c.shape[1]
    items = (n + CHUNK - 1) // CHUNK
    s = np.float32(_LOG2E / tau)
    for job in numba.prange(groups * items):
        g, lo = job // items, (job % items) * CHUNK
        m, tot, acc = np.empty(BLOCK, np.float32), np.empty(BLOCK, np.float32), np.empty(BLOCK, np.float32)
        sq = np.zeros(BLOCK, np.float32)
        for b0 in range(lo, min(n, lo + CHUNK), BLOCK):
            nb = min(BLOCK, n - b0)
            xs = x[g, b0:b0 + nb]
            _nearest(xs, nb, c[g], m)
            tot[:nb] = 0
            acc[:nb] = 0
            for k in range(k_n):
                ck, q = c[g, k], cq[g, k]
                for i in range(nb):
                    d = xs[i] - ck
                    e = _exp2_nonpos((m[i] - d * d) * s)
                    tot[i] += e
                    acc[i] += e * q
            o = out[g, b0:b0 + nb]
            for i in range(nb):
                o[i] = acc[i] / tot[i]
                d = o[i] - xs[i]
                sq[i] += d * d
        sq_out[job] = sq.astype(np.float64).sum()


@numba.njit(inline="always", fastmath=_FAST)
def _terms_moments(xs, ys, n, c, tau, alpha, beta, table, a, m, tot, dot, pb):
    """:func:`_terms` without palett_lambda, with the backward's per-point sums made in the same loop (no second
    pass over the terms): ``dot[:n] = sum_k w_k (alpha_k + beta_k y)`` (``sum_k w_k beta_k y`` in the ``table``
    pass, whose ``alpha`` is 0) and ``pb[:n] = sum_k a_k beta_k``, unnormalised (``tot`` = one over the sum of the
    terms)."""
    s = np.float32(_LOG2E / tau)
    _nearest(xs, n, c, m)
    for i in range(n):
        tot[i] = 0
        dot[i] = 0
        pb[i] = 0
    for k in range(c.shape[0]):
        ck, al, be, ak = c[k], alpha[k], beta[k], a[k]
        if table:  # alpha is 0 there: one multiply-add per term fewer than the loop below
            for i in range(n):
                d = xs[i] - ck
                e = _exp2_nonpos((m[i] - d * d) * s)
                ak[i] = e
                tot[i] += e
                pb[i] += e * be
        else:
            for i in range(n):
                d = xs[i] - ck
                e = _exp2_nonpos((m[i] - d * d) * s)
                ak[i] = e
                tot[i] += e
                dot[i] += e * al
                pb[i] += e * be
    for i in range(n):
        t = np.float32(1.0) / tot[i]
        tot[i] = t
        dot[i] = t * (dot[i] + ys[i] * pb[i])


@numba.njit(inline="always", fastmath=_FAST)
def _robust_attention(a, r, tot, totw, ys, nb, alpha, beta, dot, g_direct):
    """With palett_lambda, from the unnormalised terms ``a``, robust weights ``r`` and ``tot`` = one over the sum of
    the terms: ``dot = sum_k w_k r_k dL/dw_k`` with ``dL/dw_k = alpha_k + beta_k y``, and ``x``'s direct share
    ``g_direct = sum_k w_k r_k beta_k`` (times the point weight: ``totw``)."""
    dot[:nb] = 0
    g_direct[:nb] = 0
    for k in range(a.shape[0]):
        ak, rk, al, be = a[k], r[k], alpha[k], beta[k]
        for i in range(nb):
            g_direct[i] += ak[i] * totw[i] * rk[i] * be
            dot[i] += ak[i] * tot[i] * (al + be * ys[i]) * rk[i]


@numba.njit(inline="always", fastmath=_FAST)
def _grad_logits(a, r, totw, xs, ys, nb, c, alpha, beta, lam, table, dot, g_dist, acc_c, acc_a):
    """The second loop over the centroids: the logits' gradient ``G_k = w_k (dL/dw_k - dot)`` (plus palett_lambda's
    term), recomputed per centroid rather than kept, and ``G_k (x - c_k)`` summed over k into ``g_dist`` and per
    centroid into ``acc_c``; in the ``table`` pass also ``w_k y`` into ``acc_a`` (the LUT's gradient).
    ``c``/``alpha``/``beta``: the group's rows. A weighted iteration's ``G`` carries the point weight (every
    ``dL/dw_k`` does), through ``totw``."""
    g_dist[:nb] = 0
    for k in range(a.shape[0]):
        ak, rk, ck, accc, acca = a[k], r[k], c[k], acc_c[k], acc_a[k]
        al, be = alpha[k], beta[k]
        if table:  # unweighted, lam = 0: totw is tot
            for i in range(nb):
                w = ak[i] * totw[i]
                acca[i] += w * ys[i]
                gl_diff = w * ((al + be * ys[i]) - dot[i]) * (xs[i] - ck)
                g_dist[i] += gl_diff
                accc[i] += gl_diff
        elif lam > 0:
            for i in range(nb):
                w, gw = ak[i] * totw[i], al + be * ys[i]
                gl = w * (gw * rk[i] - dot[i]) + lam * w * rk[i] * rk[i] * gw
                gl_diff = gl * (xs[i] - ck)
                g_dist[i] += gl_diff
                accc[i] += gl_diff
        else:
            for i in range(nb):
                gl_diff = ak[i] * totw[i] * ((al + be * ys[i]) - dot[i]) * (xs[i] - ck)
                g_dist[i] += gl_diff
                accc[i] += gl_diff


@numba.njit(parallel=True, cache=True, fastmath=_FAST)
def _backward_kernel(x, y, c, alpha, beta, tau, lam, table, om_rows, om_cols, om_floor, weighted, gx, gc_out,
                     ga_out):
    """Backward of one pass through the attention ``a(x; c)`` (times ``r`` with palett_lambda), for an upstream
    gradient on the weights ``dL/dw[i, k] = alpha_k + beta_k y_i``:

    * the output table (``table=True``, always with ``lam = 0``): ``y = dL/dout``, ``beta = LUT``, ``alpha = 0``;
      also ``ga_out[k] = sum_i a_ik y_i`` (the LUT's gradient);
    * an iteration (``table=False``): ``y = x``, ``(alpha, beta) = (dL/dz, dL/ds)``, and ``x``'s direct share
      ``sum_k w_ik beta_k`` of ``s = sum_i w_i x_i``; ``weighted``: every point's terms times its weight
      ``om_rows[g, i // C] * om_cols[i % C] + om_floor`` (as in :func:`_sums_kernel`).

    Adds ``dL/dx`` into ``gx (G, N)`` (the table pass, which runs first, writes it); writes
    ``sum_i G_ik (x_i - c_k)`` per work item into ``gc_out``, where ``G = dL/dlogits`` (``dL/dc = 2 / tau`` times
    it). Two loops over the centroids per block: the terms with the per-point sums, then the logits' gradient."""
    groups, n = x.shape
    k_n = c.shape[1]
    items = (n + CHUNK - 1) // CHUNK
    for job in numba.prange(groups * items):
        g, lo = job // items, (job % items) * CHUNK
        a, r, m, tot = _scratch(k_n)
        totw = np.empty(BLOCK, np.float32)
        dot = np.empty(BLOCK, np.float32)
        g_direct = np.empty(BLOCK, np.float32)
        g_dist = np.empty(BLOCK, np.float32)
        acc_c = np.zeros((k_n, BLOCK), np.float32)
        acc_a = np.zeros((k_n, BLOCK), np.float32)
        for b0 in range(lo, min(n, lo + CHUNK), BLOCK):
            nb = min(BLOCK, n - b0)
            xs, ys = x[g, b0:b0 + nb], y[g, b0:b0 + nb]
            if lam > 0:
                _terms(xs, nb, c[g], tau, lam, a, r, m, tot)  # a unnormalised, tot = 1 / sum
            else:  # g_direct = sum_k a_k beta_k for now
                _terms_moments(xs, ys, nb, c[g], tau, alpha[g], beta[g], table, a, m, tot, dot, g_direct)
            tw = tot  # the normalisers times the point weights (a copy only when there are weights)
            if weighted:
                totw[:nb] = tot[:nb]
                _point_weights(om_rows[g], om_cols, om_floor, b0, nb, totw)
                tw = totw
            if lam > 0:
                _robust_attention(a, r, tot, tw, ys, nb, alpha[g], beta[g], dot, g_direct)
            elif table:
                g_direct[:nb] = 0
            else:
                for i in range(nb):
                    g_direct[i] *= tw[i]
            _grad_logits(a, r, tw, xs, ys, nb, c[g], alpha[g], beta[g], lam, table, dot, g_dist, acc_c, acc_a)
            out = gx[g, b0:b0 + nb]
            if table:  # the first backward pass: gx starts here (uninitialised, not zeroed: one pass less)
                for i in range(nb):
                    out[i] = g_direct[i] - (np.float32(2.0) / tau) * g_dist[i]
            else:
                for i in range(nb):
                    out[i] += g_direct[i] - (np.float32(2.0) / tau) * g_dist[i]
        for k in range(k_n):
            gc_out[job, k] = acc_c[k].astype(np.float64).sum()
            ga_out[job, k] = acc_a[k].astype(np.float64).sum()
