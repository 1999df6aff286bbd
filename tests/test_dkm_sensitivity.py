"""sensitivity_weighted: the weighted centroid update (every engine against the plain-autograd reference), the
estimate the backward passes feed, the weighted finalize LUT, config checks and checkpoints."""

import pytest
import torch
from torch import nn

from dkm_palett import DKMPalettizer, DKMPalettizerConfig, ModuleDKMPalettizerConfig
from dkm_palett.dkm_binned import BinnedDKM, grid_points
from dkm_palett.dkm_fused import FusedDKM
from dkm_palett.dkm_math import DenseDKM, DKMParams, dkm_reference
from dkm_palett.dkm_sensitivity import BETA, FLOOR, Sensitivity
from dkm_palett.palettizer import fake_palettizers


def _problem(groups=2, n=3000, k=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(groups, n, 1, generator=gen) * 0.02
    c0 = torch.sort(torch.randn(groups, k, 1, generator=gen) * 0.02, dim=1).values
    estimate = torch.rand(groups, n, 1, generator=gen) * 3  # uneven weights, so weighting changes the result
    floor = torch.linspace(0.01, 0.03, groups)
    g = torch.randn(groups, n, 1, generator=gen)
    return x, c0, estimate, floor, g


def _relative(a, b):
    return float((a.double() - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("engine", ["fused", "dense", "binned"])
@pytest.mark.parametrize("lam,iters", [(0.0, 1), (0.3, 2)])
def test_weighted_update_matches_reference(engine, lam, iters):
    x, c0, estimate, floor, g = _problem()
    p = DKMParams(tau=1e-4, max_iter=iters, lam=lam, epsilon=0.0)
    om = (estimate + floor.view(-1, 1, 1)).double()
    x_ref = x.double().requires_grad_()
    out_ref, c_ref = dkm_reference(x_ref, c0.double(), p, om)
    out_ref.backward(g.double())
    sens = Sensitivity(estimate, floor, torch.zeros_like(estimate), active=True)
    x_eng = x.clone().requires_grad_()
    if engine == "fused":
        out, c = FusedDKM.apply(x_eng, c0, p, sens)
    elif engine == "dense":
        out, c = DenseDKM.apply(x_eng, c0, p, 1024, 0.0, sens)
    else:
        out, c = BinnedDKM.apply(x_eng, c0, p, grid_points(x[..., 0], c0, p.tau), None, 1 << 16, sens)
    out.backward(g)
    # float32 engines against the float64 reference; the binned DKM within its bound (1e-6 forward, 1e-3 gradient)
    tol = {"fused": 1e-6, "dense": 3e-5, "binned": 1e-6}[engine]
    assert _relative(out, out_ref) < tol
    assert _relative(c, c_ref) < tol
    assert _relative(x_eng.grad, x_ref.grad) < (1e-3 if engine == "binned" else tol)
    # the weights matter: the unweighted reference is far from the weighted one
    unweighted, _ = dkm_reference(x.double(), c0.double(), p)
    assert _relative(unweighted, out_ref.detach()) > 100 * tol
    # the backward fed the estimate: exactly this step's squared output gradient
    assert torch.equal(sens.pending, g.square())


def test_inactive_sensitivity_is_the_unweighted_update():
    """Before the first fold the update is plain DKM, bit for bit, and the backward still records."""
    x, c0, estimate, floor, g = _problem()
    p = DKMParams(tau=1e-4)
    pending = torch.zeros_like(estimate)
    x_w, x_u = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_w, _ = FusedDKM.apply(x_w, c0, p, Sensitivity(estimate, floor, pending, active=False))
    out_u, _ = FusedDKM.apply(x_u, c0, p)
    out_w.backward(g)
    out_u.backward(g)
    assert torch.equal(out_w, out_u) and torch.equal(x_w.grad, x_u.grad)
    assert torch.equal(pending, g.square())


def test_fold_normalises_then_averages():
    gen = torch.Generator().manual_seed(1)
    estimate, pending = torch.zeros(2, 50, 1), torch.rand(2, 50, 1, generator=gen) * 1e-9  # tiny raw gradients
    pending[1] *= 1e6
    floor, folds = torch.zeros(2), torch.tensor(0)
    first = pending.clone()
    Sensitivity.fold(estimate, pending, floor, folds)
    expected = first / first.mean(dim=(1, 2), keepdim=True)
    torch.testing.assert_close(estimate, expected)
    torch.testing.assert_close(floor, torch.full((2,), FLOOR))  # each group's weights have mean 1
    assert int(folds) == 1 and not pending.any()
    second = torch.rand(2, 50, 1, generator=gen)
    pending.copy_(second)
    Sensitivity.fold(estimate, pending, floor, folds)
    torch.testing.assert_close(estimate, BETA * expected + (1 - BETA) * second / second.mean(dim=(1, 2), keepdim=True))
    Sensitivity.fold(estimate, pending, floor, folds)  # nothing recorded: no change
    assert int(folds) == 2


def _trained(sensitivity: bool, steps: int = 4):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
    config = ModuleDKMPalettizerConfig(n_bits=2, weight_threshold=1000, sensitivity_weighted=sensitivity)
    pal = DKMPalettizer(model, DKMPalettizerConfig(global_config=config))
    model = pal.prepare(inplace=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 32), torch.randint(0, 4, (16,))
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        pal.step()
    return pal, model


def test_training_uses_the_estimate_and_finalize_ships_weighted_means():
    pal, model = _trained(True)
    _, _, _, fp = next(iter(fake_palettizers(model)))
    assert int(fp.sensitivity_folds) == 4 and float(fp.sensitivity_estimate.std()) > 0.1
    weight = model[0].parametrizations.weight.original.detach()
    x = fp._prepare_input(weight)[0]
    lut = fp.final_lut(x)
    idx = torch.cdist(x[0], fp.centroids[0]).argmin(1)  # 2-bit, f32 LUT: nearest centroid
    om = (fp.sensitivity_estimate + fp.sensitivity_floor.view(-1, 1, 1))[0, :, 0].double()
    for k in range(lut.shape[1]):
        members = idx == k
        expected = (om[members] * x[0, members, 0].double()).sum() / om[members].sum()
        assert abs(float(lut[0, k, 0]) - float(expected)) < 1e-7
    # the plain mean differs: the weighting reached finalize
    plain = float(x[0, idx == 0, 0].double().mean())
    assert abs(float(lut[0, 0, 0]) - plain) > 1e-6
    # and training took a different path from the unweighted run
    _, model_u = _trained(False)
    _, _, _, fp_u = next(iter(fake_palettizers(model_u)))
    assert not torch.allclose(fp.centroids, fp_u.centroids, rtol=0, atol=1e-7)


def test_checkpoint_carries_the_estimate():
    pal, model = _trained(True)
    _, fresh = _trained(True, steps=0)
    fresh.load_state_dict(model.state_dict())
    for (_, _, _, a), (_, _, _, b) in zip(fake_palettizers(model), fake_palettizers(fresh)):
        assert torch.equal(a.sensitivity_estimate, b.sensitivity_estimate)
        assert int(b.sensitivity_folds) == int(a.sensitivity_folds) == 4


def test_config_checks():
    with pytest.raises(TypeError, match="sensitivity_weighted"):
        ModuleDKMPalettizerConfig(n_bits=2, sensitivity_weighted="yes")


def test_the_binned_grid_layer_trains_with_the_estimate(monkeypatch):
    """At 6 bits the layer runs the binned grid with its sensitivity weights: the estimate is folded each step,
    and from the second step on (once active) the weights reach the binned engine."""
    from dkm_palett import dkm_binned

    seen = []
    apply = dkm_binned.BinnedDKM.apply
    monkeypatch.setattr(dkm_binned.BinnedDKM, "apply", lambda *a: seen.append(a[-1]) or apply(*a))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2048, 64))
    nn.init.normal_(model[0].weight, std=0.02)
    config = ModuleDKMPalettizerConfig(n_bits=6, weight_threshold=1000, sensitivity_weighted=True)
    pal = DKMPalettizer(model, DKMPalettizerConfig(global_config=config))
    model = pal.prepare(inplace=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 2048)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        pal.step()
    _, _, _, fp = next(iter(fake_palettizers(model)))
    assert int(fp.sensitivity_folds) == 3 and float(fp.sensitivity_estimate.std()) > 0.1
    assert seen and all(isinstance(s, Sensitivity) for s in seen)
    assert [s.active for s in seen][:1] == [False] and seen[-1].active
