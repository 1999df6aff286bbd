"""Spec-style config API: defaults, presets, chaining, resolution order, YAML round trip, errors, KMeansPalettizer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dkm_palett.config.kmeans_palettizer import (
    KMeansPalettizerConfig,
    ModuleKMeansPalettizerConfig,
    OpKMeansPalettizerConfig,
)
from dkm_palett.palettized_weight import palettized_tensors, records_of
from dkm_palett.post_training import KMeansPalettizer
from dkm_palett.spec import (
    PalettizationSpec,
    PerGroupedChannelGranularity,
    PerTensorGranularity,
    QuantizationSpec,
    default_weight_palettization_spec,
)

SEED_YAML = """
kmeans_palettization_config:
  global_config:
    op_state_spec:
      weight:
        n_bits: 4
        granularity: { type: per_grouped_channel, axis: 0, group_size: 16 }
  module_type_configs:
    torch.nn.modules.linear.Linear:
      op_state_spec:
        weight:
          n_bits: 8
          granularity: { type: per_tensor }
"""


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)
        self.norm = nn.LayerNorm(16)

    def forward(self, x):
        return self.norm(self.fc2(torch.relu(self.fc1(x))))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 3)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.proj = nn.Linear(32, 16)
        self.block = Block()
        self.head = nn.Linear(16, 16)

    def forward(self, x):
        return self.head(self.block(self.proj(self.pool(self.conv(x)).flatten(1))))


def _net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def _bits(model: nn.Module) -> dict:
    return {name: (rec.n_bits, rec.n_groups) for name, _, _, rec in palettized_tensors(model)}


def test_defaults_are_equivalent():
    explicit = KMeansPalettizerConfig(global_config=ModuleKMeansPalettizerConfig(op_state_spec={
        "weight": default_weight_palettization_spec(), "in_proj_weight": default_weight_palettization_spec()}))
    assert KMeansPalettizerConfig() == KMeansPalettizerConfig(global_config=ModuleKMeansPalettizerConfig()) == explicit
    assert OpKMeansPalettizerConfig() == OpKMeansPalettizerConfig(op_state_spec={
        "weight": default_weight_palettization_spec(), "in_proj_weight": default_weight_palettization_spec()})
    spec = default_weight_palettization_spec()
    assert spec.n_bits == 4 and isinstance(spec.granularity, PerTensorGranularity) and spec.cluster_dim == 1


def test_default_prepare_palettizes_weights_not_biases():
    model = _net()
    out = KMeansPalettizer(model, KMeansPalettizerConfig()).prepare(torch.randn(1, 3, 8, 8))
    assert _bits(out) == {n: (4, 1) for n in
                          ("conv.weight", "proj.weight", "block.fc1.weight", "block.fc2.weight", "block.norm.weight",
                           "head.weight")}
    assert torch.unique(out.conv.weight).numel() <= 16
    assert torch.equal(out.conv.bias, model.conv.bias)
    assert not list(palettized_tensors(model))  # prepare works on a copy by default


def test_presets_and_chaining():
    config = KMeansPalettizerConfig.presets.w4()
    same = config.set_module_type(nn.Linear, ModuleKMeansPalettizerConfig.presets.w8())
    assert same is config
    chained = KMeansPalettizerConfig.presets.w4().set_module_type(nn.Linear, ModuleKMeansPalettizerConfig.presets.w8())
    assert chained == config
    w4 = config.global_config.op_state_spec["weight"]
    assert w4.n_bits == 4 and w4.granularity == PerGroupedChannelGranularity(axis=0, group_size=16)
    assert ModuleKMeansPalettizerConfig.presets.w2().op_state_spec["in_proj_weight"].granularity.group_size == 8
    # conv: 4-bit, 32 channels / 16 = 2 LUTs; linears: 8-bit per tensor; LayerNorm: 4-bit, 16/16 = 1 LUT
    out = KMeansPalettizer(_net(), config).prepare()
    bits = _bits(out)
    assert bits["conv.weight"] == (4, 2) and bits["block.norm.weight"] == (4, 1)
    assert bits["head.weight"] == bits["block.fc1.weight"] == (8, 1)
    # the seed YAML is the same config
    assert KMeansPalettizerConfig.from_yaml(SEED_YAML).as_dict()["module_type_configs"] == \
        {"torch.nn.modules.linear.Linear": {"op_state_spec": {"weight": PalettizationSpec(n_bits=8).as_dict()},
                                            "op_type_config": {}, "op_name_config": {}, "module_state_spec": {}}}


def test_type_configs_only_leave_other_modules_alone():
    config = KMeansPalettizerConfig(module_type_configs={
        "torch.nn.modules.linear.Linear": ModuleKMeansPalettizerConfig(
            op_state_spec={"weight": PalettizationSpec(n_bits=8)}),
        "torch.nn.modules.conv.Conv2d": ModuleKMeansPalettizerConfig(
            op_state_spec={"weight": PalettizationSpec(n_bits=4)}),
    })
    assert config.global_config is None
    bits = _bits(KMeansPalettizer(_net(), config).prepare())
    assert bits == {"conv.weight": (4, 1), "proj.weight": (8, 1), "block.fc1.weight": (8, 1),
                    "block.fc2.weight": (8, 1), "head.weight": (8, 1)}


def test_resolution_order_inside_a_scope():
    spec = PalettizationSpec
    block_cfg = ModuleKMeansPalettizerConfig(
        op_state_spec={"weight": spec(n_bits=1)},
        op_type_config={nn.Linear: OpKMeansPalettizerConfig(
            op_state_spec={"weight": spec(n_bits=2), "bias": spec(n_bits=2)})},
        op_name_config={"fc2": OpKMeansPalettizerConfig(op_state_spec={"weight": spec(n_bits=3)}), "norm": None},
    )
    global_cfg = ModuleKMeansPalettizerConfig(op_state_spec={"weight": spec(n_bits=8)})
    config = (KMeansPalettizerConfig(global_config=global_cfg)
              .set_module_type(Block, block_cfg)
              .set_module_name("head", ModuleKMeansPalettizerConfig(op_state_spec={"weight": spec(n_bits=6)},
                                                                    module_state_spec={"weight": spec(n_bits=4)})))
    bits = _bits(KMeansPalettizer(_net(), config).prepare())
    assert bits == {
        "conv.weight": (8, 1), "proj.weight": (8, 1),  # global
        "block.fc1.weight": (2, 1), "block.fc1.bias": (2, 1),  # op_type_config entry (lists bias too)
        "block.fc2.weight": (3, 1),  # op_name_config beats op_type_config; it lists no bias
        "head.weight": (4, 1),  # module_state_spec beats op_state_spec
    }
    # module name beats module type; None skips the scope
    config.set_module_name("block", None)
    assert not any(n.startswith("block.") for n in _bits(KMeansPalettizer(_net(), config).prepare()))


def test_multihead_attention():
    torch.manual_seed(0)
    model = nn.Sequential(nn.MultiheadAttention(32, 4))
    bits = _bits(KMeansPalettizer(model).prepare())
    assert bits == {"0.in_proj_weight": (4, 1), "0.out_proj.weight": (4, 1)}


def test_yaml_round_trip(tmp_path):
    config = KMeansPalettizerConfig.from_yaml(SEED_YAML)
    config.set_module_name("block.fc.*", ModuleKMeansPalettizerConfig(
        op_state_spec={"weight": PalettizationSpec(n_bits=2, cluster_dim=2, lut_qspec=QuantizationSpec(torch.int8))},
        op_name_config={"x": None}))
    text = config.to_yaml(tmp_path / "cfg.yaml")
    assert text.startswith("kmeans_palettization_config:")
    again = KMeansPalettizerConfig.from_yaml(tmp_path / "cfg.yaml")
    assert again.as_dict() == config.as_dict()
    assert again.module_name_configs["block.fc.*"].op_state_spec["weight"].lut_dtype == "i8"
    assert KMeansPalettizerConfig.from_dict(config.as_dict()).as_dict() == config.as_dict()
    assert KMeansPalettizerConfig.from_yaml("kmeans_palettization_config: {}\n") == KMeansPalettizerConfig()
    assert KMeansPalettizerConfig.from_dict({"global_config": None}).global_config is None


def test_config_errors():
    with pytest.raises(ValueError, match=r"'global_confg'.*did you mean 'global_config'"):
        KMeansPalettizerConfig.from_dict({"global_confg": {}})
    with pytest.raises(ValueError, match="op_state_specs"):
        ModuleKMeansPalettizerConfig.from_dict({"op_state_specs": {}})
    with pytest.raises(ValueError, match="n_bits=5"):
        KMeansPalettizerConfig.from_yaml("global_config:\n  op_state_spec:\n    weight: {n_bits: 5}\n")
    with pytest.raises(ValueError, match="granularity"):
        PalettizationSpec(granularity="per_row")
    with pytest.raises(ValueError, match="cannot be imported"):
        KMeansPalettizerConfig().set_module_type("torch.nn.Lineer", None)
    grouped = ModuleKMeansPalettizerConfig(op_state_spec={"weight": PalettizationSpec(
        granularity=PerGroupedChannelGranularity(group_size=32))})
    with pytest.raises(ValueError, match=r"proj\.weight: group_size=32 does not divide the 16 channels"):
        KMeansPalettizer(_net(), KMeansPalettizerConfig().set_module_name("proj", grouped)).prepare()
    with pytest.raises(ValueError, match=r"'pool'.*AdaptiveAvgPool2d.*supported module types"):
        KMeansPalettizer(_net(), KMeansPalettizerConfig().set_module_name(
            "pool", ModuleKMeansPalettizerConfig())).prepare()
    with pytest.raises(ValueError, match="BatchNorm2d.*supported module types"):
        KMeansPalettizer(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)),
                         KMeansPalettizerConfig().set_module_type(
                             nn.BatchNorm2d, ModuleKMeansPalettizerConfig())).prepare()
    with pytest.raises(ValueError, match="'blok' matches no module"):
        KMeansPalettizer(_net(), KMeansPalettizerConfig().set_module_name("blok", None)).prepare()
    with pytest.raises(ValueError, match="num_workers"):
        KMeansPalettizer(_net()).prepare(num_workers=0)


def test_scalar_deterministic_vector_seeded():
    model = _net()
    a = KMeansPalettizer(model).prepare()
    torch.manual_seed(123)
    b = KMeansPalettizer(model).prepare()
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    vec = KMeansPalettizerConfig(global_config=ModuleKMeansPalettizerConfig(
        op_state_spec={"weight": PalettizationSpec(n_bits=3, cluster_dim=2)}))
    torch.manual_seed(7)
    v1 = KMeansPalettizer(model, vec).prepare()
    torch.manual_seed(7)
    v2 = KMeansPalettizer(model, vec).prepare()
    assert torch.equal(v1.proj.weight, v2.proj.weight) and torch.equal(v1.conv.weight, v2.conv.weight)
    assert records_of(v1.proj)["weight"].lut.shape == (1, 8, 2)


def test_parallel_workers_match_sequential():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.Linear(64, 32), nn.Linear(32, 8))
    config = KMeansPalettizerConfig.presets.w2().set_module_name("2", ModuleKMeansPalettizerConfig())
    palettizer = KMeansPalettizer(model, config)
    seq = palettizer.prepare()
    par = palettizer.prepare(num_workers=2)
    assert all(torch.equal(x, y) for x, y in zip(seq.state_dict().values(), par.state_dict().values()))
    for (n1, _, _, r1), (n2, _, _, r2) in zip(palettized_tensors(seq), palettized_tensors(par)):
        assert n1 == n2 and torch.equal(r1.indices, r2.indices) and torch.equal(r1.lut, r2.lut)
    report = palettizer.report()
    assert report["0.weight"]["n_bits"] == 2 and report["0.weight"]["n_groups"] == 8
