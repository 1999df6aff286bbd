"""Scalar DKM on a histogram of the weights: O(N) per-weight work plus O(bins x K) per iteration.

* fp16/bf16 weights: one bin per distinct value (found from the bit patterns), which is exact.
* fp32 weights: a uniform grid per group. Each weight is spread over its two neighbouring grid points with linear
  (hat) weights, so the centroid sums use the linear interpolant of the attention, and the output interpolates the
  per-bin table linearly; the weight gradient is the exact gradient of that interpolated model. The grid step comes
  from tau and the centroid spacing (:func:`grid_points`), which bounds the error whatever the weights' scale; the
  per-bin work runs in float64, so only the interpolation approximates.

Nothing per weight is kept for backward: the bin index and fraction of each weight are recomputed from the weight
with the same operations, so they are bit-identical to the forward's. On CPU the passes over the weights are numba
kernels (:mod:`dkm_palett.binned_kernels`, no per-weight temporaries); elsewhere torch, in chunks.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import numpy as np
import torch

from dkm_palett.dkm_math import DKMParams, PointDKM

GRID_KAPPA = 5e-4  # grid step = GRID_KAPPA * tau / (largest gap between neighbouring centroids)
COORD_CHUNK = 1 << 20  # weights per chunk when computing bin coordinates (float64 temporaries)


def grid_points(x: torch.Tensor, c: torch.Tensor, tau: float) -> int:
    """Grid points per group that the fp32 binned DKM needs for its error bound, for scalars ``x (G, N)`` and
    centroids ``c (G, K, 1)``.

    Between neighbouring centroids ``gap`` apart the attention switches over a width of about ``tau / gap``, so
    the step ``GRID_KAPPA * tau / max gap`` keeps the forward error second order and the gradient error first order
    in ``GRID_KAPPA``, whatever the weights' scale (measured in tests/test_dkm_binned.py and benchmarks/README.md)."""
    gap = torch.diff(torch.sort(c[..., 0].double(), dim=1).values, dim=1).amax().item() if c.shape[1] > 1 else 0.0
    span = (x.amax(1) - x.amin(1)).max().item()
    if gap <= 0 or span <= 0:
        return 16
    return max(16, math.ceil(span * gap / (GRID_KAPPA * tau)) + 1)


def _chunks(n: int, groups: int):
    cols = max(1, COORD_CHUNK // groups)
    for start in range(0, n, cols):
        yield slice(start, min(n, start + cols))


def _grid_coords(x: torch.Tensor, lo: torch.Tensor, delta: torch.Tensor, bins: int):
    """Flat bin index (with the group offset) of each weight's left grid point, and its fraction towards the right
    one (float64), for a chunk ``x (G, n)`` of the weights."""
    pos = (x.double() - lo) / delta
    left = pos.floor().clamp_(0, bins - 2)
    frac = pos.sub_(left).clamp_(0, 1)
    offsets = torch.arange(x.shape[0], device=x.device).unsqueeze(1) * bins
    return (left.long() + offsets).reshape(-1), frac


def _shift(t: torch.Tensor) -> torch.Tensor:
    """``out[:, b] = t[:, b - 1]``, ``out[:, 0] = 0``."""
    return torch.nn.functional.pad(t[:, :-1], (1, 0))


def _step(t: torch.Tensor) -> torch.Tensor:
    """``out[:, b] = t[:, b + 1] - t[:, b]``, ``out[:, -1] = 0``."""
    return torch.nn.functional.pad(t[:, 1:] - t[:, :-1], (0, 1))


class _Grid:
    """The uniform grid of one forward: ``bins`` points per group from ``lo`` in steps of ``delta`` (float64)."""

    def __init__(self, x: torch.Tensor, bins: int):
        self.bins, self.groups = bins, x.shape[0]
        self.lo = x.amin(1, keepdim=True).double()
        self.delta = ((x.amax(1, keepdim=True).double() - self.lo) / (bins - 1)).clamp_min(torch.finfo(x.dtype).tiny)
        self.points = self.lo + self.delta * torch.arange(bins, device=x.device, dtype=torch.float64)

    def coords(self, x: torch.Tensor):
        """``(slice, flat index, fraction)`` per chunk of ``x (G, N)`` (the torch path)."""
        for sl in _chunks(x.shape[1], self.groups):
            yield (sl, *_grid_coords(x[:, sl], self.lo, self.delta, self.bins))

    def scatter(self, idx: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        size = self.groups * self.bins
        return torch.bincount(idx, weights=values.reshape(-1), minlength=size).reshape(self.groups, self.bins)

    def _kernel_args(self, x: torch.Tensor):
        """``(binned_kernels, x, lo, delta)`` as numpy for the CPU kernels (float32 weights), else None."""
        if x.device.type != "cpu" or x.dtype != torch.float32:
            return None
        from dkm_palett import binned_kernels  # numba: imported (and compiled, or loaded from cache) on use

        return (binned_kernels, x.contiguous().numpy(), self.lo.reshape(-1).numpy(),
                self.delta.reshape(-1).numpy())

    def _sums(self, x: torch.Tensor, g: Optional[torch.Tensor]) -> list:
        """Per-bin sums at each weight's left grid point: count, sum f, sum f^2 (``g`` None), or sum g, sum g f."""
        args = self._kernel_args(x)
        if args is not None:
            kernels, xs, lo, delta = args
            gs = None if g is None else g.detach().to(torch.float32).contiguous().numpy()
            return list(torch.from_numpy(kernels.scatter(xs, gs, lo, delta, self.bins)))
        sums = [0, 0, 0] if g is None else [0, 0]
        for sl, idx, frac in self.coords(x):
            if g is None:
                values = (torch.ones_like(frac), frac, frac * frac)
            else:
                gd = g[:, sl].double()
                values = (gd, gd * frac)
            sums = [total + self.scatter(idx, v) for total, v in zip(sums, values)]
        return sums

    def moments(self, x: torch.Tensor):
        """Hat-function moments ``h0 = sum phi_b(x)``, ``h1 = sum phi_b(x) x`` ``(G, B)`` float64."""
        cnt, f1, f2 = self._sums(x, None)
        h0 = cnt - f1 + _shift(f1)  # sum of (1 - f) at the left grid point, f at the right one
        m = f1 - f2
        h1 = self.points * h0 + self.delta * (m - _shift(m))  # x = grid[i0] + f delta
        touched = (cnt > 0) | (_shift(cnt) > 0)  # grid points some weight interpolates from
        width = int(touched.sum(1).max())
        self.order = torch.argsort((~touched).to(torch.int8), dim=1, stable=True)[:, :width]
        return h0, h1

    def table_grad(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """``dL/dtable (G, B)`` of :meth:`interpolate` for ``g = dL/dout``: each weight's gradient spread over its
        two grid points with the hat weights ``(1 - f, f)``."""
        g_left, g_right = self._sums(x, g)
        return g_left - g_right + _shift(g_right)

    def weight_grad(self, x: torch.Tensor, g: torch.Tensor, slope: torch.Tensor, base: torch.Tensor,
                    dq: torch.Tensor) -> torch.Tensor:
        """``slope[b] g + base[b] + 2 f dq[b]`` at each weight's coordinate ``(b, f)``, in ``x``'s dtype."""
        g_x = torch.empty_like(x)
        args = self._kernel_args(x)
        if args is not None:
            kernels, xs, lo, delta = args
            kernels._grad_x_kernel(xs, g.detach().to(torch.float32).contiguous().numpy(), lo, delta,
                                   np.float64(self.bins), slope.numpy(), base.numpy(), dq.numpy(), g_x.numpy())
            return g_x
        for sl, idx, frac in self.coords(x):
            g_x[:, sl] = _at(slope, idx, frac).mul_(g[:, sl]).add_(_at(base, idx, frac)).addcmul_(
                frac, _at(dq, idx, frac), value=2.0)
        return g_x

    def compact(self, t: torch.Tensor) -> torch.Tensor:
        """``(G, B)`` -> the touched grid points ``(G, P)`` (padded with untouched ones, where h0 = h1 = 0). The
        per-bin DKM runs on these only, so a fine grid costs at most two points per weight."""
        return t.gather(1, self.order)

    def expand(self, t: torch.Tensor) -> torch.Tensor:
        """``(G, P)`` -> ``(G, B)``; untouched grid points (never read) get the padding's values or 0."""
        return torch.zeros(self.groups, self.bins, dtype=t.dtype, device=t.device).scatter_(1, self.order, t)

    def interpolate(self, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """The per-bin ``table (G, B)`` interpolated linearly at every weight (float64 math, ``x``'s dtype)."""
        out = torch.empty_like(x)
        args = self._kernel_args(x)
        if args is not None:
            kernels, xs, lo, delta = args
            kernels._interpolate_kernel(xs, lo, delta, np.float64(self.bins), table.contiguous().numpy(), out.numpy())
            return out
        step = _step(table)
        for sl, idx, frac in self.coords(x):
            out[:, sl] = _at(table, idx, frac).addcmul_(frac, _at(step, idx, frac))
        return out


def _at(table: torch.Tensor, idx: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``table`` entries at the flat indices ``idx``, shaped like ``like``."""
    return table.reshape(-1)[idx].reshape(like.shape)


def _value_codes(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The ``dtype`` (fp16/bf16) bit pattern of each weight, as int64 in ``[0, 65536)``."""
    return x.to(dtype).view(torch.int16).long() + 32768


def _value_bins(x: torch.Tensor, dtype: torch.dtype):
    """One bin per distinct ``dtype`` value, found from the bit patterns in O(N).

    Returns ``remap`` (bit pattern -> distinct-value index), the distinct values ``(U,)`` and the counts ``(G, U)``."""
    groups = x.shape[0]
    group_ids = torch.arange(groups, device=x.device).unsqueeze(1)
    counts = torch.bincount((_value_codes(x, dtype) + group_ids * 65536).reshape(-1),
                            minlength=groups * 65536).reshape(groups, 65536)
    present = counts.sum(0) > 0
    remap = torch.cumsum(present, 0) - 1
    all_codes = torch.arange(-32768, 32768, device=x.device, dtype=torch.int32)
    values = all_codes[present].to(torch.int16).view(dtype).to(x.dtype)
    return remap, values, counts[:, present].double()


def _value_index(x: torch.Tensor, dtype: torch.dtype, remap: torch.Tensor) -> torch.Tensor:
    """Flat index (distinct value, with the group offset) of each weight."""
    u = int(remap[-1]) + 1
    return (remap[_value_codes(x, dtype)] + torch.arange(x.shape[0], device=x.device).unsqueeze(1) * u).reshape(-1)


def _replay_values(tab: torch.Tensor, dtype: torch.dtype, remap: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The output ``(G, N, 1)`` of the exact (fp16/bf16) binned DKM at ``x (G, N, 1)``: each weight's
    distinct-value entry of ``tab``."""
    return tab.reshape(-1)[_value_index(x[..., 0], dtype, remap)].reshape(x.shape)


def _replay_grid(grid: _Grid, tab: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The output ``(G, N, 1)`` of the grid binned DKM at ``x (G, N, 1)``: ``tab`` interpolated at each weight."""
    return grid.interpolate(x[..., 0], tab).unsqueeze(-1)


class BinnedDKM(torch.autograd.Function):
    """Scalar DKM on a histogram of the weights (see the module docstring). ``x`` is ``(G, N, 1)``.

    ``exact_dtype`` (torch.float16 / torch.bfloat16): the weights are values of that dtype, so bins hold one
    distinct value each and the result is exact. Otherwise a uniform grid of ``bins`` points with linear
    binning and linear interpolation (:func:`grid_points` gives the grid for the error bound). ``ctx.replay(x)``
    rebuilds the output from the weights with the per-bin table only (no histogram, no k-means): one O(N) pass of
    the forward's own operations, so bit-identical (recompute.py calls it in backward)."""

    @staticmethod
    def forward(ctx, x, c0, p: DKMParams, bins: int, exact_dtype: Optional[torch.dtype] = None, rows: int = 1 << 16):
        xd = x.detach()[..., 0]
        groups = xd.shape[0]
        f64 = torch.float64  # the per-bin work is small: do it in double so only the binning approximates
        if exact_dtype is not None:
            remap, values, counts = _value_bins(xd, exact_dtype)
            e = values.to(f64).reshape(1, -1, 1).expand(groups, -1, 1).contiguous()
            engine = PointDKM(e, counts, counts.unsqueeze(-1) * e, p, rows)
            c = engine.run(c0.detach().to(f64))
            tab = engine.table()[..., 0].to(xd.dtype)
            ctx.replay = functools.partial(_replay_values, tab, exact_dtype, remap)
            out = ctx.replay(x.detach())
            ctx.state = (engine, (exact_dtype, remap), None)
        else:
            grid = _Grid(xd, bins)
            h0, h1 = (grid.compact(h) for h in grid.moments(xd))
            engine = PointDKM(grid.compact(grid.points).unsqueeze(-1), h0, h1.unsqueeze(-1), p, rows)
            c = engine.run(c0.detach().to(f64))
            tab = grid.expand(engine.table()[..., 0])
            ctx.replay = functools.partial(_replay_grid, grid, tab)
            out = ctx.replay(x.detach())
            ctx.state = (engine, grid, tab)
        ctx.save_for_backward(x)
        c = c.to(xd.dtype)
        ctx.mark_non_differentiable(c)
        return out, c

    @staticmethod
    def backward(ctx, g_out, _g_c):
        engine, grid, tab = ctx.state
        ctx.state = None
        (x,) = ctx.saved_tensors
        xd, g = x.detach()[..., 0], g_out[..., 0]
        shape = engine.e.shape[:2]
        if isinstance(grid, tuple):  # distinct values: dL/dx = g * T'(x) + (the bin's share of the centroid path)
            idx = _value_index(xd, *grid)

            def per_weight(table: torch.Tensor) -> torch.Tensor:
                return table.to(g.dtype).reshape(-1)[idx].reshape(g.shape)

            size = shape[0] * shape[1]
            g_t = torch.bincount(idx, weights=g.reshape(-1), minlength=size).reshape(shape).double()
            _, g_h1, _, g_e = engine.backward(g_t.unsqueeze(-1), want_e=True)
            _, _, own = engine.table_backward(torch.ones_like(engine.e), want_e=True)
            g_x = per_weight(own[..., 0]).mul_(g)
            g_x += per_weight(g_h1[..., 0] + g_e[..., 0] / engine.h0.clamp_min(1))
            return g_x.unsqueeze(-1), None, None, None, None, None
        g_t = grid.table_grad(xd, g)
        g_h0, g_h1, _, _ = engine.backward(grid.compact(g_t).unsqueeze(-1), want_e=False)
        g_h0, g_h1 = grid.expand(g_h0), grid.expand(g_h1[..., 0])
        dq, dp = _step(g_h1), _step(g_h0)
        # x = grid[i0] + f delta; h0, h1 move with x through the hat weights (1 - f, f):
        # dL/dx = g * slope + (dp + x dq) / delta + g_h1[i0] + f dq = g * slope + base + 2 f dq
        base = (dp + grid.points * dq) / grid.delta + g_h1
        slope = _step(tab) / grid.delta
        return grid.weight_grad(xd, g, slope, base, dq).unsqueeze(-1), None, None, None, None, None
