"""numba kernels for the grid binned DKM's per-point stage (CPU; ``palett_mode="dkm"`` without ``palett_lambda``).

Between its passes over the weights, the grid binned DKM (:mod:`dkm_palett.dkm_binned`) runs DKM on its grid points:
the per-point moments from the per-cell power sums, the k-means iterations, the table and its per-cell cubics in
forward; the table gradient's spread, the iterations' backward and the gradient's per-cell coefficients in backward.
The torch path (:class:`dkm_palett.dkm_math.PointDKM` on the touched points, and :class:`dkm_binned._Grid`'s
stencils) takes about 60 small tensor operations for that, 1.5 ms a layer whatever its size (most of a 1M-weight
layer's DKM overhead after the passes). These kernels do the same math in three calls, per group, over the touched
points only, in float64.

The math, for a group with grid points ``e_j``, moments ``h0_j, h1_j`` and centroids ``c``: attention
``a_jk = softmax_k(-(e_j - c_k)^2 / tau)``; an iteration ``c'_k = sum_j a_jk h1_j / z_k`` with ``z_k = sum_j a_jk
h0_j`` (a centroid without mass keeps its value, the pinned one stays 0); the table ``T_j = sum_k a_jk(c_{T-1})
LUT(c_T)_k``. Backward is :meth:`PointDKM.backward`'s hand-written chain rule, term for term. The sums run in another
order than torch's, so the two paths agree to float64 rounding (tests/test_binned_points.py), not bit for bit; the
forward and the backward's replay both read the table this makes, so they stay bit-identical.
"""

from __future__ import annotations

import numba
import numpy as np

from dkm_palett.dkm_binned import LAGRANGE

FILLED = 1e-12  # dkm_math.finish_update: a centroid with less mass than this keeps its previous value
_L = np.array(LAGRANGE)  # (4 stencil points, 4 powers)
_DL = np.array([[p * row[p] for p in range(1, 4)] + [0.0] for row in LAGRANGE])  # L_s'(t), coefficient of t^p


@numba.njit(inline="always", cache=True)
def _attention(e, c, inv_tau, a):
    """``a[k] = softmax_k(-(e - c_k)^2 / tau)``, as torch.softmax computes it (the largest logit subtracted)."""
    top = -np.inf
    for k in range(c.shape[0]):
        d = e - c[k]
        a[k] = -(d * d) * inv_tau
        top = max(top, a[k])
    total = 0.0
    for k in range(c.shape[0]):
        a[k] = np.exp(a[k] - top)
        total += a[k]
    for k in range(c.shape[0]):
        a[k] /= total


@numba.njit(inline="always", cache=True)
def _spread(sums, g, out):
    """``out[j] = sum_s sum_p L_s[p] sums[p, g, j - s]``: per-cell sums of ``q t^p`` -> per-point sums of ``q L``."""
    for j in range(out.shape[0]):
        v = 0.0
        for s in range(4):
            if j - s >= 0:
                for p in range(4):
                    v += _L[s, p] * sums[p, g, j - s]
        out[j] = v


@numba.njit(parallel=True, cache=True)
def _moments_kernel(sums, anchor, delta, h0, h1, touched):
    """Per group: ``h0``, ``h1`` (``x t^p = e_{b+1} t^p + delta t^(p+1)``) and the points some weight reads."""
    groups, bins = h0.shape
    for g in numba.prange(groups):
        xt = np.empty((4, 1, bins))
        for p in range(4):
            for b in range(bins):
                xt[p, 0, b] = sums[p, g, b] * anchor[g, b] + sums[p + 1, g, b] * delta[g]
        _spread(sums, g, h0[g])
        _spread(xt, 0, h1[g])
        for j in range(bins):
            touched[g, j] = False
            for s in range(4):
                if j - s >= 0 and sums[0, g, j - s] > 0:
                    touched[g, j] = True


@numba.njit(parallel=True, cache=True)
def _iteration_kernel(points, h0, h1, touched, c, inv_tau, zero_index, c_next, z, moved):
    """One k-means iteration per group: ``c_next``, the masses ``z`` and ``moved[g] = max |c_next - c|``."""
    groups, bins = h0.shape
    k_n = c.shape[1]
    for g in numba.prange(groups):
        a, s = np.empty(k_n), np.zeros(k_n)
        z[g] = 0.0
        for j in range(bins):
            if touched[g, j]:
                _attention(points[g, j], c[g], inv_tau, a)
                for k in range(k_n):
                    s[k] += a[k] * h1[g, j]
                    z[g, k] += a[k] * h0[g, j]
        moved[g] = 0.0
        for k in range(k_n):
            v = s[k] / z[g, k] if z[g, k] > FILLED else c[g, k]
            c_next[g, k] = 0.0 if k == zero_index else v
            moved[g] = max(moved[g], abs(c_next[g, k] - c[g, k]))


@numba.njit(parallel=True, cache=True)
def _cubic_kernel(points, touched, c_prev, lut, inv_tau, cubic):
    """The table ``T_j = sum_k a_jk(c_prev) lut_k`` (0 at untouched points, which no cell reads) and per cell the
    coefficients of ``sum_s L_s(t) T_{b+s}`` in powers of t, ``cubic (G, B, 4)``."""
    groups, bins = touched.shape
    for g in numba.prange(groups):
        a, table = np.empty(lut.shape[1]), np.zeros(bins + 3)
        for j in range(bins):
            if touched[g, j]:
                _attention(points[g, j], c_prev[g], inv_tau, a)
                for k in range(lut.shape[1]):
                    table[j] += a[k] * lut[g, k]
        for b in range(bins):
            for p in range(4):
                cubic[g, b, p] = (_L[0, p] * table[b] + _L[1, p] * table[b + 1] + _L[2, p] * table[b + 2]
                                  + _L[3, p] * table[b + 3])


@numba.njit(inline="always", cache=True)
def _attention_backward(a, u, e, c, inv_tau, g_c):
    """Backward of :func:`_attention` at ``e`` for ``dL/da = u``: the softmax's ``g_l = a (u - sum a u)``, then the
    logits' ``dL/dc_k += 2 g_l_k (e - c_k) / tau`` into ``g_c``."""
    dot = 0.0
    for k in range(a.shape[0]):
        dot += a[k] * u[k]
    for k in range(a.shape[0]):
        g_c[k] += 2.0 * inv_tau * (a[k] * (u[k] - dot)) * (e - c[k])


@numba.njit(inline="always", cache=True)
def _table_backward(points, touched, g, c_prev, lut, inv_tau, g_table, g_lut, g_prev):
    """Backward of the table: ``dL/dlut`` into ``g_lut``, ``dL/dc_prev`` (through the attention) into ``g_prev``."""
    k_n = lut.shape[1]
    a, u = np.empty(k_n), np.empty(k_n)
    for j in range(touched.shape[1]):
        if touched[g, j]:
            _attention(points[g, j], c_prev[g], inv_tau, a)
            for k in range(k_n):
                g_lut[k] += a[k] * g_table[j]
                u[k] = g_table[j] * lut[g, k]  # dL/da_k of T_j = sum_k a_k lut_k
            _attention_backward(a, u, points[g, j], c_prev[g], inv_tau, g_prev)


@numba.njit(inline="always", cache=True)
def _iteration_backward(points, h0, h1, touched, g, c, c_next, z, inv_tau, zero_index, g_c, g_prev, g_h0, g_h1):
    """Backward of one iteration from ``g_c = dL/dc_next``: ``dL/dh0``, ``dL/dh1`` added, ``dL/dc`` into
    ``g_prev`` (through the attention, and directly for a centroid without mass)."""
    k_n = c.shape[1]
    g_s, g_z, a, g_w = np.zeros(k_n), np.zeros(k_n), np.empty(k_n), np.empty(k_n)
    for k in range(k_n):
        gk = 0.0 if k == zero_index else g_c[k]
        if z[g, k] > FILLED:
            g_s[k], g_z[k] = gk / z[g, k], -(gk * c_next[g, k]) / z[g, k]
        else:
            g_prev[k] += gk
    for j in range(touched.shape[1]):
        if touched[g, j]:
            _attention(points[g, j], c[g], inv_tau, a)
            for k in range(k_n):
                g_w[k] = g_s[k] * h1[g, j] + g_z[k] * h0[g, j]  # dL/da_k of c'_k's sums
                g_h0[j] += g_z[k] * a[k]
                g_h1[j] += g_s[k] * a[k]
            _attention_backward(a, g_w, points[g, j], c[g], inv_tau, g_prev)


@numba.njit(parallel=True, cache=True)
def _backward_kernel(points, h0, h1, touched, cs, zs, iters, lut, inv_tau, zero_index, g_sums, anchor, delta,
                     cubic, coef):
    """``coef (G, B, 7)`` for ``dL/dx = g Q_b(t) + P_b(t)`` (:meth:`dkm_binned._Grid.grad_coefficients`) from the
    table gradient's per-cell power sums ``g_sums (4, G, B)``."""
    groups, bins = touched.shape
    k_n = lut.shape[1]
    for g in numba.prange(groups):
        g_table, g_h0, g_h1 = np.empty(bins), np.zeros(bins + 3), np.zeros(bins + 3)
        _spread(g_sums, g, g_table)
        g_c, g_cp = np.zeros(k_n), np.zeros(k_n)  # dL/dLUT is dL/dc_T (the LUT rounding is straight-through)
        _table_backward(points, touched, g, cs[iters - 1], lut, inv_tau, g_table, g_c, g_cp)
        g_prev = np.empty(k_n)
        for t in range(iters - 1, -1, -1):  # copies, not rebinding: numba may hoist an allocation out of the loop
            g_prev[:] = 0.0
            _iteration_backward(points, h0, h1, touched, g, cs[t], cs[t + 1], zs[t], inv_tau, zero_index, g_c,
                                g_prev, g_h0, g_h1)
            if t == iters - 1:
                g_prev += g_cp
            g_c[:] = g_prev
        for b in range(bins):
            for p in range(1, 4):
                coef[g, b, p - 1] = cubic[g, b, p] * p / delta[g]
            for p in range(4):
                m = 0.0
                for s in range(4):
                    m += ((g_h0[b + s] + g_h1[b + s] * anchor[g, b]) / delta[g] * _DL[s, p]
                          + g_h1[b + s] * _L[s, p] * (p + 1))
                coef[g, b, 3 + p] = m


class GridPoints:
    """The per-point stage of one grid binned DKM forward and its backward, on a :class:`dkm_binned._Grid`'s
    numpy arrays: :meth:`run` the iterations from the per-cell power sums, :meth:`cubic` the table's per-cell cubics,
    :meth:`grad_coefficients` in backward."""

    def __init__(self, sums: np.ndarray, points: np.ndarray, anchor: np.ndarray, delta: np.ndarray, tau: float,
                 zero_index):
        groups, bins = points.shape
        self.points, self.anchor, self.delta = points, anchor, delta
        self.inv_tau, self.zero_index = 1.0 / tau, -1 if zero_index is None else int(zero_index)
        self.h0, self.h1 = np.empty((groups, bins)), np.empty((groups, bins))
        self.touched = np.empty((groups, bins), np.bool_)
        _moments_kernel(sums, anchor, delta, self.h0, self.h1, self.touched)
        self.cs = self.zs = None
        self.lut = self.tab = None

    def run(self, c0: np.ndarray, max_iter: int, epsilon: float) -> np.ndarray:
        """The k-means iterations from ``c0 (G, K)`` until no centroid moves by ``epsilon`` (over all groups, as
        :meth:`PointDKM.run`); returns ``c_T``."""
        groups, k_n = c0.shape
        self.cs, self.zs = [c0], []
        moved = np.empty(groups)
        for _ in range(max_iter):
            c_next, z = np.empty((groups, k_n)), np.empty((groups, k_n))
            _iteration_kernel(self.points, self.h0, self.h1, self.touched, self.cs[-1], self.inv_tau,
                              self.zero_index, c_next, z, moved)
            self.cs.append(c_next)
            self.zs.append(z)
            if moved.max() < epsilon:
                break
        return self.cs[-1]

    def cubic(self, lut: np.ndarray) -> np.ndarray:
        """Per cell, the cubic of the table whose entries are ``lut (G, K)`` (``c_T``, rounded to the LUT dtype)."""
        self.lut = np.ascontiguousarray(lut)
        self.tab = np.empty(self.points.shape + (4,))
        _cubic_kernel(self.points, self.touched, self.cs[-2], self.lut, self.inv_tau, self.tab)
        return self.tab

    def grad_coefficients(self, g_sums: np.ndarray) -> np.ndarray:
        """``(G, B, 7)`` gradient coefficients from the table gradient's per-cell power sums ``(4, G, B)``."""
        coef = np.empty(self.points.shape + (7,))
        _backward_kernel(self.points, self.h0, self.h1, self.touched, np.stack(self.cs), np.stack(self.zs),
                         len(self.zs), self.lut, self.inv_tau, self.zero_index, g_sums, self.anchor, self.delta,
                         self.tab, coef)
        return coef
