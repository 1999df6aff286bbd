"""Scalar nearest-centroid assignment on CPU in one numba pass (finalize and the post-training modes use it).

For every value ``x_i``: its position among the sorted centroids (a branch-free count up to 32 centroids, a
binary search above), then the exact float64 distances to the two neighbours, ties to the lower original index: the
rule of the torch path of :func:`dkm_palett.kmeans.lloyd.nearest_centroid`, without its dozen full-size
float64/int64 temporaries per chunk (about 50 ns a value in torch on a 2-core CPU, about 10 in this loop).
Imported on first use, so importing the package does not import numba.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from dkm_palett.dkm_fused import fused_threads


@numba.njit(parallel=True, cache=True)
def _nearest_sorted(x, cs, first, order, out):
    """``out[i]`` = original index of the centroid nearest ``x[i]``; ``cs`` sorted centroids (float64), ``first`` the
    first sorted position of each run of equal values, ``order`` sorted -> original index. NaN goes to the last
    sorted centroid, where torch's searchsorted sends it."""
    kc = cs.shape[0]
    for i in numba.prange(x.shape[0]):
        v = np.float64(x[i])
        lo = 0
        if v != v:
            lo = kc
        elif kc <= 32:  # first sorted position with cs >= v: a branch-free count for small K
            for j in range(kc):
                lo += cs[j] < v
        else:  # a binary search for large K
            hi = kc
            while lo < hi:
                mid = (lo + hi) // 2
                if cs[mid] < v:
                    lo = mid + 1
                else:
                    hi = mid
        r = min(lo, kc - 1)
        left, right = first[max(r - 1, 0)], first[r]
        dl, dr = abs(v - cs[left]), abs(v - cs[right])
        il, ir = order[left], order[right]
        out[i] = il if (dl < dr or (dl == dr and il < ir)) else ir


def nearest_scalar_cpu(x: torch.Tensor, cs: torch.Tensor, first: torch.Tensor, order: torch.Tensor,
                       out: torch.Tensor) -> None:
    """Fill ``out`` (int64, CPU) for the float32/float64 CPU values ``x`` (1-D); see :func:`_nearest_sorted`."""
    fused_threads()  # torch's thread count, as the DKM kernels
    _nearest_sorted(x.contiguous().numpy(), cs.contiguous().numpy(), first.contiguous().numpy(),
                    order.contiguous().numpy(), out.numpy())
