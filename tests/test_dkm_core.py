"""The DKM layer, its configs and the palettizer: each field changes what its name says."""

import dataclasses
import io

import pytest
import torch
from torch import nn

from dkm_palett import DKMPalettizer, DKMPalettizerConfig, FakePalettize, ModuleDKMPalettizerConfig
from dkm_palett.dkm_math import DKMParams, dkm_reference
from dkm_palett.palettized_weight import palettized_tensors, records_of
from dkm_palett.palettizer import fake_palettizers


def mlp(seed=0, width=64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, width), nn.ReLU(), nn.Linear(width, 10))


def train(model, pal, steps=5, seed=0):
    torch.manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(64, 32), torch.randint(0, 10, (64,))
    model.train()
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        pal.step()
    return x


def palettize(cfg_kwargs, steps=3, model=None):
    model = model or mlp()
    cfg_kwargs = {"weight_threshold": 100, **cfg_kwargs}
    pal = DKMPalettizer(model, DKMPalettizerConfig(global_config=ModuleDKMPalettizerConfig(**cfg_kwargs)))
    pal.prepare(inplace=True)
    train(model, pal, steps)
    return model, pal


# ----------------------------------------------------------------------------------------- palettizer flow


def test_quick_start_flow_finalize_keeps_eval_output():
    model, pal = palettize({"n_bits": 2})
    model.eval()
    x = torch.randn(8, 32)
    before = model(x)
    final = pal.finalize(inplace=True)
    assert torch.allclose(final(x), before, atol=1e-6)
    assert final[0].weight.unique().numel() <= 4
    assert final[2].weight.unique().numel() <= 4
    report = pal.report()
    row = report["0.weight"]
    assert row["n_clusters"] == 4 and row["cluster_dim"] == 1 and row["n_params"] == 32 * 64
    assert row["lut_dtype"] == "f32" and row["rms_error"] > 0
    assert "0.weight" in str(report)
    weights = final[0].weight.detach().clone()
    assert pal.forget_records() == 2 and not list(palettized_tensors(final))
    assert torch.equal(final[0].weight, weights)  # the weights stay LUT[indices]


def test_default_n_bits_4_for_linear_2_otherwise():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Flatten(), nn.Linear(16 * 4 * 4, 64))
    pal = DKMPalettizer(model, DKMPalettizerConfig(global_config=ModuleDKMPalettizerConfig(weight_threshold=100)))
    pal.prepare(inplace=True)
    bits = {name: fp.spec.n_bits for name, _, _, fp in fake_palettizers(model)}
    assert bits == {"0.weight": 2, "2.weight": 4}


def test_weight_threshold_and_report_lists_skipped():
    model = mlp()
    pal = DKMPalettizer(model, DKMPalettizerConfig(global_config=ModuleDKMPalettizerConfig(weight_threshold=640)))
    pal.prepare(inplace=True)
    names = [n for n, *_ in fake_palettizers(model)]
    assert names == ["0.weight"]  # 2.weight has exactly 640 elements: not more than the threshold
    assert "2.weight" in pal.report() and not pal.report()["2.weight"]["palettized"]


def test_milestone_delays_palettization():
    model = mlp()
    pal = DKMPalettizer(model, DKMPalettizerConfig(global_config=ModuleDKMPalettizerConfig(
        weight_threshold=100, milestone=3)))
    pal.prepare(inplace=True)
    fp = model[0].parametrizations.weight[0]
    assert not bool(fp.enabled)
    raw = model[0].parametrizations.weight.original
    assert torch.equal(model[0].weight, raw)
    for _ in range(3):
        pal.step()
    assert bool(fp.enabled)
    assert not torch.equal(model[0].weight, raw)


def test_precedence_name_type_global_and_regex_none():
    model = mlp()
    cfg = DKMPalettizerConfig(
        global_config=ModuleDKMPalettizerConfig(n_bits=4, weight_threshold=100),
        module_type_configs={"torch.nn.Linear": [ModuleDKMPalettizerConfig(n_bits=2, weight_threshold=100),
                                                 ModuleDKMPalettizerConfig(n_bits=3, weight_threshold=1000)]},
        module_name_configs={"2": ModuleDKMPalettizerConfig(n_bits=6, weight_threshold=100)},
    )
    pal = DKMPalettizer(model, cfg)
    pal.prepare(inplace=True)
    bits = {name: fp.spec.n_bits for name, _, _, fp in fake_palettizers(model)}
    assert bits == {"0.weight": 3, "2.weight": 6}
    model2 = mlp()
    DKMPalettizer(model2, DKMPalettizerConfig(global_config=ModuleDKMPalettizerConfig(weight_threshold=100),
                                              module_name_configs={r"[02]": None})).prepare(inplace=True)
    assert list(fake_palettizers(model2)) == []


def test_supported_modules_and_explicit_unsupported_error():
    torch.manual_seed(0)
    model = nn.ModuleDict({"emb": nn.Embedding(100, 32), "ln": nn.LayerNorm(4096), "conv1": nn.Conv1d(8, 16, 3),
                           "conv3": nn.Conv3d(4, 8, 3), "mha": nn.MultiheadAttention(32, 4), "bn": nn.BatchNorm1d(4096)})
    pal = DKMPalettizer(model, DKMPalettizerConfig(global_config=ModuleDKMPalettizerConfig(weight_threshold=300)))
    pal.prepare(inplace=True)
    names = {n for n, *_ in fake_palettizers(model)}
    assert {"emb.weight", "ln.weight", "conv1.weight", "conv3.weight", "mha.in_proj_weight",
            "mha.out_proj.weight"} <= names
    assert pal.report()["bn"]["reason"].startswith("unsupported")
    with pytest.raises(ValueError, match="bn.*cannot be palettized"):
        DKMPalettizer(model, DKMPalettizerConfig(module_name_configs={"bn": {"n_bits": 2}})).prepare()


def test_mha_forward_runs_palettized():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4)
    pal = DKMPalettizer(mha, DKMPalettizerConfig(global_config=ModuleDKMPalettizerConfig(weight_threshold=300)))
    m = pal.prepare()
    q = torch.randn(5, 2, 32)
    out, _ = m(q, q, q)
    out.sum().backward()
    assert m.parametrizations.in_proj_weight.original.grad is not None


# ----------------------------------------------------------------------------------------- fields


def lut_of(model, i=0):
    return model[i].parametrizations.weight[0].centroids.clone()


def test_cluster_dim_vectors_and_grouped_luts():
    model, pal = palettize({"n_bits": 2, "cluster_dim": 2, "granularity": "per_grouped_channel", "group_size": 16,
                            "weight_threshold": 700})
    assert lut_of(model).shape == (4, 4, 2)
    final = pal.finalize()
    w = final[0].weight.detach()
    for g in range(4):
        rows = w[16 * g:16 * (g + 1)].reshape(8, 2, 32).permute(0, 2, 1).reshape(-1, 2)
        assert torch.unique(rows, dim=0).shape[0] <= 4


def test_bad_sizes_raise_with_field_names():
    with pytest.raises(ValueError, match="cluster_dim=3 does not divide"):
        palettize({"cluster_dim": 3})
    with pytest.raises(ValueError, match="group_size=24 does not divide"):
        palettize({"granularity": "per_grouped_channel", "group_size": 24})


@pytest.mark.parametrize("kwargs,match", [
    ({"n_bits": 5}, "n_bits=5 is not allowed; allowed values: 1, 2, 3, 4, 6, 8"),
    ({"palett_mode": "soft"}, "palett_mode='soft'"),
    ({"kmeans_init": "random"}, "kmeans_init='random'"),
    ({"cluster_dtype": "i4"}, "cluster_dtype='i4'"),
    ({"palett_tau": 0.0}, "palett_tau=0.0 must be > 0"),
    ({"palett_max_mem": 2.0}, "palett_max_mem"),
    ({"granularity": "per_block"}, "granularity='per_block'"),
    ({"quant_min": -200}, "quant_min=-200"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)")):
        ModuleDKMPalettizerConfig(**kwargs)


def test_unknown_keys_named_and_round_trip():
    with pytest.raises(ValueError, match="'n_bitz' \\(did you mean 'n_bits'\\?\\)"):
        ModuleDKMPalettizerConfig.from_dict({"n_bitz": 2})
    cfg = DKMPalettizerConfig(
        global_config=ModuleDKMPalettizerConfig(n_bits=2, lut_dtype="int8", cluster_permute=(1, 0)),
        module_type_configs={nn.Conv2d: [{"n_bits": 4, "weight_threshold": 1000}, {"n_bits": 2}]},
        module_name_configs={"fc.*": None})
    data = cfg.as_dict()
    assert DKMPalettizerConfig.from_dict(data).as_dict() == data
    import yaml
    assert DKMPalettizerConfig.from_yaml(io.StringIO(yaml.safe_dump(data))).as_dict() == data


@pytest.mark.parametrize("lut_dtype", ["f16", "bf16", "i8", "u8", "fp8_e4m3", "fp8_e5m2"])
def test_lut_dtype_rounds_the_learned_lut(lut_dtype):
    model, pal = palettize({"n_bits": 4, "lut_dtype": lut_dtype})
    final = pal.finalize()
    record = records_of(final[0])["weight"]
    casts = {"f16": torch.float16, "bf16": torch.bfloat16, "fp8_e4m3": torch.float8_e4m3fn,
             "fp8_e5m2": torch.float8_e5m2}
    if lut_dtype in casts:
        assert torch.equal(record.lut.to(casts[lut_dtype]).float(), record.lut)
    else:
        assert record.lut_quant is not None and torch.equal(record.lut_quant.dequantize(), record.lut)
    assert not torch.equal(record.lut, lut_of(model).float()) or lut_dtype == "f16"


def test_per_channel_scale():
    model, pal = palettize({"n_bits": 2, "enable_per_channel_scale": True})
    record = records_of(pal.finalize()[0])["weight"]
    assert record.scale is not None and record.scale.shape == (64,)
    assert lut_of(model).abs().max() <= 1.0 + 1e-6  # clustering happened on max-abs normalised channels


def test_enforce_zero_and_extra_centroid():
    model, pal = palettize({"n_bits": 2, "enforce_zero": True})
    assert (lut_of(model) == 0).any()
    model2, pal2 = palettize({"n_bits": 2, "add_extra_centroid": True})
    lut = lut_of(model2)
    assert lut.shape[1] == 5 and lut[0, -1].item() == 0.0
    record = records_of(pal2.finalize()[0])["weight"]
    assert record.n_bits == 3 and record.to_dense().unique().numel() <= 5


def test_prune_threshold_zeroes_small_weights_with_enforce_zero():
    model, pal = palettize({"n_bits": 2, "prune_threshold": 0.05, "enforce_zero": True})
    raw = model[0].parametrizations.weight.original.detach()
    final = pal.finalize()
    assert (final[0].weight[raw.abs() <= 0.05] == 0).all()


def test_tau_controls_softness():
    torch.manual_seed(0)
    x = torch.randn(1, 500, 1) * 0.05
    c0 = torch.linspace(-0.1, 0.1, 4).reshape(1, 4, 1)
    soft, _ = dkm_reference(x, c0, DKMParams(tau=1e-2, max_iter=1))
    sharp, _ = dkm_reference(x, c0, DKMParams(tau=1e-8, max_iter=1))
    assert soft.unique().numel() > 100 and sharp.unique().numel() <= 4


def test_epsilon_stops_iterations_and_max_iter_counts():
    x = torch.randn(1, 500, 1) * 0.05
    c0 = torch.linspace(-0.1, 0.1, 4).reshape(1, 4, 1)
    one, _ = dkm_reference(x, c0, DKMParams(tau=1e-4, max_iter=1))
    early, _ = dkm_reference(x, c0, DKMParams(tau=1e-4, max_iter=5, epsilon=10.0))
    five, _ = dkm_reference(x, c0, DKMParams(tau=1e-4, max_iter=5, epsilon=0.0))
    assert torch.equal(one, early) and not torch.equal(one, five)


def test_lambda_damps_outliers():
    x = torch.cat([torch.randn(1, 500, 1) * 0.01, torch.full((1, 5, 1), 1.0)], dim=1)
    c0 = torch.tensor([[[-0.01], [0.01]]])
    _, plain = dkm_reference(x, c0, DKMParams(tau=1e-2, max_iter=1))
    _, damped = dkm_reference(x, c0, DKMParams(tau=1e-2, max_iter=1, lam=5.0))
    assert damped[0, 1, 0] < plain[0, 1, 0] * 0.5


def test_cluster_tol_splits_duplicates():
    model, _ = palettize({"n_bits": 2, "palett_cluster_tol": 0.05}, steps=1)
    fp = model[0].parametrizations.weight[0]
    fp.centroids[0, 1] = fp.centroids[0, 0]
    x = model[0].parametrizations.weight.original.detach().reshape(1, -1, 1)
    assert fp.split_duplicates(x) == 1 and fp.centroids[0, 1] != fp.centroids[0, 0]
    fp.settings = dataclasses.replace(fp.settings, palett_cluster_tol=0.0)
    fp.centroids[0, 1] = fp.centroids[0, 0]
    assert fp.split_duplicates(x) == 0


@pytest.mark.parametrize("init", ["auto", "opt1d", "uniform", "cpu.kmeans++", "kmeans++"])
def test_kmeans_init_choices(init):
    from dkm_palett.kmeans import kmeans_1d_exact
    model, _ = palettize({"n_bits": 2, "kmeans_init": init, "kmeans_opt1d_threshold": 1}, steps=0)
    fp = model[0].parametrizations.weight[0]
    raw = model[0].parametrizations.weight.original.detach()
    fp.initialize(raw.reshape(1, -1, 1))
    c = fp.centroids.flatten().sort()[0]
    if init == "uniform":
        assert torch.allclose(c, torch.linspace(raw.min().item(), raw.max().item(), 4), atol=1e-6)
    else:  # opt1d, and the kmeans++ family above kmeans_opt1d_threshold channels, give the exact 1-D optimum
        assert torch.allclose(c, kmeans_1d_exact(raw.flatten(), 4), atol=1e-6)
    assert bool(fp.initialized)


def test_gsm_and_hard_modes_train():
    for mode in ("gsm", "hard"):
        model, pal = palettize({"n_bits": 2, "palett_mode": mode})
        assert pal.finalize()[0].weight.unique().numel() <= 4


def test_quantize_activations_fake_quantizes_outputs():
    model, _ = palettize({"n_bits": 4, "quantize_activations": True, "quant_min": 0, "quant_max": 15,
                          "dtype": "quint8"})
    model.eval()
    out = model[0](torch.randn(16, 32))
    assert out.unique().numel() <= 16


def test_cluster_permute_moves_the_vector_axis():
    model, pal = palettize({"n_bits": 2, "cluster_dim": 2, "cluster_permute": (1, 0)})
    record = records_of(pal.finalize()[0])["weight"]
    assert record.axis == 1


def test_partition_size_gives_grouped_luts():
    model, _ = palettize({"n_bits": 2, "partition_size": 32 * 16, "weight_threshold": 700})
    assert lut_of(model).shape[0] == 4


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("extra", [{}, {"enable_per_channel_scale": True}, {"cluster_dim": 2}])
def test_non_finite_weights_raise_naming_module(bad, extra):
    """Before initialisation and on later steps, for scalar LUTs (checked by the range pass the grid shares, also
    after per-channel scaling) and vector LUTs (a sum)."""
    def prepared():
        model = mlp()
        cfg = ModuleDKMPalettizerConfig(weight_threshold=100, **extra)
        DKMPalettizer(model, DKMPalettizerConfig(global_config=cfg)).prepare(inplace=True)
        return model

    trained = prepared()
    trained(torch.randn(2, 32))
    for model in (trained, prepared()):  # a trained layer; a fresh one, before its k-means initialisation
        with torch.no_grad():
            model[0].parametrizations.weight.original[1, 3] = bad
        with pytest.raises(ValueError, match="0.weight holds 1 NaN/Inf"):
            model(torch.randn(2, 32))


def test_check_finite_fast_path_is_exact():
    """The check sums the weight first (one scalar): an overflowing sum of finite values must not raise, and an
    Inf of either sign, or a +Inf/-Inf pair whose sum is NaN, must."""
    from dkm_palett.validation import check_finite

    check_finite("w", torch.full((8,), 3e38))  # the sum overflows to Inf; every value is finite
    for bad, count in (([float("inf")], 1), ([float("-inf")], 1), ([float("inf"), float("-inf")], 2)):
        w = torch.zeros(8)
        w[:len(bad)] = torch.tensor(bad)
        with pytest.raises(ValueError, match=f"w holds {count} NaN/Inf"):
            check_finite("w", w)


def test_palett_max_mem_bounds_chunk_rows():
    from dkm_palett.dkm_math import chunk_rows
    assert chunk_rows(16, 1, 1e5) < chunk_rows(16, 1, 1e6) <= chunk_rows(16, 1, 1e8) == 16384
    assert chunk_rows(16, 1, 1e8, groups=64) == 256 and chunk_rows(16, 1, 1.0) == 64
    model, _ = palettize({"n_bits": 4, "dkm_impl": "dense", "palett_max_mem": 1e-9})
    assert bool(model[0].parametrizations.weight[0].initialized)


def test_binned_and_dense_training_agree():
    a, _ = palettize({"n_bits": 4, "dkm_impl": "dense"})
    b, _ = palettize({"n_bits": 4, "dkm_impl": "binned"})
    assert torch.allclose(lut_of(a), lut_of(b), atol=1e-4)


def test_palettizer_state_dict_round_trip():
    model, pal = palettize({"n_bits": 2, "milestone": 10})
    state = pal.state_dict()
    assert state == {"step_count": 3, "total_steps": None}
    pal2 = DKMPalettizer(model, pal.config)
    pal2.load_state_dict({"step_count": 10})
    assert bool(model[0].parametrizations.weight[0].enabled)
    assert isinstance(model[0].parametrizations.weight[0], FakePalettize)


def test_half_precision_weights_take_the_exact_binned_path_and_match_dense():
    outputs = {}
    for impl in ("auto", "dense"):
        torch.manual_seed(0)
        layer = nn.Sequential(nn.Linear(64, 96)).to(torch.bfloat16)
        # unweighted: the per-value bins take no sensitivity weights (the 2-bit default's would send it to "fused")
        pal = DKMPalettizer(layer, DKMPalettizerConfig(global_config=ModuleDKMPalettizerConfig(
            n_bits=2, weight_threshold=0, dkm_impl=impl, dkm_bins=1024, sensitivity_weighted=False)))
        pal.prepare(inplace=True)
        fp = layer[0].parametrizations.weight[0]
        original = layer[0].parametrizations.weight.original
        x, _ = fp._prepare_input(original)
        assert fp.engine(original, x, fp.centroids)[0] == ("binned" if impl == "auto" else "fused")
        assert fp._exact_dtype(original) == torch.bfloat16
        w = layer[0].weight
        (g,) = torch.autograd.grad((w.float() * torch.linspace(-1, 1, w.numel()).reshape(w.shape)).sum(), original)
        outputs[impl] = (w.detach().float(), g.float(), fp.centroids.clone())
    (wa, ga, ca), (wd, gd, cd) = outputs["auto"], outputs["dense"]
    assert torch.allclose(ca, cd, rtol=1e-5, atol=1e-7)
    assert (wa - wd).abs().max() <= 1e-2 * wd.abs().max()  # bf16 output rounding
    assert torch.allclose(ga, gd, rtol=2e-2, atol=1e-3 * gd.abs().max().item())
