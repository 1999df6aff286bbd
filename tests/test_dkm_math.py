"""The DKM math: the dense and binned engines against the plain-autograd reference (``dkm_reference``), forward,
centroids and weight gradient, and the dense engine's attention cache."""

import pytest
import torch

from dkm_palett.dkm_binned import BinnedDKM
from dkm_palett.dkm_math import DenseDKM, DKMParams, dkm_reference


@pytest.mark.parametrize("cache", [0.0, 1e12], ids=["recompute", "cached"])
@pytest.mark.parametrize("dim,mode,lam,zero", [(1, "dkm", 0.0, None), (2, "dkm", 0.0, None), (1, "dkm", 0.5, 1),
                                               (4, "dkm", 0.2, 0), (1, "hard", 0.0, None), (2, "gsm", 0.0, None)])
def test_dense_matches_reference(dim, mode, lam, zero, cache):
    torch.manual_seed(0)
    x = (torch.randn(2, 300, dim, dtype=torch.float64) * 0.05).requires_grad_()
    c0 = torch.sort(torch.randn(2, 8, dim, dtype=torch.float64) * 0.05, dim=1)[0]
    p = DKMParams(tau=1e-3, mode=mode, max_iter=3, epsilon=0.0, lam=lam, zero_index=zero, seed=5)
    out, c = dkm_reference(x, c0, p)
    g = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, g)
    x2 = x.detach().clone().requires_grad_()
    rows = 1000 if mode == "gsm" else 37  # gsm noise is drawn per chunk
    out2, c2 = DenseDKM.apply(x2, c0, p, rows, cache)
    (gx2,) = torch.autograd.grad(out2, x2, g)
    assert torch.allclose(out2, out, rtol=1e-5, atol=1e-12)
    assert (gx2 - gx).abs().max() <= 1e-5 * gx.abs().max()
    assert torch.allclose(c2, c, atol=1e-12)


def test_binned_exact_for_half_precision_values_and_bounded_for_fp32():
    torch.manual_seed(0)
    for exact in (True, False):
        base = torch.randn(2, 20000, 1) * 0.05
        if exact:
            base = base.half().float()
        x = base.double().requires_grad_()
        c0 = torch.sort(torch.randn(2, 16, 1, dtype=torch.float64) * 0.05, dim=1)[0]
        p = DKMParams(tau=1e-4, max_iter=3, epsilon=0.0)
        out, _ = dkm_reference(x, c0, p)
        g = torch.randn_like(out)
        (gx,) = torch.autograd.grad(out, x, g)
        x2 = x.detach().clone().requires_grad_()
        out2, _ = BinnedDKM.apply(x2, c0, p, 65536, torch.float16 if exact else None)
        (gx2,) = torch.autograd.grad(out2, x2, g)
        out_err = ((out2 - out).abs().max() / out.abs().max()).item()
        grad_err = ((gx2 - gx).norm() / gx.norm()).item()
        if exact:
            assert out_err < 1e-10 and grad_err < 1e-10
        else:  # documented bound of the binned approximation for fp32 weights
            assert out_err < 1e-5 and grad_err < 5e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lam,zero", [(0.0, None), (0.3, 2)])
def test_binned_is_exact_for_half_values_with_lambda_and_pinned_zero(dtype, lam, zero):
    torch.manual_seed(1)
    x = (torch.randn(3, 5000, 1) * 0.05).to(dtype).double().requires_grad_()
    c0 = torch.sort(torch.randn(3, 8, 1, dtype=torch.float64) * 0.05, dim=1)[0]
    p = DKMParams(tau=1e-3, max_iter=3, epsilon=0.0, lam=lam, zero_index=zero)
    out, c = dkm_reference(x, c0, p)
    g = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, g)
    x2 = x.detach().clone().requires_grad_()
    out2, c2 = BinnedDKM.apply(x2, c0, p, 4096, dtype, 700)  # 700-row chunks: the per-bin work is chunked too
    (gx2,) = torch.autograd.grad(out2, x2, g)
    assert (out2 - out).abs().max() <= 1e-10 * out.abs().max()
    assert (gx2 - gx).norm() <= 1e-10 * gx.norm()
    assert torch.allclose(c2, c, atol=1e-12)


@pytest.mark.parametrize("bins,out_tol,grad_tol", [(1024, 1e-4, 2e-2), (16384, 2e-6, 2e-3)])
def test_binned_grid_error_shrinks_with_bins(bins, out_tol, grad_tol):
    """fp32 weights on the grid: forward error O(delta^2), weight-gradient error O(delta) (module docstring)."""
    torch.manual_seed(2)
    x = (torch.randn(1, 60000, 1) * 0.02).double().requires_grad_()
    c0 = torch.quantile(x.detach()[0, :, 0], torch.linspace(0.03, 0.97, 16, dtype=torch.float64)).reshape(1, 16, 1)
    p = DKMParams(tau=1e-4, max_iter=3, epsilon=0.0, lam=0.1)
    out, c = dkm_reference(x, c0, p)
    g = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, g)
    x2 = x.detach().clone().requires_grad_()
    out2, c2 = BinnedDKM.apply(x2, c0, p, bins, None)
    (gx2,) = torch.autograd.grad(out2, x2, g)
    assert (out2 - out).abs().max() <= out_tol * out.abs().max()
    assert (gx2 - gx).norm() <= grad_tol * gx.norm()
    assert (c2 - c).abs().max() <= out_tol * c.abs().max()


def test_dense_cache_is_used_only_within_budget():
    from dkm_palett.dkm_math import PointDKM

    x = torch.randn(1, 1000, 2)
    c0 = x[:, :8].clone()
    p = DKMParams(max_iter=3, epsilon=0.0)
    need = 1000 * 8 * 4 * 3
    small, large = PointDKM(x, None, None, p, 100, need - 1), PointDKM(x, None, None, p, 100, need)
    small.run(c0)
    large.run(c0)
    assert small.cache is None and large.cache is not None and len(large.cache) == 30
    assert torch.equal(small.table(), large.table())


def test_gradients_flow_through_attention_and_centroids():
    x = (torch.randn(1, 200, 1, dtype=torch.float64) * 0.05).requires_grad_()
    c0 = torch.linspace(-0.1, 0.1, 4, dtype=torch.float64).reshape(1, 4, 1)
    soft, _ = dkm_reference(x, c0, DKMParams(tau=1e-3, epsilon=0.0))
    weights = torch.linspace(0, 1, 200, dtype=torch.float64).reshape(1, 200, 1)
    (g,) = torch.autograd.grad((soft * weights).sum(), x)
    # through the attention (own weight) and through the centroids (every other weight): not just STE
    assert g.abs().sum() > 0 and not torch.allclose(g, weights, atol=1e-3)
