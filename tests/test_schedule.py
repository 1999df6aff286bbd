"""The end of DKM training (dkm_palett.schedule): the hard phase closes the gap between the function DKM trains and
the one finalize ships, and ``finalize_lut="mean"`` refits each LUT entry to the mean of its weights."""

import copy
import dataclasses

import pytest
import torch
from torch import nn

from dkm_palett import DKMPalettizer, DKMPalettizerConfig, ModuleDKMPalettizerConfig, palettized_tensors
from dkm_palett import schedule
from dkm_palett.palettizer import fake_palettizers

STEPS = 16


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))


def _trained(**fields):
    """An MLP whose 2048-element weight DKM palettizes at 2 bits with a soft tau, trained ``STEPS`` Adam steps."""
    model = _mlp()
    cfg = ModuleDKMPalettizerConfig(n_bits=2, weight_threshold=1000, palett_tau=1e-3, total_steps=STEPS, **fields)
    palettizer = DKMPalettizer(model, DKMPalettizerConfig(global_config=cfg))
    palettizer.prepare(inplace=True)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 32, generator=gen), torch.randint(0, 10, (256,), generator=gen)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(STEPS):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        palettizer.step()
    return model, palettizer, x


@torch.no_grad()
def _training_forward_weight(model):
    """The weight the next training forward uses (on a copy: that forward moves the centroids)."""
    model = copy.deepcopy(model)
    model.train()
    return model[0].weight.clone()


def test_hard_phase_window_follows_the_step_count():
    cfg = ModuleDKMPalettizerConfig(hard_fraction=0.25)
    assert [schedule.hard_phase(cfg, s, 100) for s in (0, 74, 75, 100, 120)] == [False, False, True, True, True]
    assert not schedule.hard_phase(cfg, 10 ** 6, None)  # no horizon: no hard phase
    assert not schedule.hard_phase(ModuleDKMPalettizerConfig(), 100, 100)
    assert schedule.hard_phase(ModuleDKMPalettizerConfig(hard_fraction=1.0), 0, None)  # all steps: no horizon needed


def test_the_palettizers_total_steps_stand_in_for_the_configs():
    """A config without ``total_steps`` takes the palettizer's (which the Lightning callback sets); the config's
    own wins; the horizon survives the palettizer's state_dict."""
    model = _mlp()
    cfg = DKMPalettizerConfig(global_config=ModuleDKMPalettizerConfig(n_bits=2, weight_threshold=1000,
                                                                      hard_fraction=0.5))
    palettizer = DKMPalettizer(model, cfg)
    palettizer.prepare(inplace=True)
    fp = next(fp for *_, fp in fake_palettizers(model))
    for _ in range(6):
        palettizer.step()
    assert not fp.hard
    palettizer.total_steps = 10
    palettizer.step()
    assert fp.hard
    other = DKMPalettizer(model, cfg)
    other.load_state_dict(palettizer.state_dict())
    assert other.total_steps == 10 and fp.hard
    # the config's own total_steps wins (the layer reads the settings fixed at prepare, so a new config)
    own = DKMPalettizerConfig(global_config=ModuleDKMPalettizerConfig(n_bits=2, weight_threshold=1000,
                                                                      hard_fraction=0.5, total_steps=100))
    third = DKMPalettizer(_mlp(), own)
    third_fp = next(fp for *_, fp in fake_palettizers(third.prepare(inplace=True)))
    third.total_steps = 10
    for _ in range(7):
        third.step()
    assert not third_fp.hard


def test_hard_phase_trains_exactly_what_finalize_ships():
    """With the hard phase (and the mean refit), the training forward's weight after the last step is the finalized
    weight, bit for bit; the soft DKM of the same run is off by more than 1e-3 somewhere."""
    model, palettizer, _ = _trained(hard_fraction=0.25, finalize_lut="mean")
    assert next(fp for *_, fp in fake_palettizers(model)).hard
    trained = _training_forward_weight(model)
    final = palettizer.finalize()
    assert torch.equal(trained, final[0].weight)
    soft, soft_pal, _ = _trained(hard_fraction=0.0, finalize_lut="mean")
    assert (_training_forward_weight(soft) - soft_pal.finalize()[0].weight).abs().max() > 1e-3


def test_hard_phase_forward_is_the_snapped_weight_with_a_straight_through_gradient():
    """A hard-phase training forward: the weight is exactly the entries of the LUT of its clusters' means (one Lloyd
    step from the centroids, which the forward leaves alone: a second read in the same step gives the same values),
    and the original weight's gradient is the palettized weight's (straight-through). step() then moves the
    centroids to those means."""
    model, palettizer, _ = _trained(hard_fraction=1.0)
    fp = next(fp for *_, fp in fake_palettizers(model))
    assert fp.hard and int(fp.steps) == STEPS
    original = model[0].parametrizations.weight.original
    flat = fp._prepare_input(original.detach())[0][0, :, 0]
    before = fp.centroids[0, :, 0].clone()
    near = (flat[:, None] - before[None, :]).abs().argmin(1)
    means = torch.stack([flat[near == k].mean() for k in range(4)])
    model.train()
    original.grad = None
    weight = model[0].weight
    assert torch.equal(weight, model[0].weight) and torch.equal(fp.centroids[0, :, 0], before)
    torch.testing.assert_close(weight.detach().unique(), means.sort().values, rtol=1e-6, atol=1e-7)
    weight.sum().mul(3.0).backward()
    torch.testing.assert_close(original.grad, torch.full_like(original, 3.0))
    palettizer.step()
    torch.testing.assert_close(fp.centroids[0, :, 0], means, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("finalize_lut", ["mean", "dkm"])
def test_finalize_lut_mean_is_the_best_lut_for_dkms_assignment(finalize_lut):
    """``mean``: every LUT entry is the mean of the float weights nearest to DKM's last centroids (``dkm``: the
    centroids themselves, which are not those means). Unweighted: the 2-bit default's sensitivity-weighted means are
    tests/test_dkm_sensitivity.py's."""
    model, palettizer, _ = _trained(finalize_lut=finalize_lut, sensitivity_weighted=False)
    fp = next(fp for *_, fp in fake_palettizers(model))
    flat = fp._prepare_input(model[0].parametrizations.weight.original.detach())[0][0, :, 0]
    dkm = fp.centroids[0, :, 0].clone()
    near = (flat[:, None] - dkm[None, :]).abs().argmin(1)
    means = torch.stack([flat[near == k].mean() for k in range(4)])
    lut = next(r for *_, r in palettized_tensors(palettizer.finalize())).lut[0, :, 0]
    if finalize_lut == "mean":
        torch.testing.assert_close(lut, means, rtol=1e-6, atol=1e-7)
    else:
        assert torch.equal(lut, dkm) and (lut - means).abs().max() > 1e-4


def test_mean_refit_lowers_the_clustering_error():
    """... and the eval forward before finalize already shows that LUT (what users evaluate is what ships)."""
    model, palettizer, _ = _trained(finalize_lut="dkm")
    fp = next(fp for *_, fp in fake_palettizers(model))
    original = model[0].parametrizations.weight.original.detach()
    dkm_error = (fp.to_palettized(original).to_dense() - original).square().sum()
    fp.settings = dataclasses.replace(fp.settings, finalize_lut="mean")
    mean_error = (fp.to_palettized(original).to_dense() - original).square().sum()
    assert mean_error < dkm_error
    with torch.no_grad():
        evaluated = model.eval()[0].weight.clone()
    assert torch.equal(evaluated, palettizer.finalize()[0].weight)


@pytest.mark.parametrize("field, value, exc", [
    ("total_steps", 0, ValueError), ("total_steps", 2.5, TypeError), ("hard_fraction", 1.5, ValueError),
    ("hard_fraction", -0.1, ValueError), ("finalize_lut", "median", ValueError),
])
def test_schedule_fields_are_checked(field, value, exc):
    with pytest.raises(exc, match=field):
        ModuleDKMPalettizerConfig(**{field: value})
