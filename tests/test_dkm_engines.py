"""The DKM engines against the plain-autograd reference: the exact fused kernels, and the binned DKM's error bound
on weights of every scale."""

import pytest
import torch
from torch import nn

from dkm_palett import DKMPalettizer, DKMPalettizerConfig, ModuleDKMPalettizerConfig
from dkm_palett import dkm_binned
from dkm_palett.dkm_binned import BinnedDKM, grid_points
from dkm_palett.dkm_fused import FusedDKM
from dkm_palett.dkm_math import DenseDKM, DKMParams, dkm_reference
from dkm_palett.lut import channel_scale


def rel(a, b):
    return ((a.double() - b).abs().max() / b.abs().max()).item()


def reference(x, c0, p, g):
    """Output, centroids and weight gradient of the float64 reference for float32 weights ``x``."""
    xr = x.double().requires_grad_()
    out, c = dkm_reference(xr, c0.double(), p)
    (gx,) = torch.autograd.grad(out, xr, g.double())
    return out, c, gx


def run(fn, x, g):
    x2 = x.clone().requires_grad_()
    out, c = fn(x2)
    (gx,) = torch.autograd.grad(out, x2, g)
    return out, c, gx


# ----------------------------------------------------------------------------------------- fused (exact)


@pytest.mark.parametrize("groups,k,lam,zero,lut_dtype,max_iter", [
    (1, 16, 0.0, None, "f32", 3),   # plain dkm, 4 bits
    (3, 4, 0.0, None, "f32", 2),    # grouped LUTs, 2 bits
    (2, 8, 0.4, None, "f32", 3),    # palett_lambda
    (2, 9, 0.0, 4, "f32", 3),       # pinned zero (enforce_zero / extra centroid)
    (1, 16, 0.2, 0, "i8", 1),     # quantized LUT, lambda and pinned zero together
])
def test_fused_matches_reference(groups, k, lam, zero, lut_dtype, max_iter):
    torch.manual_seed(0)
    x = torch.randn(groups, 40000 // groups + 17, 1) * 0.02  # not a multiple of the block size
    c0 = torch.sort(torch.randn(groups, k, 1) * 0.02, dim=1)[0]
    p = DKMParams(tau=1e-4, max_iter=max_iter, epsilon=0.0, lam=lam, zero_index=zero, lut_dtype=lut_dtype)
    g = torch.randn_like(x)
    out, c, gx = reference(x, c0, p, g)
    out2, c2, gx2 = run(lambda v: FusedDKM.apply(v, c0, p), x, g)
    # float32 kernels against the float64 reference: float32-rounding-level differences only
    assert rel(out2, out) <= 1e-6
    assert rel(c2, c) <= 1e-6
    assert rel(gx2, gx) <= 5e-6
    if zero is not None:
        assert (c2[:, zero] == 0).all()


def test_fused_output_pass_sums_the_squared_error_and_the_layer_reports_it():
    """``last_error`` of a fused layer comes from the kernel's own sum, not another pass: it must equal the RMS of
    ``DKM output - weight`` computed here in float64, with grouped LUTs and a size that is not a whole chunk."""
    torch.manual_seed(3)
    x = torch.randn(3, 40000, 1) * 0.02
    c0 = torch.sort(torch.randn(3, 8, 1) * 0.02, dim=1)[0]
    out, _ = FusedDKM.apply(x.clone().requires_grad_(), c0, DKMParams(tau=1e-4, max_iter=2, epsilon=0.0))
    assert out.grad_fn.sq_error == pytest.approx(((out.double() - x.double()) ** 2).sum().item(), rel=1e-6)
    model = nn.Sequential(nn.Linear(300, 200))
    cfg = ModuleDKMPalettizerConfig(n_bits=3, weight_threshold=100, granularity="per_grouped_channel", group_size=50)
    DKMPalettizer(model, DKMPalettizerConfig(global_config=cfg)).prepare(inplace=True)
    soft = model[0].weight  # the training forward's output (parametrized read)
    layer = model[0].parametrizations.weight[0]
    raw = model[0].parametrizations.weight.original
    expected = ((soft.double() - raw.double()) ** 2).mean().sqrt().item()
    assert layer.last_error.item() == pytest.approx(expected, rel=1e-5)


def test_fused_stops_early_like_the_reference():
    torch.manual_seed(1)
    x = torch.randn(1, 5000, 1) * 0.02
    c0 = torch.sort(torch.randn(1, 8, 1) * 0.02, dim=1)[0]
    p = DKMParams(tau=1e-4, max_iter=10, epsilon=1e-5)
    g = torch.randn_like(x)
    out, c, gx = reference(x, c0, p, g)
    out2, c2, gx2 = run(lambda v: FusedDKM.apply(v, c0, p), x, g)
    assert rel(out2, out) <= 1e-6 and rel(c2, c) <= 1e-6 and rel(gx2, gx) <= 5e-6


@pytest.mark.parametrize("iters,passes", [(None, 1), (3, 3)])
def test_the_default_runs_one_k_means_iteration_a_step(monkeypatch, iters, passes):
    """``kmeans_max_iter`` defaults to 1 (coremltools: 3) and reaches the engine: one k-means pass per training
    forward; 3 when asked (``palett_epsilon=0`` so that no early stop hides the count)."""
    from dkm_palett import dkm_fused_kernels

    calls = []
    kernel = dkm_fused_kernels._sums_kernel
    monkeypatch.setattr(dkm_fused_kernels, "_sums_kernel", lambda *a: calls.append(1) or kernel(*a))
    extra = {} if iters is None else {"kmeans_max_iter": iters}
    cfg = ModuleDKMPalettizerConfig(n_bits=2, weight_threshold=100, palett_epsilon=0.0, **extra)
    model = nn.Sequential(nn.Linear(64, 64))
    DKMPalettizer(model, DKMPalettizerConfig(global_config=cfg)).prepare(inplace=True)
    calls.clear()  # initialisation may run its own passes
    model[0].weight.sum().backward()
    assert len(calls) == passes


def test_fused_is_exact_where_the_attention_is_sharp():
    """Weights over [-1, 1] (per-channel scales): most attention terms underflow, the exponential must not."""
    torch.manual_seed(2)
    x = torch.rand(1, 30000, 1) * 2 - 1
    c0 = torch.linspace(-0.9, 0.9, 16).reshape(1, 16, 1)
    p = DKMParams(tau=1e-2, max_iter=2, epsilon=0.0)
    g = torch.randn_like(x)
    out, c, gx = reference(x, c0, p, g)
    out2, c2, gx2 = run(lambda v: FusedDKM.apply(v, c0, p), x, g)
    assert rel(out2, out) <= 1e-6 and rel(c2, c) <= 1e-6 and rel(gx2, gx) <= 5e-6


def test_fused_exp2_is_within_2_ulp_and_zero_below_its_floor():
    """The kernels' ``2^t`` (exponent bits and a polynomial) on a dense grid of ``t`` in [-64, 0] and at the
    rounding's ties, against float64: at most 2 units in the last place of the float32 result. A common relative
    error cancels in the softmax, so the engine tests alone would not see one."""
    import numba
    import numpy as np

    from dkm_palett import dkm_fused_kernels as kernels

    @numba.njit
    def evaluate(t, out):
        for i in range(t.shape[0]):
            out[i] = kernels._exp2_nonpos(t[i])

    ties = np.arange(-63.5, 0.0, 1.0)
    t = np.concatenate([np.linspace(-63.99, 0.0, 400_001), ties, [-1e-7, 0.0, 1e-7]]).astype(np.float32)
    out = np.empty_like(t)
    evaluate(t, out)
    ref = np.exp2(t.astype(np.float64))
    ulps = np.abs(out - ref) / np.spacing(ref.astype(np.float32)).astype(np.float64)
    assert ulps.max() <= 2.0, (t[ulps.argmax()], ulps.max())
    below = np.float32([-64.0, -64.5, -100.0, -1e30])
    evaluate(below, out[:4])
    assert (out[:4] == 0).all()


def test_fused_results_do_not_depend_on_the_thread_count():
    torch.manual_seed(3)
    x = torch.randn(2, 70000, 1) * 0.02
    c0 = torch.sort(torch.randn(2, 16, 1) * 0.02, dim=1)[0]
    p = DKMParams(tau=1e-4, max_iter=2, epsilon=0.0, lam=0.1)
    g = torch.randn_like(x)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(run(lambda v: FusedDKM.apply(v, c0, p), x, g))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*results):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------- binned (bounded)


def _weights(kind, n):
    if kind == "normal":
        return torch.randn(1, n) * 0.02
    if kind == "uniform":
        return torch.rand(1, n) * 2 - 1
    if kind == "student_t3":
        return torch.distributions.StudentT(3.0).sample((1, n)) * 0.02
    # per-channel scaled: channels over three decades, divided by their scale as enable_per_channel_scale does
    w = torch.randn(100, n // 100) * torch.logspace(-3, 0, 100).unsqueeze(1)
    return (w / channel_scale(w, 0).unsqueeze(1)).reshape(1, n)


@pytest.mark.parametrize("kind", ["normal", "uniform", "student_t3", "per_channel_scaled"])
@pytest.mark.parametrize("k", [64, 256])
def test_binned_grid_meets_the_error_bound_at_every_scale(kind, k):
    torch.manual_seed(4)
    x = _weights(kind, 20000).unsqueeze(-1)
    c0 = torch.quantile(x[0, :, 0].double(), torch.linspace(0.01, 0.99, k, dtype=torch.float64)).float()
    c0 = c0.reshape(1, k, 1)
    p = DKMParams(tau=1e-4, max_iter=2, epsilon=0.0)
    g = torch.randn_like(x)
    out, c, gx = reference(x, c0, p, g)
    bins = grid_points(x[..., 0], c0, p.tau)
    out2, c2, gx2 = run(lambda v: BinnedDKM.apply(v, c0, p, bins, None), x, g)
    assert rel(out2, out) <= 1e-6
    assert rel(gx2, gx) <= 1e-3


@pytest.mark.parametrize("groups,zero", [(4, None), (1, 3), (3, 0)])
def test_binned_bound_holds_for_grouped_luts_and_a_pinned_zero(groups, zero):
    torch.manual_seed(5)
    scale = torch.logspace(0, 0.5, groups).reshape(-1, 1, 1)
    x = torch.randn(groups, 4000, 1) * 0.02 * scale
    c0 = torch.sort(torch.randn(groups, 64, 1) * 0.02, dim=1)[0] * scale
    if zero is not None:
        c0[:, zero] = 0
    p = DKMParams(tau=1e-4, max_iter=2, epsilon=0.0, zero_index=zero)
    g = torch.randn_like(x)
    out, c, gx = reference(x, c0, p, g)
    out2, c2, gx2 = run(lambda v: BinnedDKM.apply(v, c0, p, grid_points(x[..., 0], c0, p.tau), None), x, g)
    assert rel(out2, out) <= 1e-6 and rel(gx2, gx) <= 1e-3


def test_binned_backward_recomputes_the_forward_bins_and_keeps_nothing_per_weight(monkeypatch):
    """The backward recomputes each weight's bin and fraction from the weight, bit-identical to the forward's, and
    the autograd graph holds only the weight itself (the torch path; the CPU kernels keep no coordinates at all,
    tests/test_binned_kernels.py)."""
    calls = []
    monkeypatch.setattr(dkm_binned._Grid, "_kernel_args", lambda self, x: None)

    def recording(*args):
        result = dkm_binned._grid_coords_impl(*args)
        calls.append(result)
        return result

    monkeypatch.setattr(dkm_binned, "COORD_CHUNK", 1024)  # several chunks
    monkeypatch.setattr(dkm_binned, "_grid_coords_impl", dkm_binned._grid_coords, raising=False)
    monkeypatch.setattr(dkm_binned, "_grid_coords", recording)
    torch.manual_seed(6)
    x = (torch.randn(2, 3000, 1) * 0.02).requires_grad_()
    c0 = torch.sort(torch.randn(2, 64, 1) * 0.02, dim=1)[0]
    p = DKMParams(tau=1e-4, max_iter=2, epsilon=0.0)
    out, _ = BinnedDKM.apply(x, c0, p, grid_points(x.detach()[..., 0], c0, p.tau), None)
    assert [t.data_ptr() for t in out.grad_fn.saved_tensors] == [x.data_ptr()]
    forward_calls = len(calls)
    out.backward(torch.randn_like(out))
    chunks = 3000 // 512 + 1
    assert forward_calls == 2 * chunks and len(calls) == 4 * chunks  # moments + output; two backward sweeps
    for i in range(len(calls)):
        idx, frac = calls[i]
        ref_idx, ref_frac = calls[i % chunks]
        assert torch.equal(idx, ref_idx) and torch.equal(frac, ref_frac)


# ----------------------------------------------------------------------------------------- the layer's choice


def _layer_engine(n_bits, impl, scale=0.02, in_features=512, dtype="fp32", **kw):
    torch.manual_seed(7)
    layer = nn.Sequential(nn.Linear(in_features, 256))
    with torch.no_grad():
        layer[0].weight.normal_(0, scale)
    if dtype == "fp16":
        layer.half()
    cfg = ModuleDKMPalettizerConfig(n_bits=n_bits, weight_threshold=0, dkm_impl=impl, **kw)
    DKMPalettizer(layer, DKMPalettizerConfig(global_config=cfg)).prepare(inplace=True)
    fp = layer[0].parametrizations.weight[0]
    original = layer[0].parametrizations.weight.original
    layer.train()
    layer[0].weight  # initialises the centroids
    x, _ = fp._prepare_input(original.detach())
    return fp.engine(original, x, fp.centroids)


def test_auto_runs_exact_fused_dkm_on_small_luts_and_at_2_bits_and_bounded_binned_above():
    assert _layer_engine(4, "auto", in_features=512)[0] == "fused"  # 131k weights: a grid would be allowed, exact wins
    assert _layer_engine(2, "auto", in_features=2048)[0] == "fused"
    for bits in (3, 4):  # 524k weights a LUT: at least BINNED_MIN_POINTS, so the bounded grid
        name, bins = _layer_engine(bits, "auto", in_features=2048)
        assert name == "binned" and 16 < bins <= 2048 * 256 // 4
    assert _layer_engine(4, "auto", in_features=2048, granularity="per_grouped_channel", group_size=64)[0] == "fused"
    assert _layer_engine(4, "dense")[0] == "fused"
    name, bins = _layer_engine(6, "auto", in_features=2048)
    assert name == "binned" and 16 < bins <= 2048 * 256 // 4
    assert _layer_engine(4, "auto", cluster_dim=2)[0] == "dense"
    # sensitivity_weighted: the grid takes point weights; fp16/bf16's exact bins do not, so those run exact DKM
    assert _layer_engine(6, "auto", in_features=2048, sensitivity_weighted=True)[0] == "binned"
    assert _layer_engine(6, "binned", in_features=2048, sensitivity_weighted=True, dtype="fp16")[0] == "fused"
    assert _layer_engine(6, "binned", in_features=2048, dtype="fp16")[0] == "binned"
    assert _layer_engine(4, "auto", palett_mode="gsm")[0] == "dense"


def test_auto_falls_back_to_exact_where_the_grid_would_be_too_fine(caplog):
    """Weights of std 1 at 6 bits: the bound needs a grid with more points than weights, so auto runs exact DKM;
    at std 4 it needs more than MAX_GRID_ENTRIES, so on request the binned DKM caps the grid and says so."""
    assert _layer_engine(6, "auto", scale=1.0)[0] == "fused"
    with caplog.at_level("WARNING"):
        name, bins = _layer_engine(6, "binned", scale=4.0)
    assert name == "binned" and bins == 1 << 22
    assert "capped" in caplog.text and "dkm_impl='auto' or 'dense'" in caplog.text


def test_the_finiteness_check_the_engine_choice_and_the_grid_read_the_weights_once(monkeypatch):
    """A binned layer's forward needs each group's min and max twice (the grid size for the bound, then the grid)
    and must reject NaN/Inf weights: one pass over the weight for all three (a 1.1B decoder spends about 0.2 s a
    step on each extra pass), and no other full-size reduction."""
    from dkm_palett import binned_kernels

    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(2048, 256))
    cfg = ModuleDKMPalettizerConfig(n_bits=4, weight_threshold=0)
    DKMPalettizer(layer, DKMPalettizerConfig(global_config=cfg)).prepare(inplace=True)
    layer.train()
    layer(torch.randn(2, 2048))  # initialises the centroids
    passes = []
    for name in ("amin", "amax", "sum", "aminmax"):
        reduce = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _r=reduce, _n=name, **k: (
            passes.append(_n) if self.numel() == 2048 * 256 else None) or _r(self, *a, **k))
    value_range = binned_kernels.value_range
    monkeypatch.setattr(binned_kernels, "value_range", lambda x: (
        passes.append("value_range") if x.size == 2048 * 256 else None) or value_range(x))
    layer(torch.randn(2, 2048)).sum().backward()
    assert passes == ["value_range"]  # none at all: the layer did not check or run the grid


def test_value_range_is_amin_and_amax_and_flags_non_finite_groups():
    """The one-pass range: exactly ``amin``/``amax`` per row (tails shorter than a work item included), and both
    bounds NaN for a row holding NaN, +Inf or -Inf (so ``finite()`` is False), on the kernel and the torch path."""
    from dkm_palett import binned_kernels
    from dkm_palett.dkm_binned import ValueRange

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, binned_kernels.CHUNK * 2 + 77, generator=gen)
    x[1, 5] = -0.0
    x[2] *= 1e30
    lo, hi = ValueRange(x).get()
    assert torch.equal(lo, x.amin(1)) and torch.equal(hi, x.amax(1)) and ValueRange(x).finite()
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[3, -1] = bad  # in the tail
        lo, hi = ValueRange(y).get()
        assert lo[3].isnan() and hi[3].isnan()
        assert torch.equal(lo[[0, 1, 2, 4]], x.amin(1)[[0, 1, 2, 4]])
        assert not ValueRange(y).finite() and not ValueRange(y.double()).finite()  # kernel, torch path
    assert ValueRange(x.double()).finite()
