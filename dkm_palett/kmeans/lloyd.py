"""Weighted k-means++ seeding and Lloyd iterations (any dimension), and memory-bounded assignment helpers."""

from __future__ import annotations

import math

import numpy as np
import torch

from dkm_palett.kmeans.inputs import as_2d, check_k, pad_centroids, weights_numpy

__all__ = ["kmeans_plus_plus", "nearest_centroid", "weighted_sse"]

# Distance entries per chunk in kmeans++ / Lloyd.
_LLOYD_CHUNK = 1 << 22


def nearest_centroid(x: torch.Tensor, centroids: torch.Tensor, *, max_chunk_elems: int = 2**24) -> torch.Tensor:
    """Index (int64, shape (N,)) of the nearest centroid (Euclidean) for every row of x.

    ``x`` is (N, D) (1-D means D = 1), ``centroids`` (K, D). Ties go to the lower centroid index.
    D == 1 uses sort + searchsorted (O(N log K), exact distances ``|x - c|`` in float64); D > 1
    computes squared distances in float64 chunks of at most ``max_chunk_elems`` entries. ``x`` is
    converted to float64 one chunk at a time, so no full-size copy is made. Runs on x's device.
    """
    x = as_2d(x).detach()
    c = as_2d(centroids, "centroids")
    if x.shape[1] != c.shape[1]:
        raise ValueError(f"x has D={x.shape[1]} but centroids have D={c.shape[1]}")
    if c.shape[0] == 0:
        raise ValueError("need at least one centroid")
    c = c.detach().to(device=x.device, dtype=torch.float64)
    out = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    if x.shape[1] == 1:
        _nearest_scalar(x[:, 0], c[:, 0], out, max(1, int(max_chunk_elems) // 4))
        return out
    c_sq = (c * c).sum(1)
    step = max(1, int(max_chunk_elems) // c.shape[0])
    for s in range(0, x.shape[0], step):
        xs = x[s:s + step].to(torch.float64)
        d = torch.addmm(c_sq.unsqueeze(0), xs, c.t(), alpha=-2.0)  # |c|^2 - 2 x.c  (+|x|^2 const)
        out[s:s + step] = torch.argmin(d, dim=1)
    return out


def _nearest_scalar(x: torch.Tensor, cv: torch.Tensor, out: torch.Tensor, step: int) -> None:
    """1-D case of :func:`nearest_centroid`: sorted centroids + searchsorted, ties to the lower index (float32/64
    on CPU: the same rule in a numba kernel, :mod:`dkm_palett.kmeans.nearest_kernel`)."""
    kc = cv.shape[0]
    order = torch.argsort(cv, stable=True)
    cs = cv[order]
    # first sorted position of every group of equal centroid values (lowest original index)
    pos = torch.arange(kc, device=cv.device)
    new_group = torch.ones(kc, dtype=torch.bool, device=cv.device)
    new_group[1:] = cs[1:] != cs[:-1]
    first = torch.cummax(torch.where(new_group, pos, torch.zeros_like(pos)), 0).values
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and out.is_contiguous():
        from dkm_palett.kmeans.nearest_kernel import nearest_scalar_cpu  # numba, imported on first use

        nearest_scalar_cpu(x, cs, first, order, out)  # the same rule in one pass, no temporaries
        return
    for s in range(0, x.shape[0], step):
        xv = x[s:s + step].to(torch.float64)
        right = torch.searchsorted(cs, xv).clamp_(max=kc - 1)  # first value >= x
        left = first[(right - 1).clamp_(min=0)]
        right = first[right]
        dl = (xv - cs[left]).abs()
        dr = (xv - cs[right]).abs()
        il, ir = order[left], order[right]
        take_left = (dl < dr) | ((dl == dr) & (il < ir))
        out[s:s + step] = torch.where(take_left, il, ir)


def weighted_sse(x: torch.Tensor, centroids: torch.Tensor, weights: torch.Tensor | None = None) -> float:
    """Weighted sum of squared distances of the rows of x (N, D) to their nearest centroid."""
    x = as_2d(x).detach().to(torch.float64)
    c = as_2d(centroids, "centroids").detach().to(device=x.device, dtype=torch.float64)
    w = None if weights is None else weights.detach().reshape(-1).to(device=x.device, dtype=torch.float64)
    return assigned_sse(x, w, c, nearest_centroid(x, c))


def assigned_sse(x: torch.Tensor, w: torch.Tensor | None, c: torch.Tensor, idx: torch.Tensor) -> float:
    """Weighted SSE of the rows of x (N, D) to the centroids ``c[idx]`` (w=None: unit weights), in chunks."""
    total = 0.0
    step = 1 << 20
    for s in range(0, x.shape[0], step):
        d = ((x[s:s + step] - c[idx[s:s + step]]) ** 2).sum(1)
        total += float((d if w is None else d * w[s:s + step]).sum())
    return total


# ----------------------------------------------------------------------------------------------
# k-means++ (any dimension)
# ----------------------------------------------------------------------------------------------
def _sq_dist_to(xt32: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """|x - center|^2 (float32) for all points; ``xt32`` is x transposed (D, N), so every pass is
    contiguous and exact copies of the centre get exactly 0."""
    c = center.to(torch.float32)
    d = (xt32[0] - c[0]).square_()
    for j in range(1, xt32.shape[0]):
        d.add_((xt32[j] - c[j]).square_())
    return d


def _sample_index(p: torch.Tensor, generator: torch.Generator | None) -> int:
    """One index drawn with probability proportional to p (>= 0) using only `generator`."""
    cdf = torch.cumsum(p, 0)
    u = torch.rand((), generator=generator, dtype=torch.float64) * cdf[-1]
    return int(torch.searchsorted(cdf, u.reshape(1), right=True).clamp_(max=p.shape[0] - 1))


def _kpp_seed(x, xt32, w, k, generator) -> torch.Tensor:
    """Weighted k-means++ seeding (P ~ w * D^2). Returns fewer than k rows iff x has fewer than k
    distinct rows (then every row coincides with a returned seed)."""
    centers = [x[_sample_index(w, generator)]]
    best = _sq_dist_to(xt32, centers[0])
    for _ in range(1, k):
        p = w * best
        if not bool(p.sum() > 0):  # every point coincides with a chosen centre
            break
        c = x[_sample_index(p, generator)]
        centers.append(c)
        torch.minimum(best, _sq_dist_to(xt32, c), out=best)
    return torch.stack(centers)


def _assign(x32, x_sq32, c, chunk) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centre index and squared distance per row (chunked float32 matmul; scalars: the sorted search of
    :func:`nearest_centroid`, O(N log K) instead of O(N K))."""
    n, kc = x32.shape[0], c.shape[0]
    if x32.shape[1] == 1:
        idx = nearest_centroid(x32, c)
        return idx, (x32[:, 0] - c.to(torch.float32)[idx, 0]).square_()
    idx = torch.empty(n, dtype=torch.int64)
    dist = torch.empty(n, dtype=torch.float32)
    c32 = c.to(torch.float32)
    c_sq = (c32 * c32).sum(1)
    step = max(1, chunk // kc)
    for s in range(0, n, step):
        d = torch.addmm(c_sq.unsqueeze(0), x32[s:s + step], c32.t(), alpha=-2.0)
        v, i = torch.min(d, dim=1)
        idx[s:s + step] = i
        dist[s:s + step] = (v + x_sq32[s:s + step]).clamp_(min=0.0)
    return idx, dist


def _lloyd(x, x32, x_sq32, w, c, max_iter, chunk) -> tuple[torch.Tensor, float]:
    """Weighted Lloyd iterations (float64 centroid updates); returns centres and weighted SSE."""
    k = c.shape[0]
    prev = None
    for _ in range(max_iter):
        idx, dist = _assign(x32, x_sq32, c, chunk)
        wsum = torch.zeros(k, dtype=torch.float64).index_add_(0, idx, w)
        sums = torch.zeros_like(c).index_add_(0, idx, x * w.unsqueeze(1))
        nonempty = wsum > 0
        new_c = c.clone()
        new_c[nonempty] = sums[nonempty] / wsum[nonempty].unsqueeze(1)
        empty = torch.nonzero(~nonempty).flatten()
        if empty.numel():
            # re-seed empty clusters at the points with the largest weighted error
            far = torch.topk(w * dist.to(torch.float64), min(int(empty.numel()), x.shape[0])).indices
            new_c[empty[: far.numel()]] = x[far]
        converged = prev is not None and empty.numel() == 0 and torch.equal(idx, prev)
        c, prev = new_c, idx
        if converged:
            break
    idx, _ = _assign(x32, x_sq32, c, chunk)
    return c, assigned_sse(x, w, c, idx)


def kmeans_plus_plus(x: torch.Tensor, k: int, weights: torch.Tensor | None = None, *, n_init: int = 3,
                     max_iter: int = 30, generator: torch.Generator | None = None) -> torch.Tensor:
    """Weighted k-means++ seeding (P ~ w * D^2) + weighted Lloyd iterations; best of ``n_init``
    restarts by weighted SSE. ``x`` is (N, D); returns (k, D) float32.

    Randomness comes only from ``generator`` (reproducible for a seeded generator). Duplicate rows
    are merged first; with fewer than k distinct rows (of positive weight) all of them are returned
    and the remaining slots repeat them. Empty clusters are re-seeded at the points with the largest
    weighted error. Distances are computed in float64 chunks (memory O(N D + chunk)).
    """
    k = check_k(k)
    if int(n_init) < 1 or int(max_iter) < 0:
        raise ValueError("n_init must be >= 1 and max_iter >= 0")
    x = as_2d(x).detach().to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x must be finite (found NaN or inf)")
    w = torch.from_numpy(weights_numpy(weights, x.shape[0]))
    keep = w > 0
    if not bool(keep.all()):
        x, w = x[keep], w[keep]
    if x.shape[0] == 0:
        raise ValueError("need at least one point with positive weight")
    x32 = x.to(torch.float32)
    xt32 = x32.t().contiguous()
    x_sq32 = (x32 * x32).sum(1)
    best_c, best_sse = None, math.inf
    for _ in range(int(n_init)):
        c = _kpp_seed(x, xt32, w, k, generator)
        if c.shape[0] < k:  # fewer distinct rows than k: the seeds are exactly the distinct rows
            order = np.lexsort(c.numpy().T[::-1])
            return torch.from_numpy(pad_centroids(c.numpy()[order], k)).to(torch.float32)
        c, sse = _lloyd(x, x32, x_sq32, w, c, int(max_iter), _LLOYD_CHUNK)
        if sse < best_sse:
            best_c, best_sse = c, sse
    if best_c.shape[1] == 1:
        best_c = torch.sort(best_c, dim=0).values
    return best_c.to(torch.float32)
