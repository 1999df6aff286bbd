"""sensitivity_weighted: the weighted centroid update (every engine against the plain-autograd reference), the
factored estimate the backward passes feed, the weighted finalize LUT, config checks and checkpoints."""

import pytest
import torch
from torch import nn

from dkm_palett import DKMPalettizer, DKMPalettizerConfig, ModuleDKMPalettizerConfig
from dkm_palett.dkm_binned import BinnedDKM, grid_points
from dkm_palett.dkm_fused import FusedDKM
from dkm_palett.dkm_math import DenseDKM, DKMParams, dkm_reference
from dkm_palett.dkm_sensitivity import BETA, FLOOR, Sensitivity
from dkm_palett.palettizer import fake_palettizers


def _problem(groups=2, rows=60, cols=50, k=4, seed=0):
    """``n = rows * cols`` weights per group, uneven factored weights (so weighting changes the result)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(groups, rows * cols, 1, generator=gen) * 0.02
    c0 = torch.sort(torch.randn(groups, k, 1, generator=gen) * 0.02, dim=1).values
    r, c = torch.rand(groups, rows, generator=gen) * 3, torch.rand(cols, generator=gen) * 2
    g = torch.randn(groups, rows * cols, 1, generator=gen)
    return x, c0, r, c, g


def _sensitivity(r, c, active=True):
    return Sensitivity(r, c, torch.zeros_like(r), torch.zeros_like(c), active=active)


def _relative(a, b):
    return float((a.double() - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("engine", ["fused", "dense", "binned"])
@pytest.mark.parametrize("lam,iters", [(0.0, 1), (0.3, 2)])
def test_weighted_update_matches_reference(engine, lam, iters):
    x, c0, r, c, g = _problem()
    p = DKMParams(tau=1e-4, max_iter=iters, lam=lam, epsilon=0.0)
    om = (r.double().unsqueeze(-1) * c.double()).reshape(x.shape) + FLOOR  # point n = i * cols + j
    x_ref = x.double().requires_grad_()
    out_ref, c_ref = dkm_reference(x_ref, c0.double(), p, om)
    out_ref.backward(g.double())
    sens = _sensitivity(r, c)
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
    # the backward fed the estimate: the row and column sums of this step's squared output gradient
    _assert_pending(sens, g)


def _assert_pending(sens, g):
    square = g.square().view(*sens.pending_rows.shape, -1)
    torch.testing.assert_close(sens.pending_rows, square.sum(-1), rtol=1e-6, atol=0)
    torch.testing.assert_close(sens.pending_cols, square.sum((0, 1)), rtol=1e-6, atol=0)


def test_inactive_sensitivity_is_the_unweighted_update():
    """Before the first fold the update is plain DKM, bit for bit, and the backward still records."""
    x, c0, r, c, g = _problem()
    p = DKMParams(tau=1e-4)
    sens = _sensitivity(r, c, active=False)
    x_w, x_u = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_w, _ = FusedDKM.apply(x_w, c0, p, sens)
    out_u, _ = FusedDKM.apply(x_u, c0, p)
    out_w.backward(g)
    out_u.backward(g)
    assert torch.equal(out_w, out_u) and torch.equal(x_w.grad, x_u.grad)
    _assert_pending(sens, g)


def test_record_in_slabs_sums_every_row_and_column(monkeypatch):
    """``record`` squares the gradient a slab of rows at a time (slabs span LUT groups): any slab size gives the
    same row and column sums."""
    from dkm_palett import dkm_sensitivity

    _, _, r, c, g = _problem(groups=3, rows=7, cols=11)
    for chunk in (1, 30, 11 * 7 * 2 + 5, 1 << 20):  # a row per slab, 2, 14 (across groups), everything
        monkeypatch.setattr(dkm_sensitivity, "RECORD_CHUNK", chunk)
        sens = _sensitivity(r, c)
        sens.record(g)
        sens.record(g)
        _assert_pending(sens, g * 2 ** 0.5)


def test_fold_normalises_then_averages():
    gen = torch.Generator().manual_seed(1)
    rows, cols = torch.zeros(2, 5), torch.zeros(7)
    p_rows, p_cols = torch.rand(2, 5, generator=gen) * 1e-9, torch.rand(7, generator=gen) * 1e-9  # tiny gradients
    p_rows[1] *= 1e6
    folds = torch.tensor(0)
    first = p_rows.clone(), p_cols.clone()
    Sensitivity.fold(rows, cols, p_rows, p_cols, folds)
    expected = first[0] / first[0].mean(1, keepdim=True), first[1] / first[1].mean()
    torch.testing.assert_close(rows, expected[0])
    torch.testing.assert_close(cols, expected[1])
    estimate = _sensitivity(rows, cols).estimate().view(2, -1)
    torch.testing.assert_close(estimate.mean(1), torch.ones(2))  # each group's weights have mean 1: floor = FLOOR
    assert int(folds) == 1 and not p_rows.any() and not p_cols.any()
    second = torch.rand(2, 5, generator=gen), torch.rand(7, generator=gen)
    p_rows.copy_(second[0])
    p_cols.copy_(second[1])
    Sensitivity.fold(rows, cols, p_rows, p_cols, folds)
    torch.testing.assert_close(rows, BETA * expected[0] + (1 - BETA) * second[0] / second[0].mean(1, keepdim=True))
    torch.testing.assert_close(cols, BETA * expected[1] + (1 - BETA) * second[1] / second[1].mean())
    Sensitivity.fold(rows, cols, p_rows, p_cols, folds)  # nothing recorded: no change
    assert int(folds) == 2


def test_factored_estimate_keeps_the_row_and_column_sums():
    """The fold's estimate of one step's squared gradients ``P`` is the rank-1 matrix with ``P``'s row and column
    sums (scaled to mean 1): ``P`` itself when ``P`` is rank 1, and otherwise a matrix whose rows and columns weigh
    what ``P``'s do."""
    gen = torch.Generator().manual_seed(2)
    for rank_1, square in ((True, torch.outer(torch.rand(6, generator=gen), torch.rand(9, generator=gen))),
                           (False, torch.rand(6, 9, generator=gen) ** 4)):
        sens = _sensitivity(torch.zeros(1, 6), torch.zeros(9))
        sens.record(square.sqrt().reshape(1, -1, 1))  # record squares its gradient
        Sensitivity.fold(sens.rows, sens.cols, sens.pending_rows, sens.pending_cols, torch.tensor(0))
        estimate = sens.estimate().view(6, 9).double()
        scaled = square.double() / square.double().mean()
        torch.testing.assert_close(estimate.sum(1), scaled.sum(1), rtol=1e-5, atol=0)
        torch.testing.assert_close(estimate.sum(0), scaled.sum(0), rtol=1e-5, atol=0)
        if rank_1:
            torch.testing.assert_close(estimate, scaled, rtol=1e-5, atol=0)
        else:  # a rank-1 estimate cannot be P itself
            assert not torch.allclose(estimate, scaled, rtol=0.1)


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
    assert int(fp.sensitivity_folds) == 4 and float(fp.sensitivity().estimate().std()) > 0.1
    weight = model[0].parametrizations.weight.original.detach()
    x = fp._prepare_input(weight)[0]
    lut = fp.final_lut(x)
    idx = torch.cdist(x[0], fp.centroids[0]).argmin(1)  # 2-bit, f32 LUT: nearest centroid
    om = (fp.sensitivity().estimate() + FLOOR)[0, :, 0].double()
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
        assert torch.equal(a.sensitivity_rows, b.sensitivity_rows) and torch.equal(a.sensitivity_cols, b.sensitivity_cols)
        assert int(b.sensitivity_folds) == int(a.sensitivity_folds) == 4


def test_config_checks():
    with pytest.raises(ValueError, match="sensitivity_weighted='yes' is not allowed; allowed values: True, False"):
        ModuleDKMPalettizerConfig(n_bits=2, sensitivity_weighted="yes")
    with pytest.raises(TypeError, match="sensitivity_weighted must be True, False or 'auto', got int"):
        ModuleDKMPalettizerConfig(n_bits=2, sensitivity_weighted=1)


def test_auto_weights_the_2_bit_layers_only():
    """The default, ``"auto"``, resolves per layer from its own n_bits: a 2-bit layer keeps the factored estimate
    (``rows + cols`` numbers, not one a weight), a 4-bit layer none; True and False apply at every width."""
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 48))
    config = DKMPalettizerConfig(global_config=ModuleDKMPalettizerConfig(n_bits=2, weight_threshold=1000),
                                 module_name_configs={"2": ModuleDKMPalettizerConfig(n_bits=4, weight_threshold=1000)})
    model = DKMPalettizer(model, config).prepare()
    layers = {name: fp for name, _, _, fp in fake_palettizers(model)}
    assert layers["0.weight"].sensitivity_weighted and not layers["2.weight"].sensitivity_weighted
    buffers = dict(layers["0.weight"].named_buffers())
    assert buffers["sensitivity_rows"].shape == (1, 64) and buffers["sensitivity_cols"].shape == (32,)
    assert not any(name.startswith("sensitivity") for name, _ in layers["2.weight"].named_buffers())
    for value in (True, False):
        cfg = ModuleDKMPalettizerConfig(n_bits=4, weight_threshold=1000, sensitivity_weighted=value)
        model = DKMPalettizer(nn.Sequential(nn.Linear(32, 64)), DKMPalettizerConfig(global_config=cfg)).prepare()
        assert next(iter(fake_palettizers(model)))[-1].sensitivity_weighted is value


def test_the_binned_grid_layer_trains_with_the_estimate(monkeypatch):
    """At 6 bits the layer runs the binned grid with its sensitivity weights: the estimate is folded each step,
    and from the second step on (once active) the weights reach the binned engine."""
    from dkm_palett import dkm_binned

    seen = []
    apply = dkm_binned.BinnedDKM.apply
    monkeypatch.setattr(dkm_binned.BinnedDKM, "apply", lambda *a: seen.append(a[6]) or apply(*a))  # sens
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
    assert int(fp.sensitivity_folds) == 3 and float(fp.sensitivity().estimate().std()) > 0.1
    assert seen and all(isinstance(s, Sensitivity) for s in seen)
    assert [s.active for s in seen][:1] == [False] and seen[-1].active
