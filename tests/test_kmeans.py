"""Tests for dkm_palett.kmeans: exact 1-D k-means against a plain DP reference (k-means++ and the helpers:
test_kmeans_lloyd.py)."""

import numpy as np
import pytest
import torch

from dkm_palett import kmeans as km
from dkm_palett.kmeans import exact_1d


# ----------------------------------------------------------------------------------------------
# references
# ----------------------------------------------------------------------------------------------
def reference_dp(x: np.ndarray, w: np.ndarray, k: int) -> float:
    """Plain O(k n^2) DP over the sorted points (no monotonicity, no merging): optimal weighted SSE."""
    keep = w > 0
    x, w = x[keep], w[keep]
    order = np.argsort(x, kind="stable")
    x, w = x[order], w[order]
    n = len(x)
    k = min(k, len(np.unique(x)))
    W = np.concatenate([[0.0], np.cumsum(w)])
    S1 = np.concatenate([[0.0], np.cumsum(w * x)])
    S2 = np.concatenate([[0.0], np.cumsum(w * x * x)])
    a = np.arange(n + 1)[:, None]
    b = np.arange(n + 1)[None, :]
    with np.errstate(all="ignore"):
        cost = S2[b] - S2[a] - (S1[b] - S1[a]) ** 2 / (W[b] - W[a])
    cost = np.where(a < b, np.maximum(cost, 0.0), np.inf)
    D = cost[0].copy()
    for _ in range(2, k + 1):
        D = np.min(D[:, None] + cost, axis=0)
    return float(D[n])


def sse_1d(x: np.ndarray, w: np.ndarray, c: np.ndarray) -> float:
    return float((w * ((x[:, None] - c[None, :]) ** 2).min(1)).sum())


def total_scatter(x, w):
    return sse_1d(x, w, np.array([np.average(x, weights=w)]))


def assert_optimal(x, w, k):
    c = exact_1d._kmeans_1d_exact_f64(torch.from_numpy(x), k, torch.from_numpy(w))
    assert c.shape == (k,)
    assert np.all(np.diff(c) >= 0)
    got, ref = sse_1d(x, w, c), reference_dp(x, w, k)
    scale = max(total_scatter(x, w), 1e-300)
    assert got <= ref + 1e-9 * ref + 1e-12 * scale, (got, ref)
    assert got >= ref - 1e-9 * ref - 1e-12 * scale, (got, ref)  # sanity: reference is optimal
    return c


# ----------------------------------------------------------------------------------------------
# exact 1-D k-means
# ----------------------------------------------------------------------------------------------
def _random_case(rng):
    """Small 1-D instance: normal, heavy-tailed with ties, integer grid (many duplicates), evenly spaced
    (degenerate: OPT(c) has collinear stretches, so some k need the splice) or two far apart blobs;
    weights uniform, random with zeros, or small integers."""
    n = int(rng.integers(2, 70))
    kind = int(rng.integers(0, 5))
    if kind == 0:
        x = rng.normal(size=n)
    elif kind == 1:
        x = np.round(rng.standard_t(3, size=n) * 2) / 2
    elif kind == 2:
        x = rng.integers(0, 12, size=n).astype(float)
    elif kind == 3:
        x = np.arange(n, dtype=float) * 0.1 - 2.0
    else:
        x = np.concatenate([rng.normal(size=n // 2) * 1e-3, rng.normal(size=n - n // 2) + 10.0])
    r = rng.random()
    if r < 0.4:
        w = np.ones(n)
    elif r < 0.8:
        w = rng.random(n) * (rng.random(n) > 0.2)
    else:
        w = rng.integers(1, 4, size=n).astype(float)
    if w.sum() == 0:
        w[0] = 1.0
    return x, w


@pytest.mark.parametrize("seed", range(8))
def test_exact_matches_reference_for_every_k(seed, monkeypatch):
    """Against the plain O(k n^2) DP: every k from 1 to 2 past the number of distinct values."""
    spliced = []
    splice = exact_1d._splice
    monkeypatch.setattr(exact_1d, "_splice", lambda P, Q, k: spliced.append(k) or splice(P, Q, k))
    rng = np.random.default_rng(seed)
    for _ in range(12):
        x, w = _random_case(rng)
        distinct = len(np.unique(x[w > 0]))
        for k in range(1, distinct + 3):
            assert_optimal(x, w, k)
    if seed == 0:
        assert spliced  # the degenerate (hull edge) path ran


def test_exact_degenerate_hull_uses_splice(monkeypatch):
    """Evenly spaced equal-weight points: OPT(c) is linear over runs of c, so no penalty gives exactly
    k clusters for many k and the optimal k-partition is spliced from two penalised optima."""
    spliced = []
    splice = exact_1d._splice
    monkeypatch.setattr(exact_1d, "_splice", lambda P, Q, k: spliced.append(k) or splice(P, Q, k))
    x = np.arange(40, dtype=float)
    w = np.ones(40)
    for k in range(1, 42):
        assert_optimal(x, w, k)
    assert len(spliced) >= 5


def test_splice_builds_k_cluster_path():
    P = np.array([0, 5, 10])
    Q = np.array([0, 1, 2, 3, 6, 7, 8, 9, 10])
    for k in range(3, 8):
        R = exact_1d._splice(P, Q, k)
        assert R.shape == (k + 1,) and R[0] == 0 and R[-1] == 10 and np.all(np.diff(R) > 0)
        assert set(R) <= set(P) | set(Q)


def test_exact_k1_is_weighted_mean():
    x = np.array([0.0, 1.0, 5.0, 5.0])
    w = np.array([1.0, 2.0, 0.5, 0.5])
    c = km.kmeans_1d_exact(torch.from_numpy(x), 1, torch.from_numpy(w))
    assert c.dtype == torch.float32 and c.shape == (1,)
    assert c.item() == pytest.approx(np.average(x, weights=w), rel=1e-6)


def test_exact_k256_against_reference():
    rng = np.random.default_rng(7)
    x = np.round(rng.normal(size=320) * 40) / 40  # ~200 distinct values, some of them repeated
    w = rng.random(320) + 0.1
    assert_optimal(x, w, 2**8)  # k > distinct -> every distinct value
    x = rng.normal(size=300)
    assert_optimal(x, np.ones(300), 2**8)
    assert_optimal(x, rng.random(300), 100)
    x = rng.standard_t(3, size=1200)
    assert_optimal(x, rng.random(1200), 64)


def test_exact_large_n_small_k_against_reference(monkeypatch):
    """n > 256 k: the first penalty comes from a coarsened instance (a nested solve); still optimal."""
    calls = []
    inner = exact_1d._optimal_bounds
    monkeypatch.setattr(exact_1d, "_optimal_bounds", lambda x, w, W, k: calls.append(x.shape[0]) or inner(x, w, W, k))
    rng = np.random.default_rng(9)
    for n, k in [(1500, 2), (1500, 3), (1500, 4)]:
        x = np.round(rng.standard_t(3, size=n) * 1000) / 1000  # some duplicates
        w = rng.random(n) * (rng.random(n) > 0.1)
        assert_optimal(x, w, k)
        assert_optimal(x, np.ones(n), k)
    assert len(calls) == 12  # every solve ran a nested coarse solve first


def test_exact_known_answer():
    x = torch.tensor([0.0, 0.1, 0.2, 10.0, 10.2, 50.0])
    c = km.kmeans_1d_exact(x, 3)
    torch.testing.assert_close(c, torch.tensor([0.1, 10.1, 50.0]))


def test_exact_vanishing_weights_are_ignored():
    """Weights far below float64 resolution of the prefix sums must not produce 0/0 cluster costs."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(3000, generator=g, dtype=torch.float64)
    w = torch.rand(3000, generator=g, dtype=torch.float64) + 0.5
    tiny = w.clone()
    tiny[::7] = 1e-30
    c = exact_1d._kmeans_1d_exact_f64(x, 32, tiny)
    keep = torch.ones(3000, dtype=torch.bool)
    keep[::7] = False
    ref = exact_1d._kmeans_1d_exact_f64(x[keep], 32, w[keep])
    assert np.all(np.isfinite(c))
    np.testing.assert_allclose(c, ref, rtol=0, atol=1e-9)


def test_kernels_fall_back_when_cache_is_not_writable(monkeypatch):
    """numba raises RuntimeError for cache=True when no cache directory is writable; compile uncached."""
    import numba

    real_njit = numba.njit
    seen = []

    def njit(*args, **kwargs):
        seen.append(kwargs.get("cache", False))
        if kwargs.get("cache"):
            raise RuntimeError("cannot cache function: no locator available")
        return real_njit(*args, **kwargs)

    monkeypatch.setattr(numba, "njit", njit)
    exact_1d._kernels.cache_clear()
    try:
        x = torch.randn(500, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        c = exact_1d._kmeans_1d_exact_f64(x, 5)
        assert True in seen and False in seen
        xn = x.numpy()
        assert sse_1d(xn, np.ones(500), c) == pytest.approx(reference_dp(xn, np.ones(500), 5), rel=1e-9)
    finally:
        exact_1d._kernels.cache_clear()


def test_exact_fewer_distinct_than_k():
    x = torch.tensor([3.0, 1.0, 1.0, 2.0, 2.0, 7.0])
    w = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 0.0])  # 7.0 has zero weight -> ignored
    c = km.kmeans_1d_exact(x, 5, w)
    assert c.shape == (5,) and c.dtype == torch.float32
    assert torch.all(c[1:] >= c[:-1])
    assert set(c.tolist()) == {1.0, 2.0, 3.0}
    c = km.kmeans_1d_exact(torch.full((10,), 0.25), 4)
    assert c.tolist() == [0.25] * 4


def test_exact_deterministic_and_order_invariant():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5000, generator=g)
    w = torch.rand(5000, generator=g)
    c1 = km.kmeans_1d_exact(x, 16, w)
    c2 = km.kmeans_1d_exact(x, 16, w)
    perm = torch.randperm(5000, generator=g)
    c3 = km.kmeans_1d_exact(x[perm], 16, w[perm])
    assert torch.equal(c1, c2)
    torch.testing.assert_close(c1, c3, rtol=1e-6, atol=1e-7)


def test_exact_low_precision_input_and_duplicates():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20000, generator=g).to(torch.bfloat16)  # few distinct values, many duplicates
    c = km.kmeans_1d_exact(x, 8)
    assert c.dtype == torch.float32 and c.shape == (8,)
    xn = x.double().numpy()
    xu, cnt = np.unique(xn, return_counts=True)
    # merging duplicates must give the same optimum as the weighted distinct values
    assert sse_1d(xn, np.ones_like(xn), c.double().numpy()) == pytest.approx(
        reference_dp(xu, cnt.astype(float), 8), rel=1e-6)


def test_exact_never_worse_than_kmeanspp():
    g = torch.Generator().manual_seed(2)
    for trial in range(3):
        x = torch.cat([torch.randn(1500, generator=g) * 0.3, torch.randn(500, generator=g) + 3])
        w = torch.rand(2000, generator=g)
        xn, wn = x.double().numpy(), w.double().numpy()
        exact = exact_1d._kmeans_1d_exact_f64(x, 8, w)
        pp = km.kmeans_plus_plus(x[:, None], 8, w, generator=torch.Generator().manual_seed(trial))
        assert sse_1d(xn, wn, exact) <= sse_1d(xn, wn, pp[:, 0].double().numpy()) * (1 + 1e-12)


@pytest.mark.parametrize("k", [16, 256])
def test_exact_large_input_runs(k):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1 << 20, generator=g)
    c = km.kmeans_1d_exact(x, k)
    assert c.shape == (k,) and torch.all(c[1:] > c[:-1])
    # the optimum is a Lloyd fixed point: every centroid is the mean of its Voronoi cell
    idx = km.nearest_centroid(x, c)
    means = torch.zeros(k, dtype=torch.float64).index_add_(0, idx, x.double()) / torch.bincount(idx, minlength=k)
    torch.testing.assert_close(c.double(), means, rtol=0, atol=1e-5)


def test_exact_input_validation():
    with pytest.raises(ValueError):
        km.kmeans_1d_exact(torch.tensor([1.0, float("nan")]), 2)
    with pytest.raises(ValueError):
        km.kmeans_1d_exact(torch.tensor([1.0, 2.0]), 2, torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError):
        km.kmeans_1d_exact(torch.tensor([1.0, 2.0]), 0)
    with pytest.raises(ValueError):
        km.kmeans_1d_exact(torch.tensor([1.0, 2.0]), 2, torch.tensor([0.0, 0.0]))
    with pytest.raises(ValueError):
        km.kmeans_1d_exact(torch.zeros(3, 2), 2)
