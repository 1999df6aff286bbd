"""Tests for dkm_palett.kmeans beyond exact 1-D k-means: k-means++ (Lloyd), nearest-centroid search, the SSE and
uniform helpers, and the method dispatcher."""

import numpy as np
import pytest
import torch

from dkm_palett import kmeans as km


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
    assert km.kmeans(x1, 4, method="kmeans++", generator=g).shape == (4, 1)
    assert torch.equal(km.kmeans(x1, 4, torch.zeros(x1.shape[0])), out)  # all-zero weights count as uniform
    few = torch.tensor([[2.0, 3.0], [0.0, 1.0], [2.0, 3.0]])  # fewer distinct rows than k: those rows, repeated
    assert km.kmeans(few, 4).tolist() == [[0.0, 1.0], [2.0, 3.0], [0.0, 1.0], [2.0, 3.0]]


def test_dispatcher_errors():
    with pytest.raises(ValueError, match="opt1d.*kmeans\\+\\+.*uniform"):
        km.kmeans(torch.randn(10, 1), 2, method="lloyd")
    with pytest.raises(ValueError, match="D == 1"):
        km.kmeans(torch.randn(10, 2), 2, method="opt1d")
    with pytest.raises(ValueError, match="D == 1"):
        km.kmeans(torch.randn(10, 3), 2, method="uniform")
    with pytest.raises(ValueError):
        km.kmeans(torch.randn(2, 3, 4), 2)


@pytest.mark.parametrize("k", [7, 100])  # the branch-free count (K <= 32) and the binary search
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nearest_centroid_cpu_kernel_matches_brute_force_with_ties_at_any_k(k, dtype):
    """The numba kernel (CPU float32/float64) keeps the rule of the torch path: exact float64 distances, ties
    (duplicate centroids, points exactly between two) to the lower original index."""
    g = torch.Generator().manual_seed(k)
    c = (torch.randint(-40, 40, (k,), generator=g).double() * 0.25)  # duplicates, exact midpoints on a 1/8 grid
    x = torch.cat([torch.randn(20000, generator=g, dtype=torch.float64) * 5, torch.arange(-90, 90) / 8.0]).to(dtype)
    got = km.nearest_centroid(x, c.to(dtype))
    assert torch.equal(got, brute_nearest(x, c.to(dtype)))


def test_nearest_centroid_sends_nan_to_the_largest_centroid_like_searchsorted():
    c = torch.tensor([0.5, 2.0, -1.0, 2.0])
    got = km.nearest_centroid(torch.tensor([float("nan"), 1.9]), c)
    assert got.tolist() == [1, 1]
