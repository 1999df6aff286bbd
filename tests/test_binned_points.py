"""The grid binned DKM's numba per-point stage (dkm_palett.binned_points) against the torch path (PointDKM on the
touched points, the grid's stencil convolutions): the same math in another summation order, so outputs, centroids
and gradients agree to float64 rounding carried into float32."""

import pytest
import torch

from dkm_palett.dkm_binned import BinnedDKM, _Grid, grid_points
from dkm_palett.dkm_math import DKMParams, PointDKM
from dkm_palett.dkm_sensitivity import Sensitivity


def _weights(groups, n=30000, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(groups, n, 1, generator=gen) * 0.02
    x[:, :3] *= 30  # outliers: untouched stretches of the grid between them and the bulk
    return x


def _run(x, c0, p, g_out, sens=None):
    xr = x.clone().requires_grad_()
    bins = grid_points(x[..., 0], c0, p.tau)
    out, c = BinnedDKM.apply(xr, c0, p, bins, None, 1 << 16, sens)
    engine = out.grad_fn.state[0]
    out.backward(g_out)
    return out.detach(), c, xr.grad, engine


@pytest.mark.parametrize("groups,k,iters,zero,lut", [
    (1, 16, 1, None, "f32"), (3, 4, 3, None, "f32"), (2, 16, 3, 0, "f32"), (1, 16, 2, None, "int8"),
    (1, 256, 1, None, "f32"), (1, 16, 3, None, "f32"), (3, 16, 1, None, "f32"), (1, 4, 1, None, "f32"),
])
def test_numba_stage_matches_the_torch_path(monkeypatch, groups, k, iters, zero, lut):
    x = _weights(groups)
    c0 = torch.quantile(x[0, :, 0], torch.linspace(0.02, 0.98, k)).reshape(1, k, 1).repeat(groups, 1, 1)
    c0 = c0 + 0.003 * torch.arange(groups).reshape(-1, 1, 1)  # groups differ
    if zero is not None:
        c0[:, zero] = 0
    p = DKMParams(tau=3e-4, max_iter=iters, epsilon=1e-9, zero_index=zero, lut_dtype=lut)
    g_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    fast = _run(x, c0, p, g_out)
    assert not isinstance(fast[3], PointDKM)  # the numba stage ran
    monkeypatch.setattr(_Grid, "_kernel_args", lambda self, x: None)  # the torch path throughout
    reference = _run(x, c0, p, g_out)
    assert isinstance(reference[3], PointDKM)
    torch.testing.assert_close(fast[1], reference[1], rtol=1e-6, atol=1e-9)  # centroids (float32)
    torch.testing.assert_close(fast[0], reference[0], rtol=1e-6, atol=1e-9)  # outputs
    scale = reference[2].abs().max()
    assert scale > 0
    torch.testing.assert_close(fast[2], reference[2], rtol=1e-5, atol=1e-6 * float(scale))  # weight gradients


def test_numba_stage_matches_with_sensitivity_weights(monkeypatch):
    """Sensitivity weights enter through the moments' power sums, which both stages read."""
    x = _weights(1)
    k = 16
    c0 = torch.quantile(x[0, :, 0], torch.linspace(0.02, 0.98, k)).reshape(1, k, 1)
    gen = torch.Generator().manual_seed(2)
    rows, cols = torch.rand(1, 100, generator=gen) + 0.5, torch.rand(300, generator=gen) + 0.1  # 100 x 300 points
    sens = Sensitivity(rows, cols, torch.zeros(1, 100), torch.zeros(300), active=True)
    p = DKMParams(tau=3e-4)
    g_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    fast = _run(x, c0, p, g_out, sens)
    monkeypatch.setattr(_Grid, "_kernel_args", lambda self, x: None)
    reference = _run(x, c0, p, g_out, sens)
    torch.testing.assert_close(fast[0], reference[0], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(fast[2], reference[2], rtol=1e-5, atol=1e-6 * float(reference[2].abs().max()))


@pytest.mark.parametrize("p", [DKMParams(tau=3e-4, mode="gsm"), DKMParams(tau=3e-4, lam=0.5),
                               DKMParams(tau=3e-4, mode="hard")])
def test_other_modes_keep_the_torch_stage(p):
    x = _weights(1, n=5000)
    c0 = torch.quantile(x[0, :, 0], torch.linspace(0.02, 0.98, 16)).reshape(1, 16, 1)
    assert isinstance(_run(x, c0, p, torch.ones_like(x))[3], PointDKM)
