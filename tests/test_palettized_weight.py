"""A finalized weight is a PalettizedWeight: its record (LUT, uint8 indices, scale, integer LUT) survives state_dict,
torch.save/load(weights_only=True), load_state_dict into a fresh finalized or plain module, deepcopy and .to()."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from dkm_palett import (DKMPalettizer, DKMPalettizerConfig, FakePalettize, ModuleDKMPalettizerConfig,
                        OpPalettizerConfig, OptimizationConfig, palettize_weights)
from dkm_palett.layer_settings import DKMLayerSettings
from dkm_palett.palettized_weight import PalettizedWeight, make_dense, palettized_tensors, records_of
from dkm_palett.spec import PalettizationSpec


def net(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 32), nn.ReLU(),
                         nn.Linear(32, 10))


X = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(7))
CONFIG = DKMPalettizerConfig(global_config=ModuleDKMPalettizerConfig(n_bits=3, weight_threshold=100),
                             module_name_configs={"3": ModuleDKMPalettizerConfig(
                                 n_bits=2, weight_threshold=100, granularity="per_grouped_channel", group_size=8,
                                 enable_per_channel_scale=True, lut_dtype="i8")})


def dkm_finalized(seed: int, steps: int) -> nn.Module:
    """A model prepared with CONFIG, trained ``steps`` steps, finalized."""
    model = net(seed)
    pal = DKMPalettizer(model, CONFIG)
    pal.prepare(inplace=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    y = torch.randint(0, 10, (4,), generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(X), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        pal.step()
    return pal.finalize(inplace=True)


def records(model: nn.Module) -> dict:
    return {name: rec for name, _, _, rec in palettized_tensors(model)}


def assert_same_model(a: nn.Module, b: nn.Module) -> None:
    ra, rb = records(a), records(b)
    assert sorted(ra) == sorted(rb) == ["0.weight", "3.weight", "5.weight"]
    for name in ra:
        assert ra[name] == rb[name], name
    a.eval(), b.eval()
    with torch.no_grad():
        assert torch.equal(a(X), b(X))


def test_dkm_state_dict_round_trip_into_a_fresh_finalized_module_is_exact(tmp_path):
    trained = dkm_finalized(seed=0, steps=3)
    assert all(isinstance(m.weight, PalettizedWeight) for m in (trained[0], trained[3], trained[5]))
    rec = records(trained)["3.weight"]
    assert rec.lut_quant is not None and rec.scale is not None and rec.n_groups == 4  # every record field in play
    torch.save(trained.state_dict(), tmp_path / "model.pt")

    fresh = dkm_finalized(seed=1, steps=0)  # same architecture and config, other weights and LUTs
    assert records(fresh)["3.weight"] != rec
    fresh.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    assert_same_model(trained, fresh)


def test_palettized_state_dict_loads_into_a_plain_module_with_its_records():
    """What Lightning's ddp_spawn does with the workers' weights: load_state_dict(strict=False) into the main
    process's unprepared module."""
    trained = dkm_finalized(seed=0, steps=2)
    plain = net(seed=2)
    weight = plain[3].weight
    plain.load_state_dict(trained.state_dict(), strict=False)
    assert plain[3].weight is weight and isinstance(weight, PalettizedWeight)  # the same parameter object
    assert isinstance(weight, nn.Parameter) and not weight.requires_grad
    assert_same_model(trained, plain)


def test_dense_state_dict_into_a_finalized_module_gives_a_plain_weight():
    finalized, dense = dkm_finalized(seed=0, steps=1), net(seed=3)
    finalized.load_state_dict(dense.state_dict())
    assert not list(palettized_tensors(finalized))
    assert type(finalized[3].weight) is nn.Parameter and finalized[3].weight.requires_grad
    assert torch.equal(finalized(X), dense(X))


def test_post_training_records_survive_state_dict_and_deepcopy(tmp_path):
    config = OptimizationConfig(global_config=OpPalettizerConfig(
        nbits=4, granularity="per_grouped_channel", group_size=2, cluster_dim=2, weight_threshold=100))
    out = palettize_weights(net(seed=0), config)
    assert {rec.cluster_dim for rec in records(out).values()} == {2}
    torch.save(out.state_dict(), tmp_path / "pt.pt")
    loaded = net(seed=5)
    loaded.load_state_dict(torch.load(tmp_path / "pt.pt", weights_only=True))
    assert_same_model(out, loaded)
    assert_same_model(out, copy.deepcopy(out))


def test_memory_holds_uint8_indices_and_ops_read_the_dense_weight():
    model = dkm_finalized(seed=0, steps=1)
    weight = model[3].weight
    rec = weight.record
    inner = [getattr(weight, n) for n in weight.__tensor_flatten__()[0]]
    assert weight.indices.dtype == torch.uint8 and weight.indices.numel() == weight.numel()
    assert sum(t.numel() * t.element_size() for t in inner) < weight.numel() * 4 / 3
    dense = rec.to_dense()
    assert torch.equal(weight.dequantize(), dense) and torch.equal(weight * 1, dense)
    assert torch.equal(model[3](torch.ones(2, 288)), nn.functional.linear(torch.ones(2, 288), dense, model[3].bias))
    half = copy.deepcopy(model).half()
    assert isinstance(half[3].weight, PalettizedWeight) and half[3].weight.dtype == torch.float16
    assert torch.equal(half[3].weight.dequantize(), dense.half())


def test_finalized_weight_is_read_only_and_layouts_must_match():
    model = dkm_finalized(seed=0, steps=1)
    with pytest.raises(TypeError, match="read-only"):
        model[3].weight.mul_(2)
    other = palettize_weights(net(seed=0), OptimizationConfig(global_config=OpPalettizerConfig(
        nbits=2, weight_threshold=100)))
    with pytest.raises(RuntimeError, match=r'copying the parameter named "3.weight".*palettized layouts differ'):
        model.load_state_dict(other.state_dict())  # torch reports the ValueError of each weight


def test_make_dense_and_prepare_again_train_the_finalized_values():
    model = dkm_finalized(seed=0, steps=1)
    dense = model[3].weight.dequantize()
    record = make_dense(model[3], "weight")
    assert record is not None and type(model[3].weight) is nn.Parameter and model[3].weight.requires_grad
    assert torch.equal(model[3].weight, dense) and make_dense(model[3], "weight") is None
    pal = DKMPalettizer(model, CONFIG)
    assert pal.forget_records() == 2 and not pal.records()  # 0.weight and 5.weight
    pal.prepare(inplace=True)
    assert sorted(name for name, *_ in palettized_tensors(model)) == []
    assert torch.equal(model[3].parametrizations.weight.original, dense)


# ----------------------------------------------------------------------------------------- DKMLayerSettings


def test_layer_reads_frozen_settings_built_at_prepare():
    cfg = ModuleDKMPalettizerConfig(n_bits=2, weight_threshold=100, palett_tau=3e-4, milestone=2)
    pal = DKMPalettizer(net(seed=0), DKMPalettizerConfig(global_config=cfg))
    model = pal.prepare()
    fp = model[3].parametrizations.weight[0]
    assert fp.settings == DKMLayerSettings.from_config(cfg) and not hasattr(fp, "config")
    assert fp.params().tau == 3e-4
    with pytest.raises(dataclasses.FrozenInstanceError):
        fp.settings.palett_tau = 1.0
    cfg.palett_tau = 1.0  # the user's config is no longer read by the layer
    assert fp.params().tau == 3e-4
    with pytest.raises(TypeError, match="DKMLayerSettings"):
        FakePalettize(PalettizationSpec(n_bits=2), cfg, (8, 8))


def test_settings_fields_are_config_fields_and_take_the_configs_defaults():
    defaults = ModuleDKMPalettizerConfig()
    settings = DKMLayerSettings.from_config(defaults)
    for field in dataclasses.fields(DKMLayerSettings):
        assert field.default is dataclasses.MISSING, f"{field.name}: the config holds the defaults, not the settings"
        assert getattr(settings, field.name) == getattr(defaults, field.name), field.name
    with pytest.raises(TypeError, match="ModuleDKMPalettizerConfig"):
        DKMLayerSettings.from_config({"n_bits": 2})


class TinyDecoder(nn.Module):
    """Embedding, a position table read by slicing, attention (its weights read inside F.multi_head_attention_forward)
    and a head: every way a module reads a weight besides F.linear/conv."""

    def __init__(self):
        super().__init__()
        self.tok, self.pos = nn.Embedding(50, 16), nn.Embedding(20, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(16, 50)

    def forward(self, ids):
        x = self.tok(ids) + self.pos.weight[:ids.shape[1]].unsqueeze(0)
        return self.head(self.encoder(x))


def test_every_read_of_a_palettized_weight_matches_its_dense_model_also_in_inference_mode(monkeypatch):
    monkeypatch.setattr(torch.backends.mha, "get_fastpath_enabled", lambda: False)  # the same attention kernels
    torch.manual_seed(0)
    config = OptimizationConfig(global_config=OpPalettizerConfig(nbits=4, weight_threshold=0))
    model = palettize_weights(TinyDecoder(), config).eval()
    assert isinstance(model.encoder.layers[0].self_attn.in_proj_weight, PalettizedWeight)
    ids = torch.randint(0, 50, (2, 10))
    dense = copy.deepcopy(model)
    for _, module, param_name, record in list(palettized_tensors(dense)):
        # frozen like the palettized weight: on some CPUs torch's attention takes another kernel path (float
        # rounding differs by ~2e-7) when its weights require grad, even under no_grad
        setattr(module, param_name, nn.Parameter(record.to_dense(), requires_grad=False))
    with torch.no_grad():
        expected = dense(ids)
        assert torch.equal(model(ids), expected)
    with torch.inference_mode():  # Lightning's validate/test/predict
        assert torch.equal(model(ids), expected)
