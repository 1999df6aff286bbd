"""numba kernels for the grid binned DKM's passes over the weights (CPU, float32 weights).

The torch path of :class:`dkm_palett.dkm_binned._Grid` computes each weight's grid coordinate in chunks of float64
temporaries (about 50 bytes a weight in flight), several torch passes per sweep. These kernels make the same
sweeps in one pass each with nothing per weight: the power sums behind the interpolation moments, the interpolated
output, the table gradient and the weight gradient. They run the torch path's float64 operations in the same
order per weight, so they agree with it to float64 rounding of the sums.

Sums over the weights (the moments, the table gradient) run in a fixed number of partitions, each into its own
per-bin array, added in a fixed order: the result does not depend on the thread count.
"""

from __future__ import annotations

import numba
import numpy as np

CHUNK = 1 << 15  # weights per work item of the per-weight passes
PARTS_BYTES = 64 << 20  # at most this much for the per-partition per-bin sums
MAX_PARTS = 8


@numba.njit(inline="always")
def _coord(v, lo, delta, last):
    """The grid cell (the node left of the weight, padded index minus 1) and the position in it, ``t`` in
    ``[0, 1]`` (``dkm_binned._grid_coords``); ``last`` is the last cell."""
    pos = (np.float64(v) - lo) / delta
    left = np.floor(pos)
    left = min(max(left, 0.0), last)
    t = min(max(pos - left, 0.0), 1.0)
    return int(left), t


# The optional arrays (``v``, ``g``, ``om``) are None or an array: numba compiles one version per combination and
# prunes the ``is None`` branches, so the per-weight loops carry no flags (measured: a flag test per weight made the
# gradient pass 1.6x slower).


@numba.njit(parallel=True, cache=True)
def _scatter_kernel(x, v, lo, delta, last, out):
    """Per partition, group and cell: ``sum v t^p`` (``v`` None: 1), p = 0..4, into ``out (parts, G, bins, 5)``
    float64 zeros (a cell's sums share a cache line; a constant count of powers lets the loop unroll)."""
    groups, n = x.shape
    parts = out.shape[0]
    per = (n + parts - 1) // parts
    for job in numba.prange(groups * parts):
        grp, part = job // parts, job % parts
        for i in range(part * per, min(n, (part + 1) * per)):
            b, t = _coord(x[grp, i], lo[grp], delta[grp], last)
            s = 1.0
            if v is not None:
                s = np.float64(v[grp, i])
            for p in range(5):
                out[part, grp, b, p] += s
                s *= t


@numba.njit(parallel=True, cache=True)
def _poly_kernel(x, g, om, lo, delta, last, coef, out):
    """``out[g, i] = P_b(t)`` (``g`` None: ``coef (G, B, 4)``, a cubic per cell) or ``g_i Q_b(t) + om_i P_b(t)``
    (``coef (G, B, 7)``: the quadratic ``Q`` then the cubic ``P``; ``om`` None: 1), by Horner's rule."""
    groups, n = x.shape
    items = (n + CHUNK - 1) // CHUNK
    for job in numba.prange(groups * items):
        grp, lo_i = job // items, (job % items) * CHUNK
        for i in range(lo_i, min(n, lo_i + CHUNK)):
            b, t = _coord(x[grp, i], lo[grp], delta[grp], last)
            c = coef[grp, b]
            if g is None:
                v = c[0] + t * (c[1] + t * (c[2] + t * c[3]))
            else:
                v = c[3] + t * (c[4] + t * (c[5] + t * c[6]))
            if om is not None:
                v = np.float64(om[grp, i]) * v
            if g is not None:
                v = np.float64(g[grp, i]) * (c[0] + t * (c[1] + t * c[2])) + v
            out[grp, i] = v


def parts_for(groups: int, bins: int, rows: int) -> int:
    """Partitions of a scatter with ``rows`` per-bin arrays: up to MAX_PARTS within PARTS_BYTES (fixed by the
    shape only, so the summation order is too)."""
    return max(1, min(MAX_PARTS, PARTS_BYTES // (rows * groups * bins * 8)))


def scatter(x: np.ndarray, v, lo: np.ndarray, delta: np.ndarray, bins: int, powers: int) -> np.ndarray:
    """``(powers, G, bins)`` float64 per-cell sums ``sum v t^p`` (``v`` None: 1), ``powers`` at most 5."""
    out = np.zeros((parts_for(x.shape[0], bins, 5), x.shape[0], bins, 5))
    _scatter_kernel(x, v, lo, delta, np.float64(bins - 4), out)
    return np.ascontiguousarray(np.moveaxis(out.sum(0)[..., :powers], -1, 0))


def poly(x: np.ndarray, g, om, lo: np.ndarray, delta: np.ndarray, bins: int, coef: np.ndarray,
         out: np.ndarray) -> None:
    """:func:`_poly_kernel` into ``out`` (``g`` None: the cubic only; ``om`` None: unweighted)."""
    _poly_kernel(x, g, om, lo, delta, np.float64(bins - 4), coef, out)
