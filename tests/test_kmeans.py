"""Tests for dkm_palett.kmeans (exact 1-D DP, k-means++, helpers)."""

import numpy as np
import pytest
import torch

from dkm_palett import kmeans as km


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
    c = km._kmeans_1d_exact_f64(torch.from_numpy(x), k, torch.from_numpy(w))
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
@pytest.mark.parametrize("seed", range(6))
def test_exact_matches_reference_random(seed):
    rng = np.random.default_rng(seed)
    for _ in range(25):
        n = int(rng.integers(2, 60))
        k = int(rng.integers(1, 12))
        x = rng.standard_t(3, size=n)
        if rng.random() < 0.5:  # ties / repeated values
            x = np.round(x * 2) / 2
        w = rng.random(n) * (rng.random(n) > 0.25) if rng.random() < 0.7 else np.ones(n)
        if w.sum() == 0:
            w[0] = 1.0
        assert_optimal(x, w, k)


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


def test_exact_known_answer():
    x = torch.tensor([0.0, 0.1, 0.2, 10.0, 10.2, 50.0])
    c = km.kmeans_1d_exact(x, 3)
    torch.testing.assert_close(c, torch.tensor([0.1, 10.1, 50.0]))


def test_exact_checkpointed_backtracking_matches(monkeypatch):
    rng = np.random.default_rng(3)
    x = rng.normal(size=500)
    w = rng.random(500)
    full = km._kmeans_1d_exact_f64(torch.from_numpy(x), 37, torch.from_numpy(w))
    monkeypatch.setattr(km, "_DP_TABLE_BYTES", 0)  # force checkpoint + recompute path
    ckpt = km._kmeans_1d_exact_f64(torch.from_numpy(x), 37, torch.from_numpy(w))
    assert sse_1d(x, w, ckpt) == pytest.approx(sse_1d(x, w, full), rel=1e-10)
    assert sse_1d(x, w, ckpt) == pytest.approx(reference_dp(x, w, 37), rel=1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_exact_with_forced_pruning_matches_reference(monkeypatch, seed):
    # force the certified pruning stage on small inputs; the optimum must not change
    monkeypatch.setattr(km, "_PRUNE_MIN_N", 0)
    monkeypatch.setattr(km, "_PRUNE_K2", 0)
    monkeypatch.setattr(km, "_PRUNE_MAX_SURVIVORS", 1e9)
    calls = []
    orig = km._prune
    monkeypatch.setattr(km, "_prune", lambda pre, k: calls.append(pre.n) or orig(pre, k))
    rng = np.random.default_rng(100 + seed)
    for _ in range(12):
        n = int(rng.integers(60, 400))
        k = int(rng.integers(2, 10))
        x = rng.standard_t(4, size=n)
        if rng.random() < 0.3:
            x = np.round(x * 10) / 10
        w = rng.random(n) * (rng.random(n) > 0.1) + 1e-3
        assert_optimal(x, w, k)
    assert calls  # the pruning path really ran


def test_exact_pruned_equals_unpruned_large(monkeypatch):
    g = torch.Generator().manual_seed(11)
    x = torch.cat([torch.randn(60_000, generator=g), torch.rand(20_000, generator=g) * 6 - 3])
    w = torch.rand(80_000, generator=g)
    pruned = km._kmeans_1d_exact_f64(x, 8, w)
    monkeypatch.setattr(km, "_PRUNE_MIN_N", 1 << 62)
    full = km._kmeans_1d_exact_f64(x, 8, w)
    xn, wn = x.double().numpy(), w.double().numpy()
    assert sse_1d(xn, wn, pruned) == pytest.approx(sse_1d(xn, wn, full), rel=1e-12)


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
    x = torch.randn(20000, generator=g).to(torch.float16)  # few distinct values, many duplicates
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
        exact = km._kmeans_1d_exact_f64(x, 8, w)
        pp = km.kmeans_plus_plus(x[:, None], 8, w, generator=torch.Generator().manual_seed(trial))
        assert sse_1d(xn, wn, exact) <= sse_1d(xn, wn, pp[:, 0].double().numpy()) * (1 + 1e-12)


def test_exact_large_input_runs():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(200_000, generator=g)
    c = km.kmeans_1d_exact(x, 16)
    assert c.shape == (16,) and torch.all(c[1:] > c[:-1])
    # the optimum is a Lloyd fixed point: every centroid is the mean of its Voronoi cell
    idx = km.nearest_centroid(x, c)
    means = torch.zeros(16, dtype=torch.float64).index_add_(0, idx, x.double()) / torch.bincount(idx, minlength=16)
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


# ----------------------------------------------------------------------------------------------
# k-means++
# ----------------------------------------------------------------------------------------------
def _blobs(seed, n=3000, d=3):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(6, d, generator=g) * 4
    lab = torch.randint(0, 6, (n,), generator=g)
    return centers[lab] + torch.randn(n, d, generator=g) * 0.5


def test_kmeanspp_reproducible_and_seed_dependent():
    x = torch.randn(4000, 3, generator=torch.Generator().manual_seed(0))
    a = km.kmeans_plus_plus(x, 8, generator=torch.Generator().manual_seed(123), max_iter=3)
    b = km.kmeans_plus_plus(x, 8, generator=torch.Generator().manual_seed(123), max_iter=3)
    c = km.kmeans_plus_plus(x, 8, generator=torch.Generator().manual_seed(321), max_iter=3)
    assert a.shape == (8, 3) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_kmeanspp_does_not_touch_global_rng():
    x = _blobs(1)
    torch_state = torch.get_rng_state()
    np_state = np.random.get_state()
    km.kmeans_plus_plus(x, 6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], np_state[1])


def test_kmeanspp_finds_blobs_and_best_of_n_init():
    x = _blobs(2)
    c = km.kmeans_plus_plus(x, 6, generator=torch.Generator().manual_seed(0), n_init=3)
    sse = km.weighted_sse(x, c)
    # well separated blobs with noise std 0.5 in 3-D: optimum ~ n * 3 * 0.25
    assert sse < 1.2 * x.shape[0] * 3 * 0.25
    single = km.kmeans_plus_plus(x, 6, generator=torch.Generator().manual_seed(0), n_init=1)
    assert sse <= km.weighted_sse(x, single) * (1 + 1e-9)


def test_kmeanspp_weights_matter():
    x = torch.tensor([[0.0], [1.0], [10.0], [11.0]])
    w = torch.tensor([1.0, 0.0, 1.0, 3.0])
    c = km.kmeans_plus_plus(x, 2, w, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(c[:, 0], torch.tensor([0.0, 10.75]))


def test_kmeanspp_fewer_distinct_than_k():
    x = torch.tensor([[0.0, 1.0], [0.0, 1.0], [2.0, 2.0], [2.0, 2.0]])
    c = km.kmeans_plus_plus(x, 5, generator=torch.Generator().manual_seed(0))
    assert c.shape == (5, 2)
    assert {tuple(r) for r in c.tolist()} == {(0.0, 1.0), (2.0, 2.0)}


def test_kmeanspp_empty_cluster_reseeding():
    # k far above the natural cluster count with many duplicates: still k distinct finite centroids
    g = torch.Generator().manual_seed(5)
    x = torch.cat([torch.zeros(500, 2), torch.ones(500, 2), torch.randn(40, 2, generator=g)])
    c = km.kmeans_plus_plus(x, 20, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(c).all()
    assert torch.unique(c, dim=0).shape[0] == 20


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def brute_nearest(x, c):
    x = x.double().reshape(x.shape[0], -1)
    c = c.double().reshape(c.shape[0], -1)
    return ((x[:, None, :] - c[None, :, :]) ** 2).sum(-1).argmin(1)


def test_nearest_centroid_1d_matches_brute_force_with_ties():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(3000, generator=g), torch.arange(-4, 5).float() * 0.5])
    c = torch.tensor([0.25, -1.25, 0.75, 0.25, 2.0, -0.25, 1.25])  # duplicate + exact midpoints
    for chunk in (2**24, 64):
        got = km.nearest_centroid(x, c, max_chunk_elems=chunk)
        assert got.dtype == torch.int64 and got.shape == (x.shape[0],)
        assert torch.equal(got, brute_nearest(x, c))
    assert torch.equal(km.nearest_centroid(x[:, None], c[:, None]), brute_nearest(x, c))


def test_nearest_centroid_nd_matches_brute_force_chunked():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5000, 4, generator=g)
    c = torch.randn(37, 4, generator=g)
    ref = brute_nearest(x, c)
    assert torch.equal(km.nearest_centroid(x, c), ref)
    assert torch.equal(km.nearest_centroid(x, c, max_chunk_elems=100), ref)


def test_weighted_sse_value():
    x = torch.tensor([[0.0], [1.0], [4.0]])
    c = torch.tensor([[0.0], [3.0]])
    assert km.weighted_sse(x, c) == pytest.approx(0 + 1 + 1)
    assert km.weighted_sse(x, c, torch.tensor([5.0, 2.0, 0.5])) == pytest.approx(2 * 1 + 0.5 * 1)


def test_uniform_centroids():
    v = torch.tensor([3.0, -1.0, 2.0, 0.5])
    c = km.uniform_centroids(v, 5)
    assert c.dtype == torch.float32 and c.shape == (5,)
    torch.testing.assert_close(c, torch.tensor([-1.0, 0.0, 1.0, 2.0, 3.0]))
    torch.testing.assert_close(torch.diff(km.uniform_centroids(torch.randn(100), 16)).std(),
                               torch.tensor(0.0), atol=1e-5, rtol=0)
    assert km.uniform_centroids(torch.full((4,), 2.5), 3).tolist() == [2.5, 2.5, 2.5]
    assert km.uniform_centroids(v, 1).tolist() == [1.0]


def test_dispatcher():
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(400, 1, generator=g)
    out = km.kmeans(x1, 4)
    assert out.shape == (4, 1) and out.dtype == torch.float32
    assert torch.equal(out[:, 0], km.kmeans_1d_exact(x1[:, 0], 4))
    assert torch.equal(km.kmeans(x1[:, 0], 4, method="opt1d"), out)  # 1-D input treated as (N, 1)
    assert torch.equal(km.kmeans(x1, 4, method="uniform")[:, 0], km.uniform_centroids(x1[:, 0], 4))
    x2 = torch.randn(400, 2, generator=g)
    a = km.kmeans(x2, 4, generator=torch.Generator().manual_seed(9))
    b = km.kmeans(x2, 4, method="kmeans++", generator=torch.Generator().manual_seed(9))
    assert a.shape == (4, 2) and torch.equal(a, b)
    assert km.kmeans(x1, 4, method="kmeans++", generator=g, opt1d_threshold=10).shape == (4, 1)


def test_dispatcher_errors():
    with pytest.raises(ValueError, match="opt1d.*kmeans\\+\\+.*uniform"):
        km.kmeans(torch.randn(10, 1), 2, method="lloyd")
    with pytest.raises(ValueError, match="D == 1"):
        km.kmeans(torch.randn(10, 2), 2, method="opt1d")
    with pytest.raises(ValueError, match="D == 1"):
        km.kmeans(torch.randn(10, 3), 2, method="uniform")
    with pytest.raises(ValueError):
        km.kmeans(torch.randn(2, 3, 4), 2)
