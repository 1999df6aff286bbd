"""Exact scalar DKM on CPU in fused numba kernels (:mod:`dkm_palett.dkm_fused_kernels`): one pass over the weights
per k-means iteration.

Same math as :func:`dkm_palett.dkm_math.dkm_reference` for ``cluster_dim=1`` and ``palett_mode="dkm"`` (with
palett_lambda, a pinned zero, grouped and quantized LUTs, and :class:`~dkm_palett.dkm_sensitivity.Sensitivity`
point weights), on float32 weights ``x (G, N)``, within float32 rounding. The forward makes ``T + 1`` passes
(``T`` iterations, then the output table); the backward ``T + 1``. This module holds the autograd function and the
per-step glue; the kernels are called through their module, so tests can count them.
"""

from __future__ import annotations

import functools
from typing import Optional

import numba
import numpy as np
import torch

from dkm_palett import dkm_fused_kernels as kernels
from dkm_palett.dkm_fused_kernels import CHUNK
from dkm_palett.dkm_math import DKMParams, finish_update, quantized, update_backward
from dkm_palett.dkm_sensitivity import Sensitivity, kernel_weights


def _per_group(parts: np.ndarray, groups: int) -> torch.Tensor:
    """Work-item partial sums ``(G * items, K)`` -> ``(G, K)`` float64 (fixed order)."""
    return torch.from_numpy(parts).reshape(groups, -1, parts.shape[1]).sum(1)


def fused_threads() -> int:
    """numba threads for the kernels: torch's thread count (so ``torch.set_num_threads`` governs both)."""
    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(threads)
    return threads


def fused_table(x: torch.Tensor, c_prev: torch.Tensor, cq: torch.Tensor, p: DKMParams) -> tuple[torch.Tensor, float]:
    """DKM's output ``A(x; c_prev) @ cq`` for ``x (G, N, 1)`` float32 (no autograd), and ``sum((out - x)^2)`` (summed
    in float64): one pass over the weights.

    :class:`FusedDKM` makes its output with this, from its last iteration's centroids ``c_prev (G, K)`` and the
    (quantized) final ones ``cq (G, K)``, so calling it again (its ``replay``) rebuilds the output bit-identically
    at half a ``kmeans_max_iter=1`` forward's cost (recompute.py)."""
    fused_threads()
    out = torch.empty(x.shape[:2], dtype=torch.float32)
    sq = np.empty(x.shape[0] * -(-x.shape[1] // CHUNK))
    kernels._table_kernel(x[..., 0].contiguous().numpy(), c_prev.contiguous().numpy(), cq.contiguous().numpy(),
                          np.float32(p.tau), out.numpy(), sq)
    return out.unsqueeze(-1), float(sq.sum())


def _replay_table(c_prev: torch.Tensor, cq: torch.Tensor, p: DKMParams, x: torch.Tensor) -> torch.Tensor:
    return fused_table(x, c_prev, cq, p)[0]


class FusedDKM(torch.autograd.Function):
    """Exact scalar DKM (``x (G, N, 1)`` float32 on CPU, ``palett_mode="dkm"``) in fused kernels; the same results
    as :class:`dkm_palett.dkm_math.DenseDKM` up to float32 rounding. Saves only ``x`` for backward (and reads a
    :class:`Sensitivity`'s estimate in place: it stays fixed until the step ends)."""

    @staticmethod
    def forward(ctx, x, c0, p: DKMParams, sens: Optional[Sensitivity] = None):
        fused_threads()
        xs = x.detach()[..., 0].contiguous().numpy()
        om = kernel_weights(sens, xs)
        groups = xs.shape[0]
        items = groups * -(-xs.shape[1] // CHUNK)
        tau, lam = np.float32(p.tau), np.float32(p.lam)
        cs, sums = [c0.detach()[..., 0].contiguous()], []
        for _ in range(p.max_iter):
            s_parts, z_parts = np.empty((items, cs[-1].shape[1])), np.empty((items, cs[-1].shape[1]))
            kernels._sums_kernel(xs, cs[-1].numpy(), tau, lam, *om, s_parts, z_parts)
            s, z = _per_group(s_parts, groups), _per_group(z_parts, groups)
            c_prev = cs[-1].double().unsqueeze(-1)
            c_new = finish_update(s.unsqueeze(-1), z, c_prev, p)[..., 0].to(x.dtype)
            sums.append((s, z))
            cs.append(c_new)
            if (c_new - cs[-2]).abs().max().item() < p.epsilon:
                break
        cq = quantized(cs[-1].unsqueeze(-1), p)[..., 0].contiguous()
        out, sq_error = fused_table(x.detach(), cs[-2], cq, p)
        ctx.save_for_backward(x)
        #: ``sum((out - x)^2)``, for the layer's ``last_error`` without another pass over the weights
        ctx.sq_error = sq_error
        ctx.state = (cs, sums, cq, p, sens)
        #: rebuilds ``out`` from the weights (recompute in backward) with one output pass: ``K`` numbers per LUT
        ctx.replay = functools.partial(_replay_table, cs[-2], cq, p)
        c = cs[-1].unsqueeze(-1)
        ctx.mark_non_differentiable(c)
        return out, c

    @staticmethod
    def backward(ctx, g_out, _g_c):
        fused_threads()
        (x,) = ctx.saved_tensors
        cs, sums, cq, p, sens = ctx.state
        ctx.state = None
        xs = x.detach()[..., 0].contiguous().numpy()
        om = kernel_weights(sens, xs)
        groups, k_n = cs[0].shape
        items = groups * -(-xs.shape[1] // CHUNK)
        tau, lam = np.float32(p.tau), np.float32(p.lam)
        gx = np.empty_like(xs)  # written by the table pass, then accumulated by the iterations
        zeros = np.zeros((groups, k_n), np.float32)
        gc_parts, ga_parts = np.empty((items, k_n)), np.empty((items, k_n))
        g = g_out[..., 0].contiguous().to(x.dtype).numpy()
        kernels._backward_kernel(xs, g, cs[-2].numpy(), zeros, cq.numpy(), tau, np.float32(0.0), True, *om[:3],
                                 False, gx, gc_parts, ga_parts)
        g_c = _per_group(ga_parts, groups)  # the LUT's gradient passes straight through its rounding
        g_table_prev = _per_group(gc_parts, groups) * (2.0 / p.tau)
        for t in range(len(sums) - 1, -1, -1):
            s, z = sums[t]
            g_s, g_z, g_prev = update_backward(g_c.unsqueeze(-1), s.unsqueeze(-1), z, cs[t + 1].double().unsqueeze(-1),
                                               p)
            kernels._backward_kernel(xs, xs, cs[t].numpy(), g_z[..., 0].float().numpy(), g_s[..., 0].float().numpy(),
                                     tau, lam, False, *om, gx, gc_parts, ga_parts)
            g_c = g_prev[..., 0] + _per_group(gc_parts, groups) * (2.0 / p.tau)
            if t == len(sums) - 1:
                g_c = g_c + g_table_prev
        if sens is not None:
            sens.record(g_out)
        return torch.from_numpy(gx).unsqueeze(-1), None, None, None
