"""The DKM math (Cho et al., ICLR 2022) on grouped vectors ``X (G, N, D)`` with centroids ``C (G, K, D)``.

One iteration: ``A = softmax(-||x - c||^2 / tau)``, ``C' = A^T X / sum(A)``; after the last one the output is
``A C'``. Implementations of the same math:

* :func:`dkm_reference`: plain autograd, materialises every ``(G, N, K)`` tensor. The yardstick for tests.
* :class:`PointDKM`: the engine. DKM on weighted points with a hand-written backward, in chunks of rows, so the
  working set is ``rows x K`` (bounded by ``palett_max_mem``); the forward's attention is kept for backward
  only when it fits the budget, otherwise recomputed chunk by chunk.
* :class:`DenseDKM`: exact DKM, every weight vector is a point (any ``cluster_dim``, any device).

The exact fused CPU kernels for scalar LUTs live in :mod:`dkm_palett.dkm_fused`, the histogram DKM (exact for
fp16/bf16, bounded for fp32) in :mod:`dkm_palett.dkm_binned`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from dkm_palett.dkm_sensitivity import Sensitivity, active_weights
from dkm_palett.lut import fake_quantize_lut


@dataclass(frozen=True)
class DKMParams:
    """The knobs of one DKM forward."""

    tau: float = 1e-4
    mode: str = "dkm"  # dkm | gsm | hard
    max_iter: int = 1  # ModuleDKMPalettizerConfig.kmeans_max_iter's default
    epsilon: float = 1e-4
    lam: float = 0.0
    zero_index: Optional[int] = None  # a centroid pinned to exactly 0 (enforce_zero / add_extra_centroid)
    lut_dtype: str = "f32"
    quant_min: int = -128
    quant_max: int = 127
    seed: int = 0  # Gumbel noise seed for gsm (recomputed identically in backward)


# --------------------------------------------------------------------------------------- shared pieces


def logits(x: torch.Tensor, c: torch.Tensor, tau: float) -> torch.Tensor:
    """``-||x - c||^2 / tau`` for ``x (G,n,D)``, ``c (G,K,D)`` -> ``(G,n,K)``."""
    if x.shape[-1] == 1:
        diff = x - c.transpose(1, 2)
        return -(diff * diff) / tau
    sq = (x * x).sum(-1, keepdim=True) + (c * c).sum(-1).unsqueeze(1) - 2 * x @ c.transpose(1, 2)
    return -sq.clamp_min(0) / tau


def gumbel(shape, seed: int, device, dtype) -> torch.Tensor:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    u = torch.rand(shape, generator=gen, device=device, dtype=dtype).clamp_(1e-10, 1 - 1e-7)
    return -torch.log(-torch.log(u))


def attention(lg: torch.Tensor, p: DKMParams, noise_seed: Optional[int] = None) -> torch.Tensor:
    if p.mode == "hard":
        return torch.nn.functional.one_hot(lg.argmax(-1), lg.shape[-1]).to(lg.dtype)
    if p.mode == "gsm" and noise_seed is not None:
        lg = lg + gumbel(lg.shape, noise_seed, lg.device, lg.dtype)
    return torch.softmax(lg, dim=-1)


def robust_weights(lg: torch.Tensor, lam: float) -> torch.Tensor:
    """palett_lambda: Cauchy down-weighting ``1 / (1 + lam * d / tau)`` of far points in the centroid update."""
    return 1.0 / (1.0 - lam * lg)


def finish_update(s: torch.Tensor, z: torch.Tensor, c_prev: torch.Tensor, p: DKMParams) -> torch.Tensor:
    """``C' = S / Z``; an empty centroid keeps its previous value; the pinned centroid stays at 0."""
    z = z.unsqueeze(-1)
    c_new = torch.where(z > 1e-12, s / z.clamp_min(1e-12), c_prev)
    return pin_zero(c_new, p)


def update_backward(g_c: torch.Tensor, s: torch.Tensor, z: torch.Tensor, c_next: torch.Tensor, p: DKMParams):
    """Backward of :func:`finish_update` given ``dL/dC'`` ``(G,K,D)``: ``(dL/dS (G,K,D), dL/dZ (G,K,1), dL/dC_prev)``
    (``C_prev`` only through empty centroids)."""
    g_c = pin_zero(g_c, p)
    filled = z > 1e-12
    zs = z.clamp_min(1e-12)
    g_s = torch.where(filled.unsqueeze(-1), g_c / zs.unsqueeze(-1), torch.zeros_like(g_c))
    g_z = torch.where(filled, -(g_c * c_next).sum(-1) / zs, torch.zeros_like(z)).unsqueeze(-1)
    g_prev = torch.where(filled.unsqueeze(-1), torch.zeros_like(g_c), g_c)
    return g_s, g_z, g_prev


def pin_zero(c: torch.Tensor, p: DKMParams) -> torch.Tensor:
    if p.zero_index is None:
        return c
    mask = torch.ones_like(c)
    mask[:, p.zero_index] = 0
    return c * mask


def quantized(c: torch.Tensor, p: DKMParams) -> torch.Tensor:
    return fake_quantize_lut(c, p.lut_dtype, p.quant_min, p.quant_max)


def _noise_seed(p: DKMParams, iteration: int, start: int) -> Optional[int]:
    if p.mode != "gsm":
        return None
    return (p.seed * 1_000_003 + iteration * 7919 + start) % (2 ** 63 - 1)


# --------------------------------------------------------------------------------------- reference


def dkm_reference(x: torch.Tensor, c0: torch.Tensor, p: DKMParams,
                  point_weights: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Straightforward DKM with plain autograd. Returns ``(output (G,N,D), final centroids (G,K,D))``.
    ``point_weights (G,N,1)``: constant weights of the centroid update (:class:`Sensitivity`)."""
    c = c0.detach()
    a = None
    for t in range(p.max_iter):
        lg = logits(x, c, p.tau)
        a = attention(lg, p, _noise_seed(p, t, 0))
        aw = a * robust_weights(lg, p.lam) if p.lam > 0 else a
        if point_weights is not None:
            aw = aw * point_weights
        c_new = finish_update(aw.transpose(1, 2) @ x, aw.sum(1), c, p)
        done = (c_new - c).abs().max().item() < p.epsilon
        c = c_new
        if done:
            break
    return a @ quantized(c, p), c


# --------------------------------------------------------------------------------------- the engine


CHUNK_POINTS = 16384  # points per chunk (over all groups) when memory allows: larger blocks fall out of cache


def chunk_rows(n_clusters: int, dim: int, budget_bytes: float, groups: int = 1) -> int:
    """Rows per chunk so the ``(G, rows, K)`` working set (about 10 float tensors of that size) fits the budget,
    and at most ``CHUNK_POINTS / G`` (measured fastest on CPU); at least 64 points."""
    per_row = 4 * (10 * n_clusters + 4 * dim) * groups
    return max(64 // groups or 1, min(int(budget_bytes // per_row), CHUNK_POINTS // groups or 1))


class PointDKM:
    """DKM on weighted points, with a hand-written backward; the core every implementation runs.

    A point ``b`` of group ``g`` has an evaluation position ``e[g, b]`` (D,), a mass ``h0[g, b]`` and a
    first moment ``h1[g, b]`` (D,). Iteration ``t`` computes ``W = A(e; c_t)`` (times the palett_lambda weights)
    and ``c_{t+1} = sum_b W h1 / sum_b W h0``; the table ``T[b] = A(e_b; c_{T-1}) @ LUT(c_T)`` is the output.
    Dense DKM is the case ``e = x, h0 = 1, h1 = x``; the binned variants put histogram statistics in h0/h1.
    Everything runs in chunks of ``rows`` points and keeps only the ``(G, K, D)`` centroids and sums between
    calls, so the working set is ``rows x K`` whatever the number of points. Attention blocks are laid out
    ``(G, K, rows)`` (points last), which keeps the skinny matrix products and the softmax over K fast.
    """

    def __init__(self, e: torch.Tensor, h0: Optional[torch.Tensor], h1: Optional[torch.Tensor], p: DKMParams,
                 rows: int, cache_bytes: float = 0.0):
        self.e, self.h0, self.h1, self.p, self.rows = e, h0, h1, p, max(1, int(rows))
        self.e_t = e.transpose(1, 2).contiguous()  # (G, D, B)
        self.cs: list[torch.Tensor] = []
        self.sums: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.cache_bytes = cache_bytes
        self.cache: Optional[dict] = None

    def cache_size(self, n_clusters: int) -> int:
        """Bytes that keeping every iteration's attention (and logits, with palett_lambda) for backward takes."""
        per = self.e.shape[0] * self.e.shape[1] * n_clusters * self.e.element_size()
        return per * self.p.max_iter * (2 if self.p.lam > 0 else 1)

    @property
    def iters(self) -> int:
        return len(self.cs) - 1

    # ------------------------------------------------------------------ pieces
    def _chunks(self):
        n = self.e.shape[1]
        for start in range(0, n, self.rows):
            yield start, slice(start, min(n, start + self.rows))

    def _attention(self, sl: slice, c: torch.Tensor, t: int, start: int):
        """``(logits, attention)`` of a chunk, ``(G, K, rows)``, from the cache when the forward kept it."""
        if self.cache is not None and (t, start) in self.cache:
            return self.cache[(t, start)]
        lg, a = self._compute_attention(self.e_t[:, :, sl], c, t, start)
        if self.cache is not None:
            self.cache[(t, start)] = (lg if self.p.lam > 0 else None, a)
        return lg, a

    def _compute_attention(self, e_t: torch.Tensor, c: torch.Tensor, t: int, start: int):
        """Without palett_lambda the vector logits drop the per-point constant ``-||e||^2 / tau`` (softmax and
        argmax ignore it)."""
        p = self.p
        if e_t.shape[1] == 1:
            lg = (e_t - c).square_().mul_(-1.0 / p.tau)
        else:
            lg = torch.baddbmm((c * c).sum(-1, keepdim=True), c, e_t, alpha=-2.0)
            if p.lam > 0:
                lg += (e_t * e_t).sum(1, keepdim=True)
                lg.clamp_(min=0)
            lg.mul_(-1.0 / p.tau)
        if p.mode == "hard":
            return lg, torch.zeros_like(lg).scatter_(1, lg.argmax(1, keepdim=True), 1.0)
        seed = _noise_seed(p, t, start)
        if seed is not None:  # gsm: the same noise as the reference's (G, rows, K) draw
            lg = lg + gumbel(lg.transpose(1, 2).shape, seed, lg.device, lg.dtype).transpose(1, 2)
        return lg, torch.softmax(lg, dim=1)

    def _distance_backward(self, sl, c, g_d, scale, g_e_out, g_c):
        """``d = ||e - c||^2`` with ``dL/dd = scale * g_d (G, K, rows)``: accumulate ``dL/dc`` into ``g_c`` and, if
        asked, ``dL/de`` into ``g_e_out``."""
        g_c.sub_(g_d @ self.e[:, sl] - g_d.sum(2, keepdim=True) * c, alpha=2 * scale)
        if g_e_out is not None:
            g_e_t = g_d.sum(1, keepdim=True) * self.e_t[:, :, sl] - c.transpose(1, 2) @ g_d  # (G, D, rows)
            g_e_out[:, sl].add_(g_e_t.transpose(1, 2), alpha=2 * scale)

    def _softmax_backward_(self, a, g_a):
        """``dL/dlogits`` from ``dL/da`` (overwrites ``g_a``); None in hard mode (no gradient)."""
        if self.p.mode == "hard":
            return None
        return g_a.sub_((a * g_a).sum(1, keepdim=True)).mul_(a)

    # ------------------------------------------------------------------ forward
    def run(self, c0: torch.Tensor) -> torch.Tensor:
        """The k-means iterations from ``c0``; returns the final centroids ``c_T``."""
        p = self.p
        self.cs = [c0]
        if self.cache_bytes >= self.cache_size(c0.shape[1]):
            self.cache = {}
        for t in range(p.max_iter):
            c = self.cs[-1]
            s = torch.zeros_like(c)
            z = torch.zeros(c.shape[:2], dtype=c.dtype, device=c.device)
            for start, sl in self._chunks():
                lg, w = self._attention(sl, c, t, start)
                if p.lam > 0:
                    w = w * robust_weights(lg, p.lam)
                s += w @ (self.e[:, sl] if self.h1 is None else self.h1[:, sl])
                z += w.sum(2) if self.h0 is None else (w @ self.h0[:, sl].unsqueeze(-1))[..., 0]
            c_new = finish_update(s, z, c, p)
            self.sums.append((s, z))
            self.cs.append(c_new)
            if (c_new - c).abs().max().item() < p.epsilon:
                break
        return self.cs[-1]

    def table(self) -> torch.Tensor:
        """``T[g, b] = A(e_b; c_{T-1}) @ LUT(c_T)``, shape ``(G, B, D)``."""
        cq_t = quantized(self.cs[-1], self.p).transpose(1, 2)
        out = torch.empty_like(self.e)
        for start, sl in self._chunks():
            _, a = self._attention(sl, self.cs[-2], self.iters - 1, start)
            out[:, sl] = (cq_t @ a).transpose(1, 2)
        return out

    # ------------------------------------------------------------------ backward
    def table_backward(self, g_t: torch.Tensor, want_e: bool):
        """Backward of :meth:`table`: ``(dL/dc_{T-1}, dL/dc_T, dL/de or None)``."""
        p, cp = self.p, self.cs[-2]
        cq = quantized(self.cs[-1], p)
        g_cq = torch.zeros_like(cq)
        g_cp = torch.zeros_like(cp)
        g_e = torch.zeros_like(self.e) if want_e else None
        for start, sl in self._chunks():
            _, a = self._attention(sl, cp, self.iters - 1, start)
            g = g_t[:, sl]
            g_cq += a @ g
            g_l = self._softmax_backward_(a, cq @ g.transpose(1, 2))
            if g_l is not None:
                self._distance_backward(sl, cp, g_l, -1.0 / p.tau, g_e, g_cp)
        return g_cp, g_cq, g_e

    def backward(self, g_t: torch.Tensor, want_e: bool):
        """Gradients of ``sum(g_t * table())`` w.r.t. the points: ``(g_h0, g_h1, g_e_table, g_e_iterations)``.

        ``g_h0``/``g_h1`` are None when the masses are implicit (dense points), then their gradient is folded
        into ``g_e_iterations``."""
        p = self.p
        g_cp, g_c, g_e_table = self.table_backward(g_t, want_e)
        implicit = self.h1 is None
        g_h0 = None if self.h0 is None else torch.zeros_like(self.h0)
        g_h1 = None if implicit else torch.zeros_like(self.h1)
        g_e = torch.zeros_like(self.e) if (want_e or implicit) else None
        for t in range(self.iters - 1, -1, -1):
            c = self.cs[t]
            s, z = self.sums[t]
            g_s, g_z, g_prev = update_backward(g_c, s, z, self.cs[t + 1], p)
            for start, sl in self._chunks():
                lg, a = self._attention(sl, c, t, start)
                r = robust_weights(lg, p.lam) if p.lam > 0 else None
                w = a if r is None else a * r
                # dL/dW[k, b] = g_z[k] h0[b] + <g_s[k], h1[b]>
                h1_t = self.e_t[:, :, sl] if implicit else self.h1[:, sl].transpose(1, 2)
                g_w = g_s @ h1_t
                if self.h0 is None:
                    g_w += g_z
                else:
                    g_w.addcmul_(g_z, self.h0[:, sl].unsqueeze(1))
                if g_h0 is not None:
                    g_h0[:, sl] += (g_z.transpose(1, 2) @ w)[:, 0]
                g_h1_t = g_s.transpose(1, 2) @ w  # (G, D, rows)
                (g_e if implicit else g_h1)[:, sl] += g_h1_t.transpose(1, 2)
                g_r = None if r is None else (g_w * a).mul_(r.square()).mul_(-p.lam)  # r = 1/(1 + lam d/tau)
                g_l = self._softmax_backward_(a, g_w if r is None else g_w.mul_(r))
                if g_r is not None:  # dL/dd = (g_r - g_l) / tau
                    self._distance_backward(sl, c, g_r if g_l is None else g_r.sub_(g_l), 1.0 / p.tau, g_e, g_prev)
                elif g_l is not None:
                    self._distance_backward(sl, c, g_l, -1.0 / p.tau, g_e, g_prev)
                if self.cache is not None:
                    self.cache.pop((t, start), None)
            if t == self.iters - 1:
                g_prev += g_cp
            g_c = g_prev
        return g_h0, g_h1, g_e_table, g_e


# ------------------------------------------------------------------------------------- dense (exact)


class DenseDKM(torch.autograd.Function):
    """Exact DKM on every weight vector, in chunks of ``rows``. The backward reuses the forward's attention
    when it fits in ``cache_bytes``, and otherwise recomputes it chunk by chunk. With a :class:`Sensitivity` the
    points carry its weights (``h0 = om``, ``h1 = om x``)."""

    @staticmethod
    def forward(ctx, x, c0, p: DKMParams, rows: int, cache_bytes: float = 0.0, sens: Optional[Sensitivity] = None):
        xd = x.detach()
        om = active_weights(sens)
        om = None if om is None else om.to(xd.dtype)
        engine = PointDKM(xd, None if om is None else om[..., 0], None if om is None else om * xd, p, rows,
                          cache_bytes)
        c = engine.run(c0.detach())
        out = engine.table()
        ctx.engine, ctx.om, ctx.sens = engine, om, sens
        ctx.mark_non_differentiable(c)
        return out, c

    @staticmethod
    def backward(ctx, g_out, _g_c):
        engine, om, sens = ctx.engine, ctx.om, ctx.sens
        ctx.engine = ctx.om = ctx.sens = None
        _, g_h1, g_own, g_iter = engine.backward(g_out, want_e=True)
        g_x = g_own + g_iter if om is None else g_own + g_iter + om * g_h1  # x reaches h1 = om x too
        if sens is not None:
            sens.record(g_out)
        return g_x, None, None, None, None, None
