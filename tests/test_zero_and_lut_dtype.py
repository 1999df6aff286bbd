"""Pinned zeros (enforce_zero on grouped LUTs, prune_threshold), quantized LUTs in training (straight-through
gradient), and LUT quantization that follows the LUT's device."""

import pytest
import torch
from torch import nn

from dkm_palett import DKMPalettizer, DKMPalettizerConfig, ModuleDKMPalettizerConfig
from dkm_palett.lut import quantize_lut_int, round_lut
from dkm_palett.palettized_weight import records_of
from dkm_palett.palettizer import fake_palettizers

# --------------------------------------------------------------------------------------- enforce_zero per group

#: Four well-separated levels per LUT group; the level nearest 0 sits at a different sorted position in each group.
GROUP_LEVELS = ((-1.0, 0.1, 1.0, 2.0), (0.05, 1.0, 2.0, 3.0), (-3.0, -2.0, -1.0, -0.08), (-2.0, -1.0, 0.02, 1.0))


def _grouped_levels_linear() -> nn.Linear:
    """``Linear(64, 16)``: output channels 4g..4g+3 hold GROUP_LEVELS[g] (each level 64 times, plus tiny noise)."""
    gen = torch.Generator().manual_seed(0)
    model = nn.Linear(64, 16, bias=False)
    rows = []
    for levels in GROUP_LEVELS:
        values = torch.tensor(levels).repeat(64)[torch.randperm(256, generator=gen)]
        rows.append(values.reshape(4, 64) + 1e-4 * torch.randn(4, 64, generator=gen))
    with torch.no_grad():
        model.weight.copy_(torch.cat(rows))
    return model


def _expected_lut(levels) -> list[float]:
    """The group's levels with the one nearest 0 replaced by exactly 0, sorted."""
    nearest = min(levels, key=abs)
    return sorted(0.0 if v == nearest else v for v in levels)


def test_enforce_zero_pins_each_groups_own_nearest_centroid():
    """Every LUT group (per_grouped_channel) pins *its own* centroid nearest 0 and keeps its other three levels,
    at initialisation and after DKM training steps."""
    model = _grouped_levels_linear()
    cfg = ModuleDKMPalettizerConfig(n_bits=2, weight_threshold=0, granularity="per_grouped_channel", group_size=4,
                                    enforce_zero=True, kmeans_init="opt1d")
    pal = DKMPalettizer(model, DKMPalettizerConfig(global_config=cfg))
    pal.prepare(inplace=True)
    (_, _, _, layer), = fake_palettizers(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    for step in range(3):
        model.train()
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        pal.step()
        for g, levels in enumerate(GROUP_LEVELS):
            lut = sorted(layer.centroids[g, :, 0].tolist())
            assert lut == pytest.approx(_expected_lut(levels), abs=0.02), (step, g, lut)
            assert 0.0 in lut, (step, g, lut)
    record = records_of(pal.finalize())["weight"]
    for g, levels in enumerate(GROUP_LEVELS):
        assert sorted(record.lut[g, :, 0].tolist()) == pytest.approx(_expected_lut(levels), abs=0.02), g


# --------------------------------------------------------------------------------------- prune_threshold


@pytest.mark.parametrize("n_bits,grouping", [(2, {}), (3, {"granularity": "per_grouped_channel", "group_size": 2})],
                         ids=["per_tensor", "grouped"])
def test_pruned_weights_are_exactly_zero_after_finalize(n_bits, grouping):
    """prune_threshold alone (no enforce_zero): every weight with |w| <= threshold is exactly 0 in the finalized
    model, and the LUT holds an exact 0 entry (coremltools 9 leaves them non-zero unless enforce_zero is set)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    threshold = 0.03
    cfg = ModuleDKMPalettizerConfig(n_bits=n_bits, weight_threshold=100, prune_threshold=threshold, **grouping)
    pal = DKMPalettizer(model, DKMPalettizerConfig(global_config=cfg))
    pal.prepare(inplace=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(64, 32), torch.randint(0, 10, (64,))
    for _ in range(3):
        model.train()
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        pal.step()
    raw = {i: model[i].parametrizations.weight.original.detach().clone() for i in (0, 2)}
    final = pal.finalize()
    for i, w in raw.items():
        small = w.abs() <= threshold
        assert small.sum() > 50  # the threshold prunes a real share of the weights
        assert (final[i].weight[small] == 0).all(), i
        record = records_of(final[i])["weight"]
        assert (record.lut == 0).any(dim=1).all(), i  # every LUT group holds an exact 0


# --------------------------------------------------------------------------------------- quantized LUTs in training


def _plain_dkm_ste(x, c0, tau, iters, rounding):
    """DKM written out with plain autograd in float64, the LUT rounded with a straight-through estimator:
    forward uses ``rounding(c)``, backward treats the rounding as the identity."""
    c = c0
    for _ in range(iters):
        a = torch.softmax(-(x - c.transpose(1, 2)) ** 2 / tau, dim=-1)  # (G, N, K)
        c_new = (a.transpose(1, 2) @ x) / a.sum(1).unsqueeze(-1)
        c, a_last = c_new, a
    return a_last @ (c + (rounding(c) - c).detach())


def _round_i8(c):
    scale = c.detach().abs().amax() / 127
    return (c / scale).round().clamp(-128, 127) * scale


def _round_fp8(c):
    return c.to(torch.float8_e4m3fn).to(c.dtype)


@pytest.mark.parametrize("lut_dtype,rounding", [("i8", _round_i8), ("fp8_e4m3", _round_fp8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32-dense", "fp16-binned"])
def test_quantized_lut_trains_with_a_straight_through_gradient(lut_dtype, rounding, dtype):
    """In training the layer's output uses the LUT rounded to ``lut_dtype``, and the weight gradient is the
    straight-through one: the same as a plain-autograd DKM whose rounding passes the gradient unchanged."""
    gen = torch.Generator().manual_seed(0)
    model = nn.Linear(40, 20, bias=False).to(dtype)
    with torch.no_grad():
        model.weight.copy_((torch.randn(20, 40, generator=gen) * 0.5).to(dtype))
    tau, iters = 0.05, 2
    cfg = ModuleDKMPalettizerConfig(n_bits=2, weight_threshold=0, lut_dtype=lut_dtype, palett_tau=tau,
                                    kmeans_max_iter=iters, palett_epsilon=0.0,
                                    dkm_impl="dense" if dtype == torch.float32 else "auto")
    DKMPalettizer(model, DKMPalettizerConfig(global_config=cfg)).prepare(inplace=True)
    (_, _, _, layer), = fake_palettizers(model)
    c0 = torch.tensor([-0.9, -0.2, 0.3, 1.1]).reshape(1, 4, 1)
    layer.centroids.copy_(c0)
    layer.initialized.fill_(True)
    upstream = torch.randn(20, 40, generator=gen)
    model.train()
    out = model.weight
    (out.float() * upstream).sum().backward()
    grad = model.parametrizations.weight.original.grad.double().reshape(1, -1, 1)

    x = model.parametrizations.weight.original.detach().double().reshape(1, -1, 1).requires_grad_()
    expected = _plain_dkm_ste(x, c0.double(), tau, iters, rounding)
    (expected_grad,) = torch.autograd.grad(expected, x, upstream.double().reshape(1, -1, 1))
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert torch.allclose(out.double().reshape(1, -1, 1), expected, rtol=tol, atol=tol)
    assert torch.allclose(grad, expected_grad, rtol=tol, atol=tol * expected_grad.abs().max().item())
    # the rounding really happened in the forward pass: the output is not the unrounded DKM's
    unrounded = _plain_dkm_ste(x.detach(), c0.double(), tau, iters, lambda c: c)
    assert (expected - unrounded).abs().max() > 1e-3


# --------------------------------------------------------------------------------------- device


@pytest.mark.parametrize("lut_dtype", ["i8", "u8"])
def test_integer_lut_quantization_follows_the_lut_device(lut_dtype):
    """Every tensor of an integer LUT's quantization lives on the LUT's device (checked on ``meta``, which fails
    on any mix with CPU tensors, so no GPU is needed)."""
    lut = torch.empty(3, 4, 1, device="meta")
    quant = quantize_lut_int(lut, lut_dtype)
    assert {quant.q.device.type, quant.scale.device.type, quant.zero_point.device.type} == {"meta"}
    assert quant.q.dtype == (torch.int8 if lut_dtype == "i8" else torch.uint8)
    assert round_lut(lut, lut_dtype).device.type == "meta"


@pytest.mark.parametrize("lut_dtype", ["i8", "u8"])
def test_integer_lut_quantization_values(lut_dtype):
    """The device-agnostic rewrite keeps the numbers: symmetric i8, affine u8 with an exact 0."""
    lut = torch.tensor([[-0.5, 0.0, 0.25, 1.0], [0.1, 0.2, 0.3, 0.4]]).unsqueeze(-1)
    quant = quantize_lut_int(lut, lut_dtype)
    deq = quant.dequantize()
    if lut_dtype == "i8":
        assert quant.zero_point.tolist() == [0, 0]
        assert quant.scale.tolist() == pytest.approx([1.0 / 127, 0.4 / 127])
    else:
        assert quant.scale.tolist() == pytest.approx([1.5 / 255, 0.4 / 255])
        assert quant.zero_point.tolist() == [85, 0]  # round(0.5 / (1.5 / 255)) = 85
    assert deq[0, 1, 0].item() == 0.0
    assert torch.allclose(deq, lut, atol=quant.scale.max().item() / 2 + 1e-7)
