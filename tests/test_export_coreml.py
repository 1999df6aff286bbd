"""Core ML export: the saved package holds exactly our LUTs/indices (read back via the MIL proto loader)."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import torch
from torch import nn

ct = pytest.importorskip("coremltools")

from dkm_palett import lut as lut_mod  # noqa: E402
from dkm_palett import palettized_weight as pw_mod  # noqa: E402
from dkm_palett.export import coreml as cm  # noqa: E402
from dkm_palett.spec import PalettizationSpec, PerGroupedChannelGranularity  # noqa: E402

logging.getLogger("coremltools").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", module="coremltools")


class LinearConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 16)
        self.head = nn.Linear(16, 4)
        self.example_input_array = torch.randn(2, 3, 4, 4)

    def forward(self, x):
        x = torch.relu(self.conv(x)).mean(dim=(2, 3))
        return self.head(torch.relu(self.fc(x)))


def _spec(**kw) -> PalettizationSpec:
    return PalettizationSpec(**kw)


def _palettize(module, param, spec, per_channel_scale=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = getattr(module, param).detach()
    groups = w.shape[spec.axis] // spec.group_size_for(tuple(w.shape))
    scale = lut_mod.channel_scale(w, spec.axis) if per_channel_scale else None
    spread = 1.0 if per_channel_scale else float(w.abs().max())
    lut = (torch.rand(groups, 2 ** spec.n_bits, spec.cluster_dim, generator=gen) * 2 - 1) * spread
    rec = lut_mod.palettize_with_lut(w, lut, spec, scale)
    pw_mod.attach(module, param, rec)
    return rec


def _model(spec, per_channel_scale=False, conv_spec=None) -> LinearConv:
    torch.manual_seed(0)
    model = LinearConv().eval()
    _palettize(model.fc, "weight", spec, per_channel_scale, seed=1)
    _palettize(model.conv, "weight", conv_spec or spec, per_channel_scale, seed=2)
    return model


def _entries(path) -> dict:
    return {e["name"]: e for e in cm.read_back_lut_weights(path)}


def _check_exact(model, path, expect_opset):
    entries = _entries(path)
    records = list(pw_mod.palettized_tensors(model))
    assert len(entries) == len(records)
    for name, _, _, rec in records:
        e = entries[name.replace(".", "_")]
        assert e["opset"] == expect_opset
        dense = rec.to_dense().detach().numpy()
        np.testing.assert_array_equal(e["dense"].astype(np.float32), dense)
        np.testing.assert_array_equal(e["indices"], rec.coreml_indices().numpy())
        lut = rec.lut.detach().numpy()
        if expect_opset == "iOS18":
            np.testing.assert_array_equal(e["lut"].astype(np.float32), rec.coreml_lut(torch.from_numpy(lut)).numpy())
        else:
            np.testing.assert_array_equal(e["lut"].astype(np.float32), lut.reshape(-1))
        if rec.cluster_dim > 1:
            assert e["vector_axis"] == rec.axis
        if rec.scale is not None:
            np.testing.assert_array_equal(e["per_channel_scale"].reshape(-1), rec.scale.numpy())
        else:
            assert e["per_channel_scale"] is None
    return entries


def _spec_version(path) -> int:
    return ct.utils.load_spec(str(path)).specificationVersion


def test_per_tensor_scalar_4bit_is_ios16_and_exact(tmp_path):
    model = _model(_spec(n_bits=4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    out = cm.export_coreml(model, path=tmp_path / "m.mlpackage")  # example_input_array is used
    assert out.is_dir() and _spec_version(out) == 7  # iOS16
    _check_exact(model, out, "iOS16")
    # the user's model is left as it was
    assert model.training and all(m.training for m in model.modules())
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert len(list(pw_mod.palettized_tensors(model))) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["m.mlpackage"]


def test_f16_lut_uses_fp16_precision_and_stays_exact(tmp_path):
    model = _model(_spec(n_bits=4, lut_dtype="f16"))
    out = cm.export_coreml(model, path=tmp_path / "m.mlpackage")
    entries = _check_exact(model, out, "iOS16")
    assert {e["dtype"] for e in entries.values()} == {"fp16"}
    assert all(e["lut_storage"].dtype == np.float16 for e in entries.values())


@pytest.mark.parametrize(
    "kw, pcs",
    [
        (dict(n_bits=2, granularity=PerGroupedChannelGranularity(axis=0, group_size=4)), False),
        (dict(n_bits=2, cluster_dim=2), False),
        (dict(n_bits=4), True),
        (dict(n_bits=4, lut_dtype="i8"), False),
        (dict(n_bits=3, lut_dtype="u8", cluster_dim=2,
              granularity=PerGroupedChannelGranularity(axis=0, group_size=4)), True),
    ],
    ids=["grouped", "vector2", "per_channel_scale", "int8_lut", "u8_grouped_vector_scale_3bit"],
)
def test_ios18_features_are_exact(tmp_path, kw, pcs):
    model = _model(_spec(**kw), per_channel_scale=pcs)
    out = cm.export_coreml(model, path=tmp_path / "m.mlpackage")
    assert _spec_version(out) == 9  # iOS18
    entries = _check_exact(model, out, "iOS18")
    if kw.get("lut_dtype") in ("i8", "u8"):
        int_dtype = np.int8 if kw["lut_dtype"] == "i8" else np.uint8
        for name, _, _, rec in pw_mod.palettized_tensors(model):
            e = entries[name.replace(".", "_")]
            assert e["lut_storage"].dtype == int_dtype
            np.testing.assert_array_equal(e["lut_storage"], rec.coreml_lut(rec.lut_quant.q).numpy())
            np.testing.assert_array_equal(e["lut_scale"].reshape(-1), rec.lut_quant.scale.numpy())


def test_bf16_and_fp8_luts_export_as_fp16_when_exact(tmp_path):
    model = _model(_spec(n_bits=2, lut_dtype="bf16"), conv_spec=_spec(n_bits=2, lut_dtype="fp8_e4m3"))
    out = cm.export_coreml(model, path=tmp_path / "m.mlpackage")
    entries = _check_exact(model, out, "iOS16")
    assert all(e["lut_storage"].dtype == np.float16 for e in entries.values())


def test_bf16_lut_not_representable_in_fp16_is_refused(tmp_path):
    model = _model(_spec(n_bits=2))
    rec = pw_mod.records_of(model.fc)["weight"]
    rec.lut_dtype = "bf16"
    rec.lut = torch.tensor([1e20, 1.0, -1.0, 2.0]).bfloat16().float().reshape(1, 4, 1)
    pw_mod.attach(model.fc, "weight", rec)  # a record is a view: put the edited one back
    with pytest.raises(ValueError, match=r"fc\.weight.*bf16.*float16"):
        cm.export_coreml(model, path=tmp_path / "m.mlpackage")
    assert not any(tmp_path.iterdir())


def test_too_low_target_raises_before_conversion(tmp_path, monkeypatch):
    model = _model(_spec(n_bits=2, granularity=PerGroupedChannelGranularity(axis=0, group_size=4)))
    monkeypatch.setattr(cm, "_convert_stage1", lambda *a, **k: pytest.fail("conversion must not start"))
    with pytest.raises(ValueError, match=r"grouped LUT.*iOS18"):
        cm.export_coreml(model, path=tmp_path / "m.mlpackage", minimum_deployment_target=ct.target.iOS17)
    with pytest.raises(ValueError, match=r"iOS16"):
        cm.export_coreml(_model(_spec(n_bits=4)), path=tmp_path / "m.mlpackage", minimum_deployment_target="iOS15")
    assert not any(tmp_path.iterdir())


def test_explicit_higher_target_is_kept(tmp_path):
    model = _model(_spec(n_bits=4))
    out = cm.export_coreml(model, path=tmp_path / "m.mlpackage", minimum_deployment_target="macOS15")
    assert _spec_version(out) == 9
    _check_exact(model, out, "iOS18")


def test_missing_example_inputs_and_bad_arguments(tmp_path):
    model = _model(_spec(n_bits=4))
    del model.example_input_array
    with pytest.raises(ValueError, match="example_input_array"):
        cm.export_coreml(model, path=tmp_path / "m.mlpackage")
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match=r"\.mlpackage"):
        cm.export_coreml(model, x, path=tmp_path / "m.mlmodel")
    with pytest.raises(ValueError, match="trace"):
        cm.export_coreml(model, x, path=tmp_path / "m.mlpackage", trace="fx")
    with pytest.raises(ValueError, match="minimum_deployment_target"):
        cm.export_coreml(model, x, path=tmp_path / "m.mlpackage", minimum_deployment_target="iOS99")
    with pytest.raises(TypeError, match="example_inputs"):
        cm.export_coreml(model, {"x": x}, path=tmp_path / "m.mlpackage")


def test_unsupported_bit_width_is_refused(tmp_path):
    model = _model(_spec(n_bits=4))
    rec = pw_mod.records_of(model.fc)["weight"]
    rec.n_bits = 5
    rec.lut = torch.zeros(1, 32, 1)
    pw_mod.attach(model.fc, "weight", rec)
    with pytest.raises(ValueError, match=r"5-bit.*1, 2, 3, 4, 6, 8"):
        cm.export_coreml(model, path=tmp_path / "m.mlpackage")


def test_failed_conversion_leaves_nothing_and_keeps_old_package(tmp_path, monkeypatch):
    target = tmp_path / "m.mlpackage"
    model = _model(_spec(n_bits=4))
    cm.export_coreml(model, path=target)
    old = sorted(p.relative_to(target) for p in target.rglob("*"))

    class Broken(LinearConv):
        def forward(self, x):
            raise RuntimeError("boom in forward")

    broken = Broken().eval()
    _palettize(broken.fc, "weight", _spec(n_bits=4))
    with pytest.raises(RuntimeError, match="boom"):
        cm.export_coreml(broken, path=target)

    def bad_save(self, path):  # write part of a package, then fail
        (__import__("pathlib").Path(path) / "partial").mkdir(parents=True)
        raise OSError("disk full")

    monkeypatch.setattr(ct.models.MLModel, "save", bad_save)
    with pytest.raises(OSError, match="disk full"):
        cm.export_coreml(model, path=target)
    assert [p.name for p in tmp_path.iterdir()] == ["m.mlpackage"]
    assert sorted(p.relative_to(target) for p in target.rglob("*")) == old
    # buffers added for conversion were removed even though it failed
    assert not any("_COREML_" in k for k in broken.state_dict())


def test_fp16_precision_with_f32_lut_warns(tmp_path):
    model = _model(_spec(n_bits=4))
    with pytest.warns(UserWarning, match="rounds the float32 LUTs"):
        out = cm.export_coreml(model, path=tmp_path / "m.mlpackage", compute_precision="float16")
    for name, _, _, rec in pw_mod.palettized_tensors(model):
        e = _entries(out)[name.replace(".", "_")]
        np.testing.assert_array_equal(e["lut"], rec.lut.detach().numpy().reshape(-1).astype(np.float16))
        np.testing.assert_array_equal(e["indices"], rec.coreml_indices().numpy())


def test_torch_export_trace(tmp_path):
    model = _model(_spec(n_bits=2, cluster_dim=2), per_channel_scale=True)
    out = cm.export_coreml(model, path=tmp_path / "m.mlpackage", trace="torch_export")
    _check_exact(model, out, "iOS18")


class EmbedAttn(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 4)

    def forward(self, ids):
        x = self.emb(ids)
        x, _ = self.attn(x, x, x, need_weights=False)
        return self.fc(x)


def test_embedding_and_attention_in_proj_via_torch_export(tmp_path):
    torch.manual_seed(0)
    model = EmbedAttn().eval()
    spec = _spec(n_bits=4, lut_dtype="f16")
    for module, param in [(model.emb, "weight"), (model.attn, "in_proj_weight"), (model.fc, "weight")]:
        _palettize(module, param, spec)
    ids = torch.randint(0, 16, (2, 5))
    out = cm.export_coreml(model, ids, path=tmp_path / "m.mlpackage", trace="torch_export")
    _check_exact(model, out, "iOS16")
