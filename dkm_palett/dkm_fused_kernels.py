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


@numba.njit(inline="always", fastmath=_FAST)
def _exp2_nonpos(t):
    """``2^t`` for float32 ``t <= 0`` (slightly positive rounding noise allowed): ``2^n * 2^f`` with ``|f| <= 1/2``,
    ``f = t - n`` exact, and a degree-6 polynomial; 0 below ``_EXP2_MIN``."""
    tc = t if t > _EXP2_MIN else _EXP2_MIN
    n = np.floor(tc + np.float32(0.5))
    f = tc - n
    p = _P[6]
    p = p * f + _P[5]
    p = p * f + _P[4]
    p = p * f + _P[3]
    p = p * f + _P[2]
    p = p * f + _P[1]
    p = p * f + _P[0]
    e = p * _f32_from_bits(np.int32(n) * np.int32(1 << 23) + np.int32(127 << 23))
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
def _point_weights(om, om_floor, n, tot):
    """``tot[:n] *= om[:n] + om_floor``: the block's normalisers times its point weights."""
    for i in range(n):
        tot[i] *= om[i] + om_floor


@numba.njit(inline="always")
def _scratch(k):
    """A block's ``(a, r, m, tot)``: the terms and robust weights ``(K, BLOCK)``, shifts and normalisers."""
    return (np.empty((k, BLOCK), np.float32), np.empty((k, BLOCK), np.float32), np.empty(BLOCK, np.float32),
            np.empty(BLOCK, np.float32))


@numba.njit(parallel=True, cache=True, fastmath=_FAST)
def _sums_kernel(x, c, tau, lam, om, om_floor, weighted, s_out, z_out):
    """One k-means iteration's sums per work item: ``s[k] = sum_i w_ik x_i``, ``z[k] = sum_i w_ik`` with
    ``w = a`` (times ``r`` with palett_lambda; times the point weight ``om[g, i] + om_floor[g]`` when ``weighted``,
    otherwise ``om`` is not read). ``s_out``, ``z_out``: ``(G * items, K)`` float64."""
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
                _point_weights(om[g, b0:b0 + nb], om_floor[g], nb, tot)
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
def _grad_attention(a, r, tot, totw, weighted, ys, nb, alpha, beta, gs, lam, table, dot, g_direct, acc_a):
    """One block of the backward, step 1, from the unnormalised terms ``a`` and ``tot`` = one over their sum:
    ``dot = sum_k w_k dL/dw_k`` with ``dL/dw_k = alpha_k + beta_k y`` (times ``r_k`` with palett_lambda); adds
    ``x``'s direct share ``sum_k w_k gs_k`` (iterations) into ``g_direct`` and ``w_k y`` (the table: the LUT's
    gradient) into ``acc_a``. ``alpha``/``beta``/``gs``: the group's rows. ``totw`` is ``tot`` times the point
    weights of a ``weighted`` iteration (``tot`` itself otherwise): ``x``'s direct share carries its weight."""
    dot[:nb] = 0
    g_direct[:nb] = 0
    for k in range(a.shape[0]):
        ak, rk, acca = a[k], r[k], acc_a[k]
        al, be, gsk = alpha[k], beta[k], gs[k]
        if lam > 0:
            for i in range(nb):
                w = ak[i] * tot[i]
                g_direct[i] += ak[i] * totw[i] * rk[i] * gsk
                dot[i] += w * (al + be * ys[i]) * rk[i]
        elif table:
            for i in range(nb):
                w = ak[i] * tot[i]
                acca[i] += w * ys[i]
                dot[i] += w * (al + be * ys[i])
        elif not weighted:  # one product for both sums
            for i in range(nb):
                w = ak[i] * tot[i]
                g_direct[i] += w * gsk
                dot[i] += w * (al + be * ys[i])
        else:
            for i in range(nb):
                g_direct[i] += ak[i] * totw[i] * gsk
                dot[i] += ak[i] * tot[i] * (al + be * ys[i])


@numba.njit(inline="always", fastmath=_FAST)
def _grad_logits(a, r, totw, xs, ys, nb, c, alpha, beta, lam, dot, g_dist, acc_c):
    """One block of the backward, step 2: the logits' gradient ``G_k = w_k (dL/dw_k - dot)`` (plus palett_lambda's
    term), recomputed per centroid rather than kept, and ``G_k (x - c_k)`` summed over k into ``g_dist`` and per
    centroid into ``acc_c``. ``c``/``alpha``/``beta``: the group's rows. A weighted iteration's ``G`` carries the
    point weight (every ``dL/dw_k`` does), through ``totw``."""
    g_dist[:nb] = 0
    for k in range(a.shape[0]):
        ak, rk, ck, accc = a[k], r[k], c[k], acc_c[k]
        al, be = alpha[k], beta[k]
        if lam > 0:
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
def _backward_kernel(x, y, c, alpha, beta, gs, tau, lam, table, om, om_floor, weighted, gx, gc_out, ga_out):
    """Backward of one pass through the attention ``a(x; c)`` (times ``r`` with palett_lambda), for an upstream
    gradient on the weights ``dL/dw[i, k] = alpha_k + beta_k y_i``:

    * the output table (``table=True``): ``y = dL/dout``, ``beta = LUT``, ``alpha = 0``; also
      ``ga_out[k] = sum_i a_ik y_i`` (the LUT's gradient);
    * an iteration (``table=False``): ``y = x``, ``(alpha, beta) = (dL/dz, dL/ds)``, and ``x``'s direct share
      ``sum_k w_ik gs_k`` of ``s = sum_i w_i x_i``; ``weighted``: every point's terms times its weight
      ``om[g, i] + om_floor[g]`` (as in :func:`_sums_kernel`).

    Adds ``dL/dx`` into ``gx (G, N)`` (the table pass, which runs first, writes it); writes
    ``sum_i G_ik (x_i - c_k)`` per work item into ``gc_out``, where ``G = dL/dlogits`` (``dL/dc = 2 / tau`` times
    it)."""
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
            _terms(xs, nb, c[g], tau, lam, a, r, m, tot)  # a unnormalised, tot = 1 / sum
            if weighted:  # two call sites, so the unweighted one compiles exactly as without weights
                totw[:nb] = tot[:nb]
                _point_weights(om[g, b0:b0 + nb], om_floor[g], nb, totw)
                _grad_attention(a, r, tot, totw, True, ys, nb, alpha[g], beta[g], gs[g], lam, table, dot, g_direct,
                                acc_a)
                _grad_logits(a, r, totw, xs, ys, nb, c[g], alpha[g], beta[g], lam, dot, g_dist, acc_c)
            else:
                _grad_attention(a, r, tot, tot, False, ys, nb, alpha[g], beta[g], gs[g], lam, table, dot, g_direct,
                                acc_a)
                _grad_logits(a, r, tot, xs, ys, nb, c[g], alpha[g], beta[g], lam, dot, g_dist, acc_c)
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
