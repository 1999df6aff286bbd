"""Scalar DKM on a histogram of the weights: O(N) per-weight work plus O(bins x K) per iteration.

* fp16/bf16 weights: one bin per distinct value (found from the bit patterns), which is exact.
* fp32 weights: a uniform grid per group, and cubic (4-point Lagrange) interpolation on it. The DKM attention
  ``a(x)`` is smooth in ``x``, so the model replaces it by its cubic interpolant ``a~(x) = sum_s L_s(t) a(e_{b+s})``
  at each weight ``x = e_{b+1} + t delta``. The centroid sums ``sum_i a~(x_i) (1, x_i)`` then only need each grid
  point's moments ``h0_j = sum_i L_{j-b_i}(t_i)``, ``h1_j = sum_i L_{j-b_i}(t_i) x_i``, and the output is the
  per-point table ``T_j = A(e_j) LUT`` interpolated the same way. The weight gradient is the exact gradient of that
  interpolated model. The errors are fourth order (forward) and third order (gradient) in the grid step over the
  attention's transition width ``tau / gap``; the step comes from tau and the centroid spacing
  (:func:`grid_points`), which bounds the error whatever the weights' scale. The per-point work runs in float64, so
  only the interpolation approximates.

Nothing per weight is kept for backward: the cell and position of each weight are recomputed from the weight with
the same operations, so they are bit-identical to the forward's. On CPU the passes over the weights are numba
kernels (:mod:`dkm_palett.binned_kernels`, no per-weight temporaries), and so is the per-point DKM between them in
``palett_mode="dkm"`` (:mod:`dkm_palett.binned_points`); elsewhere torch, in chunks.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import numpy as np
import torch

from dkm_palett.dkm_math import DKMParams, PointDKM, quantized
from dkm_palett.dkm_sensitivity import Sensitivity, active_weights

# grid step = GRID_KAPPA * tau / (largest gap between neighbouring centroids). Measured on 20k weights, 2 iterations
# from quantile centroids, K = 16, 64, 256 (N(0, 0.02), U(-1, 1), Student-t(3) x 0.02, per-channel scaled): at 0.04
# the worst forward error was 2.7e-5 (Student-t, K=256), at 0.02 1.6e-6, at 0.01 1.2e-7 (float32 rounding is
# 3e-8) with gradient errors up to 1.2e-5. The forward error falls as the step^4. Linear interpolation needed
# 5e-4 for the same bound: a grid 20 times finer.
GRID_KAPPA = 0.01
COORD_CHUNK = 1 << 20  # weights per chunk when computing grid coordinates (float64 temporaries)

# The cubic Lagrange basis on the nodes -1, 0, 1, 2 at t in [0, 1]: L_s(t) = sum_p LAGRANGE[s][p] t^p.
LAGRANGE = ((0.0, -1 / 3, 1 / 2, -1 / 6), (1.0, -1 / 2, -1.0, 1 / 2),
            (0.0, 1.0, 1 / 2, -1 / 2), (0.0, -1 / 6, 0.0, 1 / 6))


class ValueRange:
    """Each group's smallest and largest weight, ``(lo (G,), hi (G,))`` of ``x (G, N)``, from one pass on first use:
    the finiteness check (:meth:`finite`), the engine choice (:func:`grid_points`) and the grid (:class:`_Grid`) of
    one forward share it. On CPU float32 one numba pass (:func:`dkm_palett.binned_kernels.value_range`), elsewhere
    ``amin`` and ``amax``; a group holding NaN or Inf gets a non-finite bound either way."""

    def __init__(self, x: torch.Tensor):
        self._x, self._bounds = x, None

    def get(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._bounds is None:
            x, self._x = self._x, None
            if x.device.type == "cpu" and x.dtype == torch.float32:
                from dkm_palett import binned_kernels  # numba: imported (and compiled, or loaded from cache) on use

                self._bounds = tuple(torch.from_numpy(b) for b in binned_kernels.value_range(x.contiguous().numpy()))
            else:
                self._bounds = (x.amin(1), x.amax(1))
        return self._bounds

    def finite(self) -> bool:
        """Whether every weight is finite (NaN propagates to both bounds, an Inf is one)."""
        return bool(torch.isfinite(torch.stack(self.get())).all())


def grid_points(x: torch.Tensor, c: torch.Tensor, tau: float, bounds: Optional[ValueRange] = None) -> int:
    """Grid points per group (three of them padding) that the fp32 binned DKM needs for its error bound, for
    scalars ``x (G, N)`` (``bounds``: their :class:`ValueRange`, if the caller has one) and centroids ``c (G, K, 1)``.

    Between neighbouring centroids ``gap`` apart the attention switches over a width of about ``tau / gap``, so
    the step ``GRID_KAPPA * tau / max gap`` keeps the forward error fourth order and the gradient error third order
    in ``GRID_KAPPA``, whatever the weights' scale (measured in tests/test_dkm_engines.py and benchmarks/README.md)."""
    gap = torch.diff(torch.sort(c[..., 0].double(), dim=1).values, dim=1).amax().item() if c.shape[1] > 1 else 0.0
    lo, hi = (bounds or ValueRange(x)).get()
    span = (hi - lo).max().item()
    if gap <= 0 or span <= 0:
        return 16
    return max(16, math.ceil(span * gap / (GRID_KAPPA * tau)) + 3)


def _chunks(n: int, groups: int):
    cols = max(1, COORD_CHUNK // groups)
    for start in range(0, n, cols):
        yield slice(start, min(n, start + cols))


def _grid_coords(x: torch.Tensor, lo: torch.Tensor, inv_delta: torch.Tensor, bins: int):
    """Flat cell index (with the group offset) of each weight and its position ``t`` in the cell (float64), for a
    chunk ``x (G, n)`` of the weights and the grid's ``1 / delta``. Cell ``b`` spans the grid points ``b + 1`` and
    ``b + 2``. A product by the reciprocal, not a division (the division cost the kernels 5-10% of each pass); both
    paths make the same product, so they agree."""
    pos = (x.double() - lo) * inv_delta
    left = pos.floor().clamp_(0, bins - 4)
    t = pos.sub_(left).clamp_(0, 1)
    offsets = torch.arange(x.shape[0], device=x.device).unsqueeze(1) * bins
    return (left.long() + offsets).reshape(-1), t


def _np32(t: Optional[torch.Tensor]):
    """A float32 numpy view (or copy) of ``t`` for the kernels; None stays None."""
    return None if t is None else t.detach().to(torch.float32).contiguous().numpy()


def _basis(dtype, device) -> torch.Tensor:
    return torch.tensor(LAGRANGE, dtype=dtype, device=device)  # (4 stencil points, 4 powers)


@functools.lru_cache(maxsize=8)
def _stencils(dtype, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The grid's stencil sums as ``conv1d`` weights (one op each, instead of four shifted copies and their sum):
    ``spread`` ``(1, 4 powers, 4 taps)``, tap ``k`` reading point ``j - 3 + k`` (left padding 3); ``cubic``
    ``(4 powers, 1, 4 taps)`` and ``grad`` ``(12, 2, 4)``, tap ``k`` reading point ``b + k`` (right padding 3).
    ``grad``'s outputs: ``g_h0`` and ``g_h1`` against ``L_k'(t)``, then ``g_h1`` against ``(p + 1) L_k(t)``. Made once
    per dtype and device (read-only constants)."""
    basis = _basis(dtype, device)
    powers = torch.arange(4, dtype=dtype, device=device)
    d_basis = torch.nn.functional.pad(basis[:, 1:] * powers[1:], (0, 1))  # L_s'(t), coefficient of t^p
    grad = torch.zeros(12, 2, 4, dtype=dtype, device=device)
    grad[0:4, 0], grad[4:8, 1], grad[8:12, 1] = d_basis.T, d_basis.T, (basis * (powers + 1)).T
    return basis.flip(0).T.unsqueeze(0).contiguous(), basis.T.unsqueeze(1).contiguous(), grad


class _Grid:
    """The uniform grid of one forward: ``bins`` points per group, ``lo - delta`` to ``hi + delta`` (float64), from
    ``x (G, N)`` or its :class:`ValueRange` ``bounds``."""

    def __init__(self, x: torch.Tensor, bins: int, bounds: Optional[ValueRange] = None):
        self.bins, self.groups = bins, x.shape[0]
        lo, hi = (bounds or ValueRange(x)).get()
        self.lo = lo.unsqueeze(1).double()
        self.delta = ((hi.unsqueeze(1).double() - self.lo) / (bins - 3)).clamp_min(torch.finfo(x.dtype).tiny)
        self.inv_delta = 1.0 / self.delta
        self.anchor = self.lo + self.delta * torch.arange(bins, device=x.device, dtype=torch.float64)  # e_{b+1}
        self.points = self.anchor - self.delta
        self.sq_error = 0.0  # of the last interpolate()

    def coords(self, x: torch.Tensor):
        """``(slice, flat index, t)`` per chunk of ``x (G, N)`` (the torch path)."""
        for sl in _chunks(x.shape[1], self.groups):
            yield (sl, *_grid_coords(x[:, sl], self.lo, self.inv_delta, self.bins))

    def _kernel_args(self, x: torch.Tensor):
        """``(binned_kernels, x, lo, 1 / delta)`` as numpy for the CPU kernels (float32 weights), else None."""
        if x.device.type != "cpu" or x.dtype != torch.float32:
            return None
        from dkm_palett import binned_kernels  # numba: imported (and compiled, or loaded from cache) on use

        return (binned_kernels, x.contiguous().numpy(), self.lo.reshape(-1).numpy(),
                self.inv_delta.reshape(-1).numpy())

    def _sums(self, x: torch.Tensor, v: Optional[torch.Tensor], powers: int) -> torch.Tensor:
        """Per cell ``sum v t^p``, p < ``powers`` (``v`` None: 1), ``(powers, G, B)`` float64."""
        args = self._kernel_args(x)
        if args is not None:
            kernels, xs, lo, inv_delta = args
            return torch.from_numpy(kernels.scatter(xs, _np32(v), lo, inv_delta, self.bins, powers))
        size = self.groups * self.bins
        sums = torch.zeros(powers, size, dtype=torch.float64, device=x.device)
        for sl, idx, t in self.coords(x):
            v_sl = torch.ones_like(t) if v is None else v[:, sl].double()
            for p in range(powers):
                sums[p] += torch.bincount(idx, weights=v_sl.reshape(-1), minlength=size)
                v_sl = v_sl * t
        return sums.reshape(-1, self.groups, self.bins)

    def _spread(self, sums: torch.Tensor) -> torch.Tensor:
        """Per-cell sums of ``q t^p`` (p = 0..3) -> per-point sums ``h_j = sum_s sum_p L_s[p] sums[p, j - s]`` of
        ``q L_{j-b}(t)``, ``(G, B)``."""
        spread = _stencils(sums.dtype, sums.device)[0]
        return torch.nn.functional.conv1d(torch.nn.functional.pad(sums[:4].transpose(0, 1), (3, 0)), spread)[:, 0]

    def power_sums(self, x: torch.Tensor, om: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Per cell ``sum om t^p``, p < 5, ``(5, G, B)``: what :meth:`moments` makes the moments from."""
        return self._sums(x, om, 5)

    def moments(self, x: torch.Tensor, om: Optional[torch.Tensor] = None):
        """Interpolation moments ``h0_j = sum om L_j(x)``, ``h1_j = sum om L_j(x) x`` ``(G, B)`` float64, with
        ``x = e_{b+1} + t delta`` in its cell ``b`` and point weights ``om (G, N)`` (None: 1)."""
        sums = self.power_sums(x, om)
        h0 = self._spread(sums)
        h1 = self._spread(sums[:4] * self.anchor + sums[1:] * self.delta)  # x t^p = e_{b+1} t^p + delta t^(p+1)
        used = sums[0] > 0
        touched = torch.nn.functional.max_pool1d(torch.nn.functional.pad(used.unsqueeze(1).double(), (3, 0)), 4, 1)[
            :, 0] > 0  # points some weight reads: point j is read by the cells j - 3 .. j
        width = int(touched.sum(1).max())
        self.order = torch.argsort((~touched).to(torch.int8), dim=1, stable=True)[:, :width]
        return h0, h1

    def table_sums(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Per cell ``sum g t^p``, p < 4, ``(4, G, B)``: what :meth:`table_grad` spreads over the grid points."""
        return self._sums(x, g, 4)

    def table_grad(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """``dL/dtable (G, B)`` of :meth:`interpolate` for ``g = dL/dout``: each weight's gradient spread over its
        four grid points with the weights ``L_s(t)``."""
        return self._spread(self.table_sums(x, g))

    def cubic(self, table: torch.Tensor) -> torch.Tensor:
        """Per cell, the coefficients of ``sum_s L_s(t) table[b + s]`` in powers of t, ``(G, B, 4)``."""
        cubic = _stencils(table.dtype, table.device)[1]
        out = torch.nn.functional.conv1d(torch.nn.functional.pad(table.unsqueeze(1), (0, 3)), cubic)
        return out.transpose(1, 2).contiguous()

    def grad_coefficients(self, cubic: torch.Tensor, g_h0: torch.Tensor, g_h1: torch.Tensor) -> torch.Tensor:
        """``(G, B, 7)``: per cell the quadratic ``Q`` (the output's slope ``dT~/dx``) and the cubic ``P`` with
        ``dL/dx = g Q(t) + P(t)``. ``P`` is ``x``'s path through the moments: ``d L_s / dx = L_s'(t) / delta`` and
        ``d (L_s x) / dx = L_s'(t) e_{b+1} / delta + t L_s'(t) + L_s(t)``."""
        powers = torch.arange(4, dtype=cubic.dtype, device=cubic.device)
        delta = self.delta.unsqueeze(-1)
        slope = cubic[..., 1:] * powers[1:] / delta
        stencil = _stencils(cubic.dtype, cubic.device)[2]
        o = torch.nn.functional.conv1d(torch.nn.functional.pad(torch.stack([g_h0, g_h1], 1), (0, 3)), stencil)
        moment = ((o[:, 0:4] + self.anchor.unsqueeze(1) * o[:, 4:8]) / delta + o[:, 8:12]).transpose(1, 2)
        return torch.cat([slope, moment], dim=-1)

    def _poly(self, x: torch.Tensor, g: Optional[torch.Tensor], coef: torch.Tensor,
              om: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, float]:
        """``P_b(t)`` (``g`` None) or ``g Q_b(t) + om P_b(t)`` at every weight, in ``x``'s dtype (float64 math), and
        for ``P_b`` alone ``sum (out - x)^2`` (else 0)."""
        out = torch.empty_like(x)
        args = self._kernel_args(x)
        if args is not None:
            kernels, xs, lo, inv_delta = args
            sq = kernels.poly(xs, _np32(g), _np32(om), lo, inv_delta, self.bins, coef.contiguous().numpy(),
                              out.numpy())
            return out, sq
        flat = coef.reshape(-1, coef.shape[-1])
        off, sq = (0 if g is None else 3), 0.0
        for sl, idx, t in self.coords(x):
            c = flat[idx].reshape(*t.shape, -1)
            v = c[..., off] + t * (c[..., off + 1] + t * (c[..., off + 2] + t * c[..., off + 3]))
            if om is not None:
                v = om[:, sl].double() * v
            if g is not None:
                v = g[:, sl].double() * (c[..., 0] + t * (c[..., 1] + t * c[..., 2])) + v
            out[:, sl] = v
            if g is None:
                sq += float((out[:, sl].double() - x[:, sl].double()).square().sum())
        return out, sq

    def interpolate(self, x: torch.Tensor, cubic: torch.Tensor) -> torch.Tensor:
        """The per-point table, as its per-cell ``cubic`` coefficients, interpolated at every weight;
        ``self.sq_error`` is then ``sum (out - x)^2`` (the layer's clustering error, summed in the same pass)."""
        out, self.sq_error = self._poly(x, None, cubic)
        return out

    def weight_grad(self, x: torch.Tensor, g: torch.Tensor, coef: torch.Tensor,
                    om: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``dL/dx = g Q_b(t) + om P_b(t)`` with the :meth:`grad_coefficients` ``coef`` (``om``: the point weights
        of :meth:`moments`, constant in ``x``)."""
        return self._poly(x, g, coef, om)[0]

    def compact(self, t: torch.Tensor) -> torch.Tensor:
        """``(G, B)`` -> the touched grid points ``(G, P)`` (padded with untouched ones, where h0 = h1 = 0). The
        per-point DKM runs on these only, so a fine grid costs at most four points per weight."""
        return t.gather(1, self.order)

    def expand(self, t: torch.Tensor) -> torch.Tensor:
        """``(G, P)`` -> ``(G, B)``; untouched grid points (never read) get the padding's values or 0."""
        return torch.zeros(self.groups, self.bins, dtype=t.dtype, device=t.device).scatter_(1, self.order, t)


def _grid_dkm(grid: _Grid, x: torch.Tensor, om: Optional[torch.Tensor], c0: torch.Tensor, p: DKMParams, rows: int):
    """The per-point stage of a grid forward: ``(engine, c_T (G, K, 1), per-cell cubics (G, B, 4))``, float64. On CPU
    float32 weights in ``palett_mode="dkm"`` without ``palett_lambda``, the numba kernels of
    :mod:`dkm_palett.binned_points` (three calls); otherwise :class:`PointDKM` on the touched points (torch)."""
    if grid._kernel_args(x) is not None and p.mode == "dkm" and p.lam == 0:
        from dkm_palett.binned_points import GridPoints  # numba: imported (and compiled, or loaded from cache) on use

        engine = GridPoints(grid.power_sums(x, om).numpy(), grid.points.numpy(), grid.anchor.numpy(),
                            grid.delta.reshape(-1).numpy(), p.tau, p.zero_index)
        c = torch.from_numpy(engine.run(c0[..., 0].contiguous().numpy(), p.max_iter, p.epsilon)).unsqueeze(-1)
        return engine, c, torch.from_numpy(engine.cubic(quantized(c, p)[..., 0].numpy()))
    h0, h1 = (grid.compact(h) for h in grid.moments(x, om))
    engine = PointDKM(grid.compact(grid.points).unsqueeze(-1), h0, h1.unsqueeze(-1), p, rows)
    c = engine.run(c0)
    return engine, c, grid.cubic(grid.expand(engine.table()[..., 0]))


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
    """The output ``(G, N, 1)`` of the grid binned DKM at ``x (G, N, 1)``: the table's per-cell cubics ``tab``
    at each weight."""
    return grid.interpolate(x[..., 0], tab).unsqueeze(-1)


class BinnedDKM(torch.autograd.Function):
    """Scalar DKM on a histogram of the weights (see the module docstring). ``x`` is ``(G, N, 1)``.

    ``exact_dtype`` (torch.float16 / torch.bfloat16): the weights are values of that dtype, so bins hold one
    distinct value each and the result is exact. Otherwise a uniform grid of ``bins`` points and cubic
    interpolation (:func:`grid_points` gives the grid for the error bound). ``ctx.replay(x)``
    rebuilds the output from the weights with the per-bin table only (no histogram, no k-means): one O(N) pass of
    the forward's own operations, so bit-identical (recompute.py calls it in backward).

    ``sens`` (grid only): a :class:`Sensitivity` whose weights ``om`` weight each weight's share of the moments
    (``h0 = sum om L``, ``h1 = sum om L x``), as the exact engines weight the points; its ``record`` gets the
    backward's ``g_out``. Nothing per weight is kept for it either: backward rebuilds ``om`` from the estimate."""

    @staticmethod
    def forward(ctx, x, c0, p: DKMParams, bins: int, exact_dtype: Optional[torch.dtype] = None, rows: int = 1 << 16,
                sens: Optional[Sensitivity] = None, bounds: Optional[ValueRange] = None):
        xd = x.detach()[..., 0]
        om = active_weights(sens)
        om = None if om is None else om[..., 0]
        if om is not None and exact_dtype is not None:
            raise ValueError("the binned DKM's exact fp16/bf16 bins take no sensitivity weights; run exact DKM")
        groups = xd.shape[0]
        f64 = torch.float64  # the per-bin work is small: do it in double so only the interpolation approximates
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
            grid = _Grid(xd, bins, bounds)
            engine, c, tab = _grid_dkm(grid, xd, om, c0.detach().to(f64), p, rows)
            ctx.replay = functools.partial(_replay_grid, grid, tab)
            out = ctx.replay(x.detach())
            ctx.sq_error = grid.sq_error  # FakePalettize's clustering error, without another pass
            ctx.state = (engine, grid, tab)
        ctx.save_for_backward(x)
        ctx.sens = sens  # om is rebuilt in backward: the estimate only changes at DKMPalettizer.step()
        c = c.to(xd.dtype)
        ctx.mark_non_differentiable(c)
        return out, c

    @staticmethod
    def backward(ctx, g_out, _g_c):
        engine, grid, tab = ctx.state
        sens = ctx.sens
        ctx.state = ctx.sens = None
        om = active_weights(sens)
        om = None if om is None else om[..., 0]
        if sens is not None:
            sens.record(g_out)
        (x,) = ctx.saved_tensors
        xd, g = x.detach()[..., 0], g_out[..., 0]
        if isinstance(grid, tuple):
            shape = engine.e.shape[:2]  # distinct values: dL/dx = g * T'(x) + (the bin's share of the centroid path)
            idx = _value_index(xd, *grid)

            def per_weight(table: torch.Tensor) -> torch.Tensor:
                return table.to(g.dtype).reshape(-1)[idx].reshape(g.shape)

            size = shape[0] * shape[1]
            g_t = torch.bincount(idx, weights=g.reshape(-1), minlength=size).reshape(shape).double()
            _, g_h1, _, g_e = engine.backward(g_t.unsqueeze(-1), want_e=True)
            _, _, own = engine.table_backward(torch.ones_like(engine.e), want_e=True)
            g_x = per_weight(own[..., 0]).mul_(g)
            g_x += per_weight(g_h1[..., 0] + g_e[..., 0] / engine.h0.clamp_min(1))
            return g_x.unsqueeze(-1), None, None, None, None, None, None, None
        if isinstance(engine, PointDKM):
            g_t = grid.table_grad(xd, g)
            g_h0, g_h1, _, _ = engine.backward(grid.compact(g_t).unsqueeze(-1), want_e=False)
            coef = grid.grad_coefficients(tab, grid.expand(g_h0), grid.expand(g_h1[..., 0]))
        else:  # the numba per-point stage (binned_points.GridPoints)
            coef = torch.from_numpy(engine.grad_coefficients(grid.table_sums(xd, g).numpy()))
        return grid.weight_grad(xd, g, coef, om).unsqueeze(-1), None, None, None, None, None, None, None
