"""Exact scalar DKM on CPU in fused numba kernels: one pass over the weights per k-means iteration.

Same math as :func:`dkm_palett.dkm_math.dkm_reference` for ``cluster_dim=1`` and ``palett_mode="dkm"`` (with
palett_lambda, a pinned zero, grouped and quantized LUTs), on float32 weights ``x (G, N)``. Each pass walks the
weights in blocks of ``BLOCK`` points and computes, per block, the distances to the ``K`` centroids, the softmax and
the per-centroid sums it needs, so no ``N x K`` tensor is ever built and nothing per weight is kept between forward
and backward (the backward recomputes the attention from the weight). The forward makes ``T + 1`` passes (``T``
iterations, then the output table); the backward ``T + 1``.

Exactness: the logits are computed with the reference's operations in the same order (no fused multiply-add), the
exponential is a float32 Cody-Waite/Taylor evaluation within 2 ulp of ``exp`` (vectorisable, unlike libm's), and the
per-centroid sums add float32 block partials in float64. Work is split into fixed chunks of ``CHUNK`` points whose
partial sums are added in a fixed order, so results do not depend on the thread count.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from dkm_palett.dkm_math import DKMParams, finish_update, quantized, update_backward

BLOCK = 256  # points per block: the (K, BLOCK) attention block stays in L1/L2
CHUNK = 64 * BLOCK  # points per work item (fixed, so the summation order is fixed)

_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)  # ln 2 split in two so n * ln2 is exact to float32 (Cody-Waite)
_LN2_LO = np.float32(-2.12194440e-4)
_EXP_MIN = np.float32(-87.0)  # below this exp() is under 2^-125; returned as 0 (the reference's ~1e-38 terms)


@intrinsic
def _f32_from_bits(typingctx, bits):
    """Reinterpret an int32 as float32 (builds ``2^n`` from its exponent bits)."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@numba.njit(inline="always")
def _exp_nonpos(v):
    """``exp(v)`` for float32 ``v <= 0``: ``2^n * e^f`` with ``|f| <= ln2 / 2`` and a degree-7 Taylor polynomial
    (truncation under 2e-9 relative)."""
    vc = max(v, _EXP_MIN)
    n = np.floor(vc * _LOG2E + np.float32(0.5))
    f = vc - n * _LN2_HI
    f = f - n * _LN2_LO
    p = np.float32(1 / 5040)
    p = p * f + np.float32(1 / 720)
    p = p * f + np.float32(1 / 120)
    p = p * f + np.float32(1 / 24)
    p = p * f + np.float32(1 / 6)
    p = p * f + np.float32(0.5)
    p = p * f + np.float32(1.0)
    p = p * f + np.float32(1.0)
    scale = _f32_from_bits(np.int32(n) * np.int32(1 << 23) + np.int32(127 << 23))
    return p * scale if v >= _EXP_MIN else np.float32(0.0)


@numba.njit(inline="always")
def _attention(xs, n, c, tau, lam, a, r, m, tot):
    """Softmax attention ``a[k, :n]`` of the points ``xs`` to the centroids ``c (K,)``; with palett_lambda also the
    robust weights ``r[k, :n] = 1 / (1 - lam * logit)``. ``m``, ``tot`` are scratch rows."""
    for i in range(n):
        m[i] = -np.inf
        tot[i] = 0
    for k in range(c.shape[0]):
        ck = c[k]
        ak, rk = a[k], r[k]
        for i in range(n):
            d = xs[i] - ck
            lg = -(d * d) / tau
            ak[i] = lg
            m[i] = max(m[i], lg)
        if lam > 0:
            for i in range(n):
                rk[i] = np.float32(1.0) / (np.float32(1.0) - lam * ak[i])
    for k in range(c.shape[0]):
        ak = a[k]
        for i in range(n):
            e = _exp_nonpos(ak[i] - m[i])
            ak[i] = e
            tot[i] += e
    for i in range(n):
        tot[i] = np.float32(1.0) / tot[i]
    for k in range(c.shape[0]):
        ak = a[k]
        for i in range(n):
            ak[i] *= tot[i]


def _scratch(k):
    return (np.empty((k, BLOCK), np.float32), np.empty((k, BLOCK), np.float32), np.empty(BLOCK, np.float32),
            np.empty(BLOCK, np.float32))


_scratch = numba.njit(inline="always")(_scratch)


@numba.njit(parallel=True, cache=True)
def _sums_kernel(x, c, tau, lam, s_out, z_out):
    """One k-means iteration's sums per work item: ``s[k] = sum_i w_ik x_i``, ``z[k] = sum_i w_ik`` with
    ``w = a`` (times ``r`` with palett_lambda). ``s_out``, ``z_out``: ``(G * items, K)`` float64."""
    groups, n = x.shape
    k_n = c.shape[1]
    items = (n + CHUNK - 1) // CHUNK
    for job in numba.prange(groups * items):
        g, lo = job // items, (job % items) * CHUNK
        a, r, m, tot = _scratch(k_n)
        acc_s = np.zeros((k_n, BLOCK), np.float32)
        acc_z = np.zeros((k_n, BLOCK), np.float32)
        for b0 in range(lo, min(n, lo + CHUNK), BLOCK):
            nb = min(BLOCK, n - b0)
            xs = x[g, b0:b0 + nb]
            _attention(xs, nb, c[g], tau, lam, a, r, m, tot)
            for k in range(k_n):
                ak, rk, sk, zk = a[k], r[k], acc_s[k], acc_z[k]
                if lam > 0:
                    for i in range(nb):
                        sk[i] += ak[i] * rk[i] * xs[i]
                        zk[i] += ak[i] * rk[i]
                else:
                    for i in range(nb):
                        sk[i] += ak[i] * xs[i]
                        zk[i] += ak[i]
        for k in range(k_n):
            s_out[job, k] = acc_s[k].astype(np.float64).sum()
            z_out[job, k] = acc_z[k].astype(np.float64).sum()


@numba.njit(parallel=True, cache=True)
def _table_kernel(x, c, cq, tau, out):
    """The output ``out[g, i] = sum_k a(x_i; c)_k cq_k``."""
    groups, n = x.shape
    k_n = c.shape[1]
    items = (n + CHUNK - 1) // CHUNK
    for job in numba.prange(groups * items):
        g, lo = job // items, (job % items) * CHUNK
        a, r, m, tot = _scratch(k_n)
        for b0 in range(lo, min(n, lo + CHUNK), BLOCK):
            nb = min(BLOCK, n - b0)
            _attention(x[g, b0:b0 + nb], nb, c[g], tau, np.float32(0.0), a, r, m, tot)
            o = out[g, b0:b0 + nb]
            o[:] = 0
            for k in range(k_n):
                ak, q = a[k], cq[g, k]
                for i in range(nb):
                    o[i] += ak[i] * q


@numba.njit(inline="always")
def _grad_attention(a, r, ys, nb, alpha, beta, gs, lam, table, g_a, dot, g_direct, acc_a):
    """One block of the backward, step 1: ``g_a[k] = dL/dw_k = alpha_k + beta_k y`` (times ``r_k`` with
    palett_lambda) and ``dot = sum_k a_k g_a[k]``; adds ``x``'s direct share ``sum_k w_k gs_k`` (iterations) into
    ``g_direct`` and ``a_k y`` (the table: the LUT's gradient) into ``acc_a``. ``alpha``/``beta``/``gs``: the
    group's rows."""
    dot[:nb] = 0
    g_direct[:nb] = 0
    for k in range(a.shape[0]):
        ak, rk, gak, acca = a[k], r[k], g_a[k], acc_a[k]
        al, be, gsk = alpha[k], beta[k], gs[k]
        for i in range(nb):
            gak[i] = al + be * ys[i]
        if lam > 0:
            for i in range(nb):
                g_direct[i] += ak[i] * rk[i] * gsk
                gak[i] *= rk[i]
        elif not table:
            for i in range(nb):
                g_direct[i] += ak[i] * gsk
        if table:
            for i in range(nb):
                acca[i] += ak[i] * ys[i]
        for i in range(nb):
            dot[i] += ak[i] * gak[i]


@numba.njit(inline="always")
def _grad_logits(a, r, xs, ys, nb, c, alpha, beta, lam, g_a, dot, g_dist, acc_c):
    """One block of the backward, step 2: the logits' gradient ``G_k = a_k (g_a[k] - dot)`` (plus palett_lambda's
    term) in place of ``g_a``, and ``G_k (x - c_k)`` summed over k into ``g_dist`` and per centroid into
    ``acc_c``. ``c``/``alpha``/``beta``: the group's rows."""
    g_dist[:nb] = 0
    for k in range(a.shape[0]):
        ak, rk, gak, ck, accc = a[k], r[k], g_a[k], c[k], acc_c[k]
        al, be = alpha[k], beta[k]
        for i in range(nb):
            gak[i] = ak[i] * (gak[i] - dot[i])
        if lam > 0:
            for i in range(nb):
                gak[i] += lam * ak[i] * rk[i] * rk[i] * (al + be * ys[i])
        for i in range(nb):
            gl_diff = gak[i] * (xs[i] - ck)
            g_dist[i] += gl_diff
            accc[i] += gl_diff


@numba.njit(parallel=True, cache=True)
def _backward_kernel(x, y, c, alpha, beta, gs, tau, lam, table, gx, gc_out, ga_out):
    """Backward of one pass through the attention ``a(x; c)`` (times ``r`` with palett_lambda), for an upstream
    gradient on the weights ``dL/dw[i, k] = alpha_k + beta_k y_i``:

    * the output table (``table=True``): ``y = dL/dout``, ``beta = LUT``, ``alpha = 0``; also
      ``ga_out[k] = sum_i a_ik y_i`` (the LUT's gradient);
    * an iteration (``table=False``): ``y = x``, ``(alpha, beta) = (dL/dz, dL/ds)``, and ``x``'s direct share
      ``sum_k w_ik gs_k`` of ``s = sum_i w_i x_i``.

    Adds ``dL/dx`` into ``gx (G, N)``; writes ``sum_i G_ik (x_i - c_k)`` per work item into ``gc_out``, where
    ``G = dL/dlogits`` (``dL/dc = 2 / tau`` times it)."""
    groups, n = x.shape
    k_n = c.shape[1]
    items = (n + CHUNK - 1) // CHUNK
    for job in numba.prange(groups * items):
        g, lo = job // items, (job % items) * CHUNK
        a, r, m, tot = _scratch(k_n)
        g_a = np.empty((k_n, BLOCK), np.float32)
        dot = np.empty(BLOCK, np.float32)
        g_direct = np.empty(BLOCK, np.float32)
        g_dist = np.empty(BLOCK, np.float32)
        acc_c = np.zeros((k_n, BLOCK), np.float32)
        acc_a = np.zeros((k_n, BLOCK), np.float32)
        for b0 in range(lo, min(n, lo + CHUNK), BLOCK):
            nb = min(BLOCK, n - b0)
            xs, ys = x[g, b0:b0 + nb], y[g, b0:b0 + nb]
            _attention(xs, nb, c[g], tau, lam, a, r, m, tot)
            _grad_attention(a, r, ys, nb, alpha[g], beta[g], gs[g], lam, table, g_a, dot, g_direct, acc_a)
            _grad_logits(a, r, xs, ys, nb, c[g], alpha[g], beta[g], lam, g_a, dot, g_dist, acc_c)
            out = gx[g, b0:b0 + nb]
            for i in range(nb):
                out[i] += g_direct[i] - (np.float32(2.0) / tau) * g_dist[i]
        for k in range(k_n):
            gc_out[job, k] = acc_c[k].astype(np.float64).sum()
            ga_out[job, k] = acc_a[k].astype(np.float64).sum()


# --------------------------------------------------------------------------------------- autograd


def _per_group(parts: np.ndarray, groups: int) -> torch.Tensor:
    """Work-item partial sums ``(G * items, K)`` -> ``(G, K)`` float64 (fixed order)."""
    return torch.from_numpy(parts).reshape(groups, -1, parts.shape[1]).sum(1)


def fused_threads() -> int:
    """numba threads for the kernels: torch's thread count (so ``torch.set_num_threads`` governs both)."""
    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(threads)
    return threads


class FusedDKM(torch.autograd.Function):
    """Exact scalar DKM (``x (G, N, 1)`` float32 on CPU, ``palett_mode="dkm"``) in fused kernels; the same results
    as :class:`dkm_palett.dkm_math.DenseDKM` up to float32 rounding. Saves only ``x`` for backward."""

    @staticmethod
    def forward(ctx, x, c0, p: DKMParams):
        fused_threads()
        xs = x.detach()[..., 0].contiguous().numpy()
        groups = xs.shape[0]
        items = groups * -(-xs.shape[1] // CHUNK)
        tau, lam = np.float32(p.tau), np.float32(p.lam)
        cs, sums = [c0.detach()[..., 0].contiguous()], []
        for _ in range(p.max_iter):
            s_parts, z_parts = np.empty((items, cs[-1].shape[1])), np.empty((items, cs[-1].shape[1]))
            _sums_kernel(xs, cs[-1].numpy(), tau, lam, s_parts, z_parts)
            s, z = _per_group(s_parts, groups), _per_group(z_parts, groups)
            c_prev = cs[-1].double().unsqueeze(-1)
            c_new = finish_update(s.unsqueeze(-1), z, c_prev, p)[..., 0].to(x.dtype)
            sums.append((s, z))
            cs.append(c_new)
            if (c_new - cs[-2]).abs().max().item() < p.epsilon:
                break
        cq = quantized(cs[-1].unsqueeze(-1), p)[..., 0].contiguous()
        out = torch.empty_like(x.detach()[..., 0])
        _table_kernel(xs, cs[-2].numpy(), cq.numpy(), tau, out.numpy())
        ctx.save_for_backward(x)
        ctx.state = (cs, sums, cq, p)
        c = cs[-1].unsqueeze(-1)
        ctx.mark_non_differentiable(c)
        return out.unsqueeze(-1), c

    @staticmethod
    def backward(ctx, g_out, _g_c):
        fused_threads()
        (x,) = ctx.saved_tensors
        cs, sums, cq, p = ctx.state
        ctx.state = None
        xs = x.detach()[..., 0].contiguous().numpy()
        groups, k_n = cs[0].shape
        items = groups * -(-xs.shape[1] // CHUNK)
        tau, lam = np.float32(p.tau), np.float32(p.lam)
        gx = np.zeros_like(xs)
        zeros = np.zeros((groups, k_n), np.float32)
        gc_parts, ga_parts = np.empty((items, k_n)), np.empty((items, k_n))
        g = g_out[..., 0].contiguous().to(x.dtype).numpy()
        _backward_kernel(xs, g, cs[-2].numpy(), zeros, cq.numpy(), zeros, tau, np.float32(0.0), True, gx,
                         gc_parts, ga_parts)
        g_c = _per_group(ga_parts, groups)  # the LUT's gradient passes straight through its rounding
        g_table_prev = _per_group(gc_parts, groups) * (2.0 / p.tau)
        for t in range(len(sums) - 1, -1, -1):
            s, z = sums[t]
            g_s, g_z, g_prev = update_backward(g_c.unsqueeze(-1), s.unsqueeze(-1), z, cs[t + 1].double().unsqueeze(-1),
                                               p)
            _backward_kernel(xs, xs, cs[t].numpy(), g_z[..., 0].float().numpy(), g_s[..., 0].float().numpy(),
                             g_s[..., 0].float().numpy(), tau, lam, False, gx, gc_parts, ga_parts)
            g_c = g_prev[..., 0] + _per_group(gc_parts, groups) * (2.0 / p.tau)
            if t == len(sums) - 1:
                g_c = g_c + g_table_prev
        return torch.from_numpy(gx).unsqueeze(-1), None, None
