"""The grid binned DKM's CPU kernels (dkm_palett.binned_kernels) against its torch path, pass by pass and end to
end: the same float64 operations per weight, so they agree to float64 rounding of the per-bin sums."""

import pytest
import torch

from dkm_palett import binned_kernels
from dkm_palett.dkm_binned import BinnedDKM, _Grid
from dkm_palett.dkm_math import DKMParams


def _torch_path(monkeypatch):
    monkeypatch.setattr(_Grid, "_kernel_args", lambda self, x: None)


def _weights(groups=2, n=40000, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(groups, n, generator=gen) * 0.02
    x[:, :5] = x[:, :5] * 40  # outliers far out on the grid
    return x


@pytest.mark.parametrize("bins", [16, 3001])
def test_each_pass_matches_the_torch_path(monkeypatch, bins):
    x = _weights()
    g = torch.randn_like(x)
    cubic = torch.randn(x.shape[0], bins, 4, dtype=torch.float64)
    coef = torch.randn(x.shape[0], bins, 7, dtype=torch.float64)
    om = torch.rand_like(x) + 0.01  # sensitivity weights
    grid = _Grid(x, bins)

    def passes():
        out = grid.interpolate(x, cubic)
        return (grid.moments(x), grid.moments(x, om), out, grid.table_grad(x, g),
                grid.weight_grad(x, g, coef), grid.weight_grad(x, g, coef, om), grid.sq_error)

    kernel = passes()
    _torch_path(monkeypatch)
    reference = passes()
    for i in (0, 1):
        for (h_k, h_t) in zip(kernel[i], reference[i]):
            torch.testing.assert_close(h_k, h_t, rtol=1e-11, atol=1e-9)  # sums of 40k terms, in another order
    assert torch.equal(kernel[2], reference[2])  # per weight: the same operations in the same order
    torch.testing.assert_close(kernel[3], reference[3], rtol=1e-12, atol=1e-11)
    assert torch.equal(kernel[4], reference[4]) and torch.equal(kernel[5], reference[5])
    assert not torch.equal(kernel[4], kernel[5])
    # the output pass's clustering error: sum (out - x)^2, summed in the pass (kernel: per lane, in another order)
    expected = float((reference[2].double() - x.double()).square().sum())
    assert kernel[6] == pytest.approx(expected, rel=1e-12) and reference[6] == pytest.approx(expected, rel=1e-12)


def test_binned_dkm_end_to_end_matches_the_torch_path(monkeypatch):
    torch.manual_seed(3)
    x = torch.randn(2, 30000, 1) * 0.02
    c0 = torch.sort(torch.randn(2, 64, 1) * 0.02, dim=1).values
    g = torch.randn_like(x)
    p = DKMParams(tau=1e-4, max_iter=2, epsilon=0.0)
    results = []
    for path in ("kernel", "torch"):
        if path == "torch":
            _torch_path(monkeypatch)
        xr = x.clone().requires_grad_()
        out, c = BinnedDKM.apply(xr, c0, p, 20000)
        out.backward(g)
        results.append((out.detach(), c, xr.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


def test_sums_do_not_depend_on_the_thread_count():
    import numba

    x = _weights(n=100000)
    grid = _Grid(x, 5000)
    before = numba.get_num_threads()
    try:
        runs = []
        for threads in (1, min(2, numba.config.NUMBA_NUM_THREADS)):
            numba.set_num_threads(threads)
            runs.append(torch.stack(grid.moments(x)))
    finally:
        numba.set_num_threads(before)
    assert torch.equal(runs[0], runs[1])


def test_partitions_stay_within_their_memory():
    assert binned_kernels.parts_for(1, 65536, 3) == binned_kernels.MAX_PARTS
    assert binned_kernels.parts_for(64, 1 << 18, 3) == 1  # 64 x 2^18 bins x 3 sums x 8 bytes: one partition


@pytest.mark.parametrize("path", ["kernel", "torch"])
def test_the_grid_reproduces_cubics_exactly(monkeypatch, path):
    """Cubic Lagrange interpolation is exact for cubics: the moments integrate any cubic ``q`` as the weights do
    (``sum_j h0_j q(e_j) = sum_i q(x_i)``, ``sum_j h1_j q(e_j) = sum_i x_i q(x_i)``), a table sampled from ``q``
    interpolates to ``q(x_i)``, and the weight gradients are exact: ``g q'(x_i)`` through the output, and through
    the moments ``d/dx_i sum_j (h0_j q(e_j) + h1_j r(e_j)) = q'(x_i) + r(x_i) + x_i r'(x_i)``."""
    if path == "torch":
        _torch_path(monkeypatch)
    x = _weights(groups=2, n=5000)
    grid = _Grid(x, 40)
    xd = x.double()

    def q(v):
        return 0.3 - 2.0 * v + 50.0 * v ** 2 + 900.0 * v ** 3

    h0, h1 = grid.moments(x)
    e = grid.points
    torch.testing.assert_close((h0 * q(e)).sum(1), q(xd).sum(1), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close((h1 * q(e)).sum(1), (xd * q(xd)).sum(1), rtol=1e-10, atol=1e-10)
    cubic = grid.cubic(q(e))
    torch.testing.assert_close(grid.interpolate(x, cubic).double(), q(xd), rtol=1e-6, atol=1e-6)
    g = torch.randn_like(x)
    zero = torch.zeros_like(e)
    grad = grid.weight_grad(x, g, grid.grad_coefficients(cubic, zero, zero)).double()
    torch.testing.assert_close(grad, g.double() * (-2.0 + 100.0 * xd + 2700.0 * xd ** 2), rtol=1e-5, atol=1e-5)
    r = 1.5 + 20.0 * e - 300.0 * e ** 2
    moments = grid.weight_grad(x, torch.zeros_like(x), grid.grad_coefficients(cubic, q(e), r)).double()
    expected = (-2.0 + 100.0 * xd + 2700.0 * xd ** 2) + (1.5 + 20.0 * xd - 300.0 * xd ** 2) + xd * (20.0 - 600.0 * xd)
    torch.testing.assert_close(moments, expected, rtol=1e-5, atol=1e-5)
