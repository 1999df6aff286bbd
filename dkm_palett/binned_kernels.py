"""numba kernels for the grid binned DKM's passes over the weights (CPU, float32 weights).

The torch path of :class:`dkm_palett.dkm_binned._Grid` computes each weight's grid coordinate in chunks of float64
temporaries (about 50 bytes a weight in flight), several torch passes per sweep. These kernels make the same
sweeps in one pass each with nothing per weight: the hat-function moments, the interpolated output, the table
gradient and the weight gradient (at 8 bits on the 125M model of benchmarks/model_scale.py the step went from
32.8 s to 22.9 s, one cell each). They run the torch path's float64 operations in the same order per weight, so
they agree with it to float64 rounding of the sums.

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
def _coord(v, lo, delta, bins):
    """The left grid point and the fraction towards the right one (``dkm_binned._grid_coords``)."""
    pos = (np.float64(v) - lo) / delta
    left = np.floor(pos)
    left = min(max(left, 0.0), bins - 2.0)
    frac = min(max(pos - left, 0.0), 1.0)
    return int(left), frac


@numba.njit(parallel=True, cache=True)
def _scatter_kernel(x, g, lo, delta, bins, moments, out):
    """Per partition, group and left grid point: ``moments``: count, sum f, sum f^2 (``g`` unread); otherwise
    sum g and sum g f. ``out (parts, 3 or 2, G, bins)`` float64 zeros."""
    groups, n = x.shape
    parts = out.shape[0]
    per = (n + parts - 1) // parts
    for job in numba.prange(groups * parts):
        grp, part = job // parts, job % parts
        for i in range(part * per, min(n, (part + 1) * per)):
            b, f = _coord(x[grp, i], lo[grp], delta[grp], bins)
            if moments:
                out[part, 0, grp, b] += 1.0
                out[part, 1, grp, b] += f
                out[part, 2, grp, b] += f * f
            else:
                gi = np.float64(g[grp, i])
                out[part, 0, grp, b] += gi
                out[part, 1, grp, b] += gi * f


@numba.njit(parallel=True, cache=True)
def _interpolate_kernel(x, lo, delta, bins, table, out):
    """``out[g, i] = table[b] + f (table[b + 1] - table[b])`` at each weight's coordinate ``(b, f)``."""
    groups, n = x.shape
    items = (n + CHUNK - 1) // CHUNK
    for job in numba.prange(groups * items):
        grp, lo_i = job // items, (job % items) * CHUNK
        for i in range(lo_i, min(n, lo_i + CHUNK)):
            b, f = _coord(x[grp, i], lo[grp], delta[grp], bins)
            t0 = table[grp, b]
            out[grp, i] = t0 + f * (table[grp, b + 1] - t0)


@numba.njit(parallel=True, cache=True)
def _grad_x_kernel(x, g, lo, delta, bins, slope, base, dq, out):
    """``out[g, i] = slope[b] g_i + base[b] + 2 f dq[b]`` (the binned DKM's weight gradient)."""
    groups, n = x.shape
    items = (n + CHUNK - 1) // CHUNK
    for job in numba.prange(groups * items):
        grp, lo_i = job // items, (job % items) * CHUNK
        for i in range(lo_i, min(n, lo_i + CHUNK)):
            b, f = _coord(x[grp, i], lo[grp], delta[grp], bins)
            out[grp, i] = slope[grp, b] * np.float64(g[grp, i]) + base[grp, b] + f * dq[grp, b] * 2.0


def parts_for(groups: int, bins: int, rows: int) -> int:
    """Partitions of a scatter with ``rows`` per-bin arrays: up to MAX_PARTS within PARTS_BYTES (fixed by the
    shape only, so the summation order is too)."""
    return max(1, min(MAX_PARTS, PARTS_BYTES // (rows * groups * bins * 8)))


def scatter(x: np.ndarray, g, lo: np.ndarray, delta: np.ndarray, bins: int) -> np.ndarray:
    """``(3, G, bins)`` moments (``g is None``) or ``(2, G, bins)`` gradient sums, float64."""
    rows = 3 if g is None else 2
    out = np.zeros((parts_for(x.shape[0], bins, rows), rows, x.shape[0], bins))
    _scatter_kernel(x, x if g is None else g, lo, delta, np.float64(bins), g is None, out)
    return out.sum(0)
