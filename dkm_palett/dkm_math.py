"""The DKM math (Cho et al., ICLR 2022) on grouped vectors ``X (G, N, D)`` with centroids ``C (G, K, D)``.

One iteration: ``A = softmax(-||x - c||^2 / tau)``, ``C' = A^T X / sum(A)``; after the last one the output is
``A C'``. Three implementations of the same math:

* :func:`dkm_reference`: plain autograd, materialises every ``(G, N, K)`` tensor. The yardstick for tests.
* :class:`DenseDKM`: exact and memory-bounded. Works in chunks of rows and recomputes them in backward, so
  the working set is ``chunk x K`` instead of ``N x K`` per iteration.
* :class:`BinnedDKM`: scalar LUTs only, in O(N) time and memory plus O(bins x K). Weights are grouped into
  bins. fp16/bf16 weights get one bin per distinct value, where this is exact. For fp32 weights the bins form
  a uniform grid of ``bins`` points per group. Centroid updates use each bin's exact sum and count, with the
  attention taken at the bin mean. The output interpolates linearly between grid points. The error is bounded by
  the grid step ``delta``: an attention logit moves by at most ``|x - c| * delta / tau``, and the interpolation
  error is at most ``delta**2 / 8 * max|T''|``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from dkm_palett.lut import fake_quantize_lut


@dataclass(frozen=True)
class DKMParams:
    """The knobs of one DKM forward."""

    tau: float = 1e-4
    mode: str = "dkm"  # dkm | gsm | hard
    max_iter: int = 3
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


def dkm_reference(x: torch.Tensor, c0: torch.Tensor, p: DKMParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Straightforward DKM with plain autograd. Returns ``(output (G,N,D), final centroids (G,K,D))``."""
    c = c0.detach()
    a = None
    for t in range(p.max_iter):
        lg = logits(x, c, p.tau)
        a = attention(lg, p, _noise_seed(p, t, 0))
        aw = a * robust_weights(lg, p.lam) if p.lam > 0 else a
        c_new = finish_update(aw.transpose(1, 2) @ x, aw.sum(1), c, p)
        done = (c_new - c).abs().max().item() < p.epsilon
        c = c_new
        if done:
            break
    return a @ quantized(c, p), c


# --------------------------------------------------------------------------------------- dense, chunked


def chunk_rows(n_clusters: int, dim: int, budget_bytes: float) -> int:
    """Rows per chunk so the ``(G, rows, K)`` working set (about 10 float tensors of that size) fits the budget."""
    per_row = 4 * (10 * n_clusters + 4 * dim)
    return max(64, int(budget_bytes // per_row))


class DenseDKM(torch.autograd.Function):
    """Exact DKM forward/backward in row chunks; the backward recomputes each chunk's attention."""

    @staticmethod
    def forward(ctx, x, c0, p: DKMParams, rows: int):
        n = x.shape[1]
        xd = x.detach()
        cs = [c0.detach()]
        sums = []
        for t in range(p.max_iter):
            c = cs[-1]
            s = torch.zeros_like(c)
            z = torch.zeros(c.shape[:2], dtype=c.dtype, device=c.device)
            for start in range(0, n, rows):
                xc = xd[:, start:start + rows]
                lg = logits(xc, c, p.tau)
                a = attention(lg, p, _noise_seed(p, t, start))
                if p.lam > 0:
                    a = a * robust_weights(lg, p.lam)
                s += a.transpose(1, 2) @ xc
                z += a.sum(1)
            c_new = finish_update(s, z, c, p)
            sums.append((s, z))
            cs.append(c_new)
            if (c_new - c).abs().max().item() < p.epsilon:
                break
        iters = len(cs) - 1
        cq = quantized(cs[-1], p)
        out = torch.empty_like(xd)
        for start in range(0, n, rows):
            xc = xd[:, start:start + rows]
            a = attention(logits(xc, cs[-2], p.tau), p, _noise_seed(p, iters - 1, start))
            out[:, start:start + rows] = a @ cq
        ctx.save_for_backward(x, *cs)
        ctx.p, ctx.rows, ctx.iters, ctx.sums = p, rows, iters, sums
        ctx.mark_non_differentiable(cs[-1])
        return out, cs[-1]

    @staticmethod
    def backward(ctx, g_out, _g_c):
        x, *cs = ctx.saved_tensors
        p, rows, iters = ctx.p, ctx.rows, ctx.iters
        n = x.shape[1]
        xd = x.detach()
        gx = torch.zeros_like(xd)
        cq = quantized(cs[-1], p).detach()
        g_c = torch.zeros_like(cs[-1])  # gradient w.r.t. C_T (straight through the LUT rounding)
        g_prev = torch.zeros_like(cs[-1])  # gradient w.r.t. C_{T-1} from the output attention
        for start in range(0, n, rows):
            with torch.enable_grad():
                xc = xd[:, start:start + rows].requires_grad_()
                cp = cs[-2].detach().requires_grad_()
                a = attention(logits(xc, cp, p.tau), p, _noise_seed(p, iters - 1, start))
                go = g_out[:, start:start + rows]
                g_c += a.detach().transpose(1, 2) @ go
                if a.requires_grad:
                    gxc, gcp = torch.autograd.grad(a, (xc, cp), go @ cq.transpose(1, 2))
                    gx[:, start:start + rows] += gxc
                    g_prev += gcp
        g_c = pin_zero(g_c, p)
        for t in range(iters - 1, -1, -1):
            c_prev = cs[t]
            with torch.enable_grad():
                s_leaf = ctx.sums[t][0].detach().requires_grad_()
                z_leaf = ctx.sums[t][1].detach().requires_grad_()
                cp_leaf = c_prev.detach().requires_grad_()
                c_next = finish_update(s_leaf, z_leaf, cp_leaf, p)
                g_s, g_z, g_cp = torch.autograd.grad(c_next, (s_leaf, z_leaf, cp_leaf), g_c, allow_unused=True)
            g_new = torch.zeros_like(c_prev) if g_cp is None else g_cp
            for start in range(0, n, rows):
                with torch.enable_grad():
                    xc = xd[:, start:start + rows].requires_grad_()
                    cp = c_prev.detach().requires_grad_()
                    lg = logits(xc, cp, p.tau)
                    a = attention(lg, p, _noise_seed(p, t, start))
                    if p.lam > 0:
                        a = a * robust_weights(lg, p.lam)
                    s_c = a.transpose(1, 2) @ xc
                    z_c = a.sum(1)
                    pairs = [(o, go) for o, go in ((s_c, g_s), (z_c, g_z)) if o.requires_grad and go is not None]
                    gxc, gcp = torch.autograd.grad([o for o, _ in pairs], (xc, cp), [go for _, go in pairs],
                                                   allow_unused=True)
                if gxc is not None:
                    gx[:, start:start + rows] += gxc
                if gcp is not None:
                    g_new += gcp
            if t == iters - 1:
                g_new += g_prev
            g_c = g_new
        ctx.sums = None
        return gx, None, None, None


# --------------------------------------------------------------------------------------- binned (scalars)


class BinnedDKM(torch.autograd.Function):
    """Scalar DKM on bins (see the module docstring). ``x`` is ``(G, N, 1)``."""

    @staticmethod
    def forward(ctx, x, c0, p: DKMParams, bins: int, exact_values: bool):
        xd = x.detach()[..., 0]
        groups, n = xd.shape
        dev = xd.device
        offsets = (torch.arange(groups, device=dev) * bins).unsqueeze(1)
        if exact_values:
            # one bin per distinct value: exact for fp16/bf16 weights (and whenever values repeat)
            uniq, inverse = torch.unique(xd, return_inverse=True)
            bins = uniq.numel()
            offsets = (torch.arange(groups, device=dev) * bins).unsqueeze(1)
            flat = (inverse + offsets).reshape(-1)
            grid = uniq.unsqueeze(0).expand(groups, -1)
            lo = delta = frac = i0 = None
        else:
            lo = xd.amin(1, keepdim=True)
            hi = xd.amax(1, keepdim=True)
            delta = ((hi - lo) / (bins - 1)).clamp_min(torch.finfo(xd.dtype).tiny)
            pos = (xd - lo) / delta
            i0 = pos.floor().clamp_(0, bins - 2)
            frac = pos - i0
            i0 = i0.long()
            flat = (i0 + (frac >= 0.5).long() + offsets).reshape(-1)
            grid = lo + delta * torch.arange(bins, device=dev, dtype=xd.dtype)
        counts = torch.bincount(flat, minlength=groups * bins).reshape(groups, bins).to(xd.dtype)
        sums = torch.bincount(flat, weights=xd.reshape(-1).to(torch.float64),
                              minlength=groups * bins).reshape(groups, bins).to(xd.dtype)
        with torch.enable_grad():
            s_leaf = sums.clone().requires_grad_()
            e_leaf = grid.detach().clone().requires_grad_()
            means = torch.where(counts > 0, s_leaf / counts.clamp_min(1), grid)
            pts = means.unsqueeze(-1)
            c = c0.detach()
            cs = [c]
            a = None
            for t in range(p.max_iter):
                lg = logits(pts, c, p.tau)
                a = torch.softmax(lg, dim=-1)
                aw = a * robust_weights(lg, p.lam) if p.lam > 0 else a
                aw = aw * counts.unsqueeze(-1)
                c_new = finish_update(aw.transpose(1, 2) @ pts, aw.sum(1), c, p)
                done = (c_new - c).abs().max().item() < p.epsilon
                c = c_new
                cs.append(c)
                if done:
                    break
            cq = quantized(c, p)
            table = torch.softmax(logits(e_leaf.unsqueeze(-1), cs[-2].detach() if len(cs) > 1 else cs[0], p.tau),
                                  dim=-1) @ cq.detach()
            table = table[..., 0]
            # the C-path: the table through the centroid chain (attention at the evaluation points held fixed)
            a_eval = torch.softmax(logits(grid.unsqueeze(-1), cs[-2], p.tau), dim=-1)
            table_c = (a_eval @ cq)[..., 0]
            (slope_own,) = torch.autograd.grad(table.sum(), e_leaf) if exact_values else (None,)
        tab = table.detach()
        if exact_values:
            out = tab.reshape(-1)[flat].reshape(groups, n)
            own = slope_own.detach().reshape(-1)
        else:
            t0 = torch.gather(tab, 1, i0)
            t1 = torch.gather(tab, 1, i0 + 1)
            out = t0 + frac * (t1 - t0)
            own = ((tab[:, 1:] - tab[:, :-1]) / delta)
        ctx.graph = (table_c, s_leaf)
        ctx.exact_values = exact_values
        ctx.bins = bins
        ctx.save_for_backward(flat, own, frac if frac is not None else torch.empty(0),
                              i0 if i0 is not None else torch.empty(0, dtype=torch.long))
        ctx.mark_non_differentiable(c)
        return out.unsqueeze(-1), c.detach()

    @staticmethod
    def backward(ctx, g_out, _g_c):
        flat, own, frac, i0 = ctx.saved_tensors
        table_c, s_leaf = ctx.graph
        groups, bins = table_c.shape
        g = g_out[..., 0]
        if ctx.exact_values:
            g_table = torch.bincount(flat, weights=g.reshape(-1).to(torch.float64),
                                     minlength=groups * bins).reshape(groups, bins).to(g.dtype)
            g_own = g * own[flat].reshape(g.shape)
        else:
            offsets = (torch.arange(groups, device=g.device) * bins).unsqueeze(1)
            base = (i0 + offsets).reshape(-1)
            gw = g.reshape(-1).to(torch.float64)
            fr = frac.reshape(-1).to(torch.float64)
            g_table = (torch.bincount(base, weights=gw * (1 - fr), minlength=groups * bins)
                       + torch.bincount(base + 1, weights=gw * fr, minlength=groups * bins))
            g_table = g_table.reshape(groups, bins).to(g.dtype)
            g_own = g * torch.gather(own, 1, i0)
        (g_s,) = torch.autograd.grad(table_c, s_leaf, g_table)
        g_x = g_own + g_s.reshape(-1)[flat].reshape(g.shape)
        ctx.graph = None
        return g_x.unsqueeze(-1), None, None, None, None
