"""Weighted points for k-means initialisation from a large 1-D tensor: the means of a uniform histogram.

One numba pass over the values (counts and float64 sums per bin), so a 65M-weight layer takes a fraction of a second
and no per-weight temporary is allocated; the torch fallback (other devices) makes the same bins.
"""

from __future__ import annotations

import functools

import numpy as np
import torch


def _fill(v, lo, scale, counts, sums):
    for i in range(v.shape[0]):
        b = int(np.rint((v[i] - lo) * scale))
        counts[b] += 1.0
        sums[b] += v[i]


@functools.lru_cache(maxsize=None)
def _kernel():
    import numba

    try:
        return numba.njit(cache=True, nogil=True)(_fill)
    except RuntimeError:  # no cache locator available
        return numba.njit(nogil=True)(_fill)


def histogram_points(v: torch.Tensor, bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(means (M, 1), counts (M,))`` float32 of the non-empty bins of a ``bins``-bin uniform histogram of ``v``
    (1-D float32): bin ``round((v - min) * (bins - 1) / (max - min))``, means and counts accumulated in float64."""
    lo, hi = v.min(), v.max()
    scale = (bins - 1) / (hi - lo).clamp_min(1e-30)
    if v.device.type == "cpu" and v.dtype == torch.float32:
        counts, sums = np.zeros(bins), np.zeros(bins)
        _kernel()(v.contiguous().numpy(), np.float32(lo), np.float32(scale), counts, sums)
        counts, sums = torch.from_numpy(counts), torch.from_numpy(sums)
    else:
        b = ((v - lo) * scale).round_().long()
        counts = torch.bincount(b, minlength=bins).double()
        sums = torch.bincount(b, weights=v.double(), minlength=bins)
    keep = counts > 0
    return (sums[keep] / counts[keep]).float().unsqueeze(1), counts[keep].float()
