"""numba kernels for the grid binned DKM's passes over the weights (CPU, float32 weights).

The torch path of :class:`dkm_palett.dkm_binned._Grid` computes each weight's grid coordinate in chunks of float64
temporaries (about 50 bytes a weight in flight), several torch passes per sweep. These kernels make the same
sweeps in one pass each with nothing per weight: the power sums behind the interpolation moments, the interpolated
output, the table gradient and the weight gradient. They run the torch path's float64 operations in the same
order per weight, so they agree with it to float64 rounding of the sums.

Products and sums may fuse into FMAs (``fastmath={"contract"}``, as in :mod:`dkm_palett.dkm_fused_kernels`; 5-8% off
each pass), nothing else reorders float math. A kernel rounds the same way every time it runs, so the backward's
recomputed cells and outputs stay bit-identical to the forward's.

Sums over the weights (the moments, the table gradient) run in a fixed number of partitions, each into its own
per-bin array, added in a fixed order: the result does not depend on the thread count.
"""

from __future__ import annotations

import numba
import numpy as np

CHUNK = 1 << 15  # weights per work item of the per-weight passes
BLOCK = 512  # weights per block: their cells and positions go to small buffers first (vectorised), then the gathers
PARTS_BYTES = 64 << 20  # at most this much for the per-partition per-bin sums
MAX_PARTS = 8
_FAST = {"contract"}


@numba.njit(inline="always", fastmath=_FAST)
def _cells(xs, nb, lo, inv_delta, last, cell, t):
    """``cell[:nb]``, ``t[:nb]``: each weight's grid cell (the node left of it, padded index minus 1) and its
    position in it, in ``[0, 1]`` (``dkm_binned._grid_coords``'s operations, with the grid's ``1 / delta``);
    ``last`` is the last cell.

    A loop with no gathers or scatters, so LLVM vectorises it; the per-cell gathers and scatters then run from
    these buffers (measured: each pass takes half the time of one scalar loop doing both)."""
    for i in range(nb):
        pos = (np.float64(xs[i]) - lo) * inv_delta
        left = min(max(np.floor(pos), 0.0), last)
        t[i] = min(max(pos - left, 0.0), 1.0)
        cell[i] = np.int32(left)


@numba.njit(inline="always")
def _buffers():
    return np.empty(BLOCK, np.int32), np.empty(BLOCK, np.float64)


# The optional arrays (``v``, ``g``, ``om``) are None or an array: numba compiles one version per combination and
# prunes the ``is None`` branches, so the per-weight loops carry no flags (measured: a flag test per weight made the
# gradient pass 1.6x slower).


@numba.njit(parallel=True, cache=True, fastmath=_FAST)
def _scatter_kernel(x, v, lo, inv_delta, last, out):
    """Per partition, group and cell: ``sum v t^p`` (``v`` None: 1), p = 0..4, into ``out (parts, G, bins, 5)``
    float64 zeros (a cell's sums share a cache line). The powers are made first and added as five independent
    statements, which LLVM's SLP vectoriser turns into one 4-wide add and store plus one scalar (the pass was
    store-bound: 5 to 7% faster than a loop over the powers)."""
    groups, n = x.shape
    parts = out.shape[0]
    per = (n + parts - 1) // parts
    for job in numba.prange(groups * parts):
        grp, part = job // parts, job % parts
        acc = out[part, grp].reshape(-1)
        cell, ts = _buffers()
        end = min(n, (part + 1) * per)
        for b0 in range(part * per, end, BLOCK):
            nb = min(BLOCK, end - b0)
            _cells(x[grp, b0:b0 + nb], nb, lo[grp], inv_delta[grp], last, cell, ts)
            for i in range(nb):
                b, t = cell[i] * 5, ts[i]
                s0 = 1.0
                if v is not None:
                    s0 = np.float64(v[grp, b0 + i])
                s1 = s0 * t
                s2 = s1 * t
                s3 = s2 * t
                acc[b] += s0
                acc[b + 1] += s1
                acc[b + 2] += s2
                acc[b + 3] += s3
                acc[b + 4] += s3 * t


@numba.njit(parallel=True, cache=True, fastmath=_FAST)
def _poly_kernel(x, g, om, lo, inv_delta, last, coef, out, sq):
    """``out[g, i] = P_b(t)`` (``g`` None: ``coef (G, B, 4)``, a cubic per cell) or ``g_i Q_b(t) + om_i P_b(t)``
    (``coef (G, B, 7)``: the quadratic ``Q`` then the cubic ``P``; ``om`` None: 1), by Horner's rule. ``sq`` (None
    or an array): also ``sq[job] = sum (out - x)^2`` per work item (the layer's clustering error, while both are
    in cache)."""
    groups, n = x.shape
    items = (n + CHUNK - 1) // CHUNK
    for job in numba.prange(groups * items):
        grp, lo_i = job // items, (job % items) * CHUNK
        cf = coef[grp].reshape(-1)
        cell, ts = _buffers()
        sq_lanes = np.zeros(BLOCK)  # per-lane partial sums: a loop that vectorises, summed once per work item
        for b0 in range(lo_i, min(n, lo_i + CHUNK), BLOCK):
            nb = min(BLOCK, n - b0)
            xs = x[grp, b0:b0 + nb]
            _cells(xs, nb, lo[grp], inv_delta[grp], last, cell, ts)
            o = out[grp, b0:b0 + nb]
            for i in range(nb):
                t = ts[i]
                if g is None:
                    b = cell[i] * 4  # constant widths: measured 1.9x faster than coef.shape[2]
                    v = cf[b] + t * (cf[b + 1] + t * (cf[b + 2] + t * cf[b + 3]))
                else:
                    b = cell[i] * 7
                    v = cf[b + 3] + t * (cf[b + 4] + t * (cf[b + 5] + t * cf[b + 6]))
                if om is not None:
                    v = np.float64(om[grp, b0 + i]) * v
                if g is not None:
                    v = np.float64(g[grp, b0 + i]) * (cf[b] + t * (cf[b + 1] + t * cf[b + 2])) + v
                o[i] = v
            if sq is not None:
                for i in range(nb):
                    d = np.float64(o[i]) - np.float64(xs[i])
                    sq_lanes[i] += d * d
        if sq is not None:
            sq[job] = sq_lanes.sum()


_MAGNITUDE = np.int32(0x7FFFFFFF)


def _ordered_bits(bits):
    """A float32's bit pattern -> an int32 in the same order as the floats (-Inf < finite < +Inf, NaNs beyond
    them by sign); its own inverse. numpy int32 arrays here, one value in :func:`_range_kernel`."""
    return bits ^ ((bits >> np.int32(31)) & _MAGNITUDE)


_ordered = numba.njit(inline="always")(_ordered_bits)


@numba.njit(parallel=True, cache=True)
def _range_kernel(bits, out):
    """Per work item ``out[job] = (min, max)`` of its ``CHUNK`` weights as :func:`_ordered` integers (integer
    minima and maxima vectorise, float ones only without NaN semantics)."""
    groups, n = bits.shape
    items = (n + CHUNK - 1) // CHUNK
    for job in numba.prange(groups * items):
        grp, start = job // items, (job % items) * CHUNK
        row = bits[grp, start:min(n, start + CHUNK)]
        lo, hi = np.int32(0x7FFFFFFF), np.int32(-0x80000000)
        for i in range(row.shape[0]):  # int32 throughout (numba widens mixed ints to int64: 6x slower here)
            k = np.int32(_ordered(row[i]))
            lo, hi = np.int32(min(lo, k)), np.int32(max(hi, k))
        out[job, 0], out[job, 1] = lo, hi


_ORDERED_INF = int(_ordered_bits(np.array(np.inf, np.float32).view(np.int32)))


def value_range(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's smallest and largest value of ``x (G, N)`` float32, in one pass (``amin`` and ``amax`` take one
    each); both NaN for a row holding NaN or +-Inf (where ``amin``/``amax`` give NaN or an Inf)."""
    items = (x.shape[1] + CHUNK - 1) // CHUNK
    out = np.empty((x.shape[0] * items, 2), np.int32)
    _range_kernel(x.view(np.int32), out)
    out = out.reshape(x.shape[0], items, 2)
    lo, hi = out[..., 0].min(1), out[..., 1].max(1)
    bad = (lo <= -_ORDERED_INF - 1) | (hi >= _ORDERED_INF)
    lo, hi = (_ordered_bits(v).view(np.float32) for v in (lo, hi))
    lo[bad], hi[bad] = np.nan, np.nan
    return lo, hi


def parts_for(groups: int, bins: int, rows: int) -> int:
    """Partitions of a scatter with ``rows`` per-bin arrays: up to MAX_PARTS within PARTS_BYTES (fixed by the
    shape only, so the summation order is too)."""
    return max(1, min(MAX_PARTS, PARTS_BYTES // (rows * groups * bins * 8)))


def scatter(x: np.ndarray, v, lo: np.ndarray, inv_delta: np.ndarray, bins: int, powers: int) -> np.ndarray:
    """``(powers, G, bins)`` float64 per-cell sums ``sum v t^p`` (``v`` None: 1), ``powers`` at most 5, on the grid
    from ``lo`` with ``1 / delta``."""
    out = np.zeros((parts_for(x.shape[0], bins, 5), x.shape[0], bins, 5))
    _scatter_kernel(x, v, lo, inv_delta, np.float64(bins - 4), out)
    return np.ascontiguousarray(np.moveaxis(out.sum(0)[..., :powers], -1, 0))


def poly(x: np.ndarray, g, om, lo: np.ndarray, inv_delta: np.ndarray, bins: int, coef: np.ndarray,
         out: np.ndarray) -> float:
    """:func:`_poly_kernel` into ``out`` (``g`` None: the cubic only; ``om`` None: unweighted). Returns
    ``sum (out - x)^2`` for the cubic only (``g`` None), else 0."""
    sq = None if g is not None else np.zeros(x.shape[0] * ((x.shape[1] + CHUNK - 1) // CHUNK))
    _poly_kernel(x, g, om, lo, inv_delta, np.float64(bins - 4), coef, out, sq)
    return 0.0 if sq is None else float(sq.sum())
