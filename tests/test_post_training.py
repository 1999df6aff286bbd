"""palettize_weights (coremltools optimize.coreml style): modes, thresholds, granularity, config resolution, errors,
and MSE never worse than coremltools' PostTrainingPalettizer."""

from __future__ import annotations

import logging
import os

import pytest
import torch
from torch import nn

from dkm_palett import DKMPalettizer
from dkm_palett import kmeans as km
from dkm_palett.config.palettize_weights import OpPalettizerConfig, OptimizationConfig
from dkm_palett.kmeans import kmeans_1d_exact, kmeans_plus_plus
from dkm_palett.palettized_weight import palettized_tensors, records_of
from dkm_palett.post_training import cluster_weight, palettize_weights
from dkm_palett.spec import PalettizationSpec


def _model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32), nn.LayerNorm(32))


def _cfg(**kw) -> OptimizationConfig:
    kw.setdefault("nbits", 4)
    kw.setdefault("weight_threshold", 0)
    return OptimizationConfig(global_config=OpPalettizerConfig(**kw))


def _sse(x: torch.Tensor, c: torch.Tensor) -> float:
    c, _ = torch.sort(c.reshape(-1))
    idx = torch.bucketize(x, (c[1:] + c[:-1]) / 2)
    return float(((x.double() - c[idx].double()) ** 2).sum())


def test_kmeans_6bit_readme_example_and_records():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out, report = palettize_weights(model, OptimizationConfig(global_config=OpPalettizerConfig(
        mode="kmeans", nbits=6, weight_threshold=512)), return_report=True)
    assert out is not model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # original untouched
    assert not records_of(model[0])
    names = {name for name, *_ in palettized_tensors(out)}
    assert names == {"0.weight", "2.weight"}  # LayerNorm (32 elements) is below the threshold
    for name, module, param, record in palettized_tensors(out):
        weight = getattr(module, param)
        assert torch.equal(weight, record.to_dense())
        assert torch.unique(weight).numel() <= 64
        assert record.n_bits == 6 and record.indices.max() < 64
        assert report[name]["palettized"] and report[name]["rms_error"] > 0
    assert report["3.weight"]["palettized"] is False and "weight_threshold" in report["3.weight"]["reason"]
    assert "0.bias" not in names and "0.bias" not in report
    # plain state dict: same form as a DKM-finalized model
    assert set(out.state_dict()) == set(model.state_dict())


def test_weight_threshold_is_strictly_greater():
    layer = nn.Sequential(nn.Linear(16, 32))  # 512 elements
    out = palettize_weights(layer, _cfg(weight_threshold=512))
    assert not records_of(out[0])
    out = palettize_weights(layer, _cfg(weight_threshold=511))
    assert "weight" in records_of(out[0])


def test_inplace():
    model = _model()
    out = palettize_weights(model, _cfg(nbits=2), inplace=True)
    assert out is model and torch.unique(model[0].weight).numel() <= 4


def test_scalar_kmeans_is_exact_at_every_size():
    torch.manual_seed(0)
    x = torch.randn(3000) * 0.05
    exact = kmeans_1d_exact(x, 16)
    assert torch.equal(km.kmeans(x[:, None], 16)[:, 0], exact)
    assert torch.equal(km.kmeans(x[:, None], 16, torch.zeros(3000))[:, 0], exact)  # all-zero weights count as uniform
    # the LUT in a palettized weight reaches the optimal SSE
    record, _ = cluster_weight(x.reshape(30, 100), PalettizationSpec(n_bits=4))
    dense = record.to_dense().reshape(-1)
    assert float(((dense.double() - x.double()) ** 2).sum()) == pytest.approx(_sse(x, exact), rel=1e-6)
    # 2^20 distinct values x 256 clusters (far past the old exact-DP budget): still the exact solver, whose
    # optimum is a Lloyd fixed point and beats a k-means++ run on the same data
    big = torch.randn(1 << 20) * 0.05
    c = km.kmeans(big[:, None], 256)[:, 0]
    idx = torch.bucketize(big, (c[1:] + c[:-1]) / 2)
    means = torch.zeros(256, dtype=torch.float64).index_add_(0, idx, big.double()) / torch.bincount(idx, minlength=256)
    torch.testing.assert_close(c.double(), means, rtol=0, atol=1e-7)
    sub = big[:5000]
    pp = kmeans_plus_plus(sub[:, None], 32, generator=torch.Generator().manual_seed(0))[:, 0]
    assert _sse(sub, km.kmeans(sub[:, None], 32)[:, 0]) <= _sse(sub, pp)


@pytest.mark.parametrize("n_bits", [2, 4, 8])
def test_mse_never_worse_than_coremltools(n_bits):
    logging.disable(logging.WARNING)
    os.environ.setdefault("TQDM_DISABLE", "1")
    cpt = pytest.importorskip("coremltools.optimize.torch.palettization")
    torch.manual_seed(n_bits)
    model = nn.Sequential(nn.Linear(96, 128), nn.Linear(128, 64))
    with torch.no_grad():  # a heavy-tailed "trained-looking" layer and a uniform-init layer
        model[0].weight.copy_(0.02 * torch.randn(128, 96) / torch.randn(128, 96, 4).pow(2).mean(-1).sqrt())
    ours = palettize_weights(model, _cfg(nbits=n_bits))
    config = cpt.PostTrainingPalettizerConfig.from_dict({"global_config": {"n_bits": n_bits}})
    theirs = cpt.PostTrainingPalettizer(model, config).compress()
    for i in (0, 1):
        ref = model[i].weight.detach()
        mse_ours = float(((ours[i].weight.detach() - ref) ** 2).mean())
        mse_theirs = float(((theirs[i].weight.detach() - ref) ** 2).mean())
        assert mse_ours <= mse_theirs * (1 + 1e-6), (i, mse_ours, mse_theirs)


def test_uniform_mode_lut_is_evenly_spaced():
    model = _model()
    out = palettize_weights(model, _cfg(mode="uniform", nbits=3))
    record = records_of(out[0])["weight"]
    w = model[0].weight.detach()
    expected = torch.linspace(w.min().item(), w.max().item(), 8)
    assert torch.allclose(record.lut.reshape(-1), expected, atol=1e-7)


def test_unique_mode_exact_and_skips():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.Linear(64, 64))
    values = torch.tensor([-0.3, -0.1, 0.0, 0.2, 0.45])
    with torch.no_grad():
        model[0].weight.copy_(values[torch.randint(0, 5, (64, 32))])
    out, report = palettize_weights(model, OptimizationConfig(global_config=OpPalettizerConfig(
        mode="unique", weight_threshold=0)), return_report=True)
    record = records_of(out[0])["weight"]
    assert record.n_bits == 3  # 5 values -> smallest width holding them
    assert torch.equal(out[0].weight, model[0].weight)
    assert report["0.weight"]["rms_error"] == 0.0
    # layer 1 has 4096 distinct values: left untouched with a note
    assert torch.equal(out[1].weight, model[1].weight)
    assert report["1.weight"]["palettized"] is False and "distinct values" in report["1.weight"]["reason"]
    # a fixed nbits that cannot hold the values skips too
    out = palettize_weights(model, OptimizationConfig(global_config=OpPalettizerConfig(
        mode="unique", nbits=2, weight_threshold=0)))
    assert not records_of(out[0])


def test_per_grouped_channel_scale_and_int8_lut():
    model = _model()
    out = palettize_weights(model, _cfg(nbits=2, granularity="per_grouped_channel", group_size=16,
                                        enable_per_channel_scale=True, lut_dtype="int8"))
    record = records_of(out[0])["weight"]
    assert record.n_groups == 128 // 16 and record.lut.shape == (8, 4, 1)
    assert record.scale is not None and record.scale.shape == (128,)
    assert record.lut_quant is not None and record.lut_quant.q.dtype == torch.int8
    assert torch.allclose(out[0].weight, record.to_dense())
    # each group of 16 output channels uses at most 4 distinct scaled values
    scaled = out[0].weight.detach() / record.scale[:, None]
    assert torch.unique(scaled[:16].round(decimals=5)).numel() <= 4
    # coremltools spelling of the LUT dtype, torch dtype spelling
    assert OpPalettizerConfig(nbits=4, lut_dtype="uint8").lut_dtype == "u8"
    assert OpPalettizerConfig(nbits=4, lut_dtype=torch.int8).lut_dtype == "i8"


def test_grouped_error_names_the_weight():
    with pytest.raises(ValueError, match=r"2\.weight: group_size=64 does not divide the 32 channels"):
        palettize_weights(_model(), _cfg(granularity="per_grouped_channel", group_size=64))


def test_nan_weight_error_names_module():
    model = _model()
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"2\.weight \(Linear\).*NaN"):
        palettize_weights(model, _cfg())


def test_resolution_name_beats_type_beats_global():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.Linear(64, 64), nn.Conv2d(4, 8, 3), nn.Embedding(100, 16))
    config = OptimizationConfig(
        global_config=OpPalettizerConfig(nbits=2, weight_threshold=0),
        op_type_configs={"torch.nn.Linear": OpPalettizerConfig(nbits=4, weight_threshold=0),
                         nn.Embedding: None},
        op_name_configs={"1": OpPalettizerConfig(nbits=8, weight_threshold=0)},
    )
    out = palettize_weights(model, config)
    bits = {name: rec.n_bits for name, _, _, rec in palettized_tensors(out)}
    assert bits == {"0.weight": 4, "1.weight": 8, "2.weight": 2}
    # Core ML op aliases and regex names
    config = OptimizationConfig(op_type_configs={"conv": OpPalettizerConfig(nbits=3, weight_threshold=0)},
                                op_name_configs={r"[01]": OpPalettizerConfig(nbits=1, weight_threshold=0)})
    bits = {name: rec.n_bits for name, _, _, rec in palettized_tensors(palettize_weights(model, config))}
    assert bits == {"0.weight": 1, "1.weight": 1, "2.weight": 3}


def test_multihead_attention_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.MultiheadAttention(32, 4))
    out = palettize_weights(model, _cfg(nbits=3))
    names = {name for name, *_ in palettized_tensors(out)}
    assert names == {"0.in_proj_weight", "0.out_proj.weight"}
    x = torch.randn(5, 2, 32)
    y, _ = out[0](x, x, x)
    assert torch.isfinite(y).all()


def test_config_round_trip_and_yaml(tmp_path):
    config = OptimizationConfig(
        global_config=OpPalettizerConfig(nbits=6, weight_threshold=512),
        op_type_configs={nn.Linear: OpPalettizerConfig(mode="uniform", nbits=4), "conv": None},
        op_name_configs={"fc.*": OpPalettizerConfig(mode="unique")},
    )
    data = config.as_dict()
    assert data["op_type_configs"]["torch.nn.modules.linear.Linear"]["mode"] == "uniform"
    again = OptimizationConfig.from_dict(data)
    assert again == config and again.as_dict() == data
    path = tmp_path / "ptq.yaml"
    config.to_yaml(path)
    assert OptimizationConfig.from_yaml(path) == config
    text = """
config_type: OpPalettizerConfig
global_config: {mode: kmeans, nbits: 4, weight_threshold: 100}
op_name_configs:
  "0": null
"""
    loaded = OptimizationConfig.from_yaml(text)
    assert loaded.global_config.nbits == 4 and loaded.op_name_configs == {"0": None}


def test_config_errors():
    with pytest.raises(ValueError, match="nbits=5"):
        OpPalettizerConfig(nbits=5)
    with pytest.raises(ValueError, match="nbits is required"):
        OpPalettizerConfig(mode="kmeans")
    with pytest.raises(ValueError, match="mode='median'"):
        OpPalettizerConfig(mode="median", nbits=4)
    with pytest.raises(ValueError, match="granularity"):
        OpPalettizerConfig(nbits=4, granularity="per_channel")
    with pytest.raises(ValueError, match=r"'nbit'.*did you mean 'nbits'"):
        OpPalettizerConfig.from_dict({"nbit": 4})
    with pytest.raises(ValueError, match="op_type_config"):
        OptimizationConfig.from_dict({"global_config": None, "op_type_config": {}})
    with pytest.raises(ValueError, match="lut_dtype"):
        OpPalettizerConfig(nbits=4, lut_dtype="int4")
    with pytest.raises(ValueError, match="matches no module"):
        palettize_weights(_model(), OptimizationConfig(op_name_configs={"fc9": OpPalettizerConfig(nbits=4)}))
    with pytest.raises(ValueError, match="BatchNorm2d.*not supported"):
        palettize_weights(nn.Sequential(nn.BatchNorm2d(4)),
                          OptimizationConfig(op_type_configs={nn.BatchNorm2d: OpPalettizerConfig(nbits=4)}))
    with pytest.raises(TypeError, match="OptimizationConfig"):
        palettize_weights(_model(), "6 bits")


def test_vector_palettization_reproducible_under_seed():
    model = _model()
    config = _cfg(nbits=3, cluster_dim=2)
    torch.manual_seed(1)
    a = palettize_weights(model, config)
    torch.manual_seed(1)
    b = palettize_weights(model, config)
    assert torch.equal(a[0].weight, b[0].weight)
    record = records_of(a[0])["weight"]
    assert record.cluster_dim == 2 and record.lut.shape == (1, 8, 2)
    # pairs along the output-channel axis share one LUT entry
    w = a[0].weight.detach()
    pairs = torch.stack([w[0::2], w[1::2]], -1).reshape(-1, 2)
    assert torch.unique(pairs, dim=0).shape[0] <= 8


def test_one_row_schema_and_bytes_from_the_real_dtype():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64)).half()
    _, report = palettize_weights(model, _cfg(nbits=4, weight_threshold=0), return_report=True)
    row = report["0.weight"]
    assert row["float_bytes"] == 64 * 64 * 2  # fp16 weight: 2 bytes per element, not 4
    assert row["compressed_bytes"] == 64 * 64 * 4 // 8 + 16 * 4  # packed 4-bit indices + 16 float32 LUT entries
    assert row["compression_ratio"] == row["float_bytes"] / row["compressed_bytes"]
    dkm_model = nn.Sequential(nn.Linear(64, 64))
    palettizer = DKMPalettizer(dkm_model, {"global_config": {"n_bits": 4, "weight_threshold": 0}})
    palettizer.prepare(inplace=True)
    palettizer.finalize(inplace=True)
    dkm_row = palettizer.report()["0.weight"]
    assert set(row) - {"module_type", "mode"} == set(dkm_row) - {"enabled", "steps"}
    assert dkm_row["float_bytes"] == 64 * 64 * 4
