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
    table = torch.randn(x.shape[0], bins, dtype=torch.float64)
    slope, base, dq = (torch.randn(x.shape[0], bins, dtype=torch.float64) for _ in range(3))
    grid = _Grid(x, bins)
    kernel = (grid.moments(x), grid.interpolate(x, table), grid.table_grad(x, g),
              grid.weight_grad(x, g, slope, base, dq))
    _torch_path(monkeypatch)
    reference = (grid.moments(x), grid.interpolate(x, table), grid.table_grad(x, g),
                 grid.weight_grad(x, g, slope, base, dq))
    for (h_k, h_t) in zip(kernel[0], reference[0]):
        torch.testing.assert_close(h_k, h_t, rtol=1e-13, atol=1e-12)
    assert torch.equal(kernel[1], reference[1])  # per weight: the same operations in the same order
    torch.testing.assert_close(kernel[2], reference[2], rtol=1e-12, atol=1e-11)
    assert torch.equal(kernel[3], reference[3])


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
