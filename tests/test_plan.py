"""The planning layer behind the three front doors: one PlannedWeight list, shared resolution and validation."""

import pytest
import torch
from torch import nn

from dkm_palett import (
    DKMPalettizer,
    DKMPalettizerConfig,
    KMeansPalettizer,
    KMeansPalettizerConfig,
    ModuleDKMPalettizerConfig,
    ModuleKMeansPalettizerConfig,
    OpPalettizerConfig,
    OptimizationConfig,
    SensitiveKMeansPalettizer,
    palettize_weights,
)
from dkm_palett.palettized_weight import palettized_tensors
from dkm_palett.palettizer import fake_palettizers
from dkm_palett.plan import PlannedWeight
from dkm_palett.recipes.config import check_layers
from dkm_palett.spec import PalettizationSpec, PerGroupedChannelGranularity


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 64)
        self.norm = nn.BatchNorm1d(64)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), Block(), nn.Linear(64, 16), nn.Conv2d(4, 8, 3))


def _doors(n_bits: int = 4, group_size: int = 8) -> dict:
    """The same intent in the three front doors: ``n_bits``, one LUT per ``group_size`` output channels on every
    weight, except module ``3`` (left alone)."""
    spec = PalettizationSpec(n_bits=n_bits, granularity=PerGroupedChannelGranularity(axis=0, group_size=group_size))
    return {
        "dkm": DKMPalettizerConfig(global_config=ModuleDKMPalettizerConfig(
            n_bits=n_bits, weight_threshold=0, granularity="per_grouped_channel", group_size=group_size),
            module_name_configs={"3": None}),
        "coreml": OptimizationConfig(global_config=OpPalettizerConfig(
            nbits=n_bits, weight_threshold=0, granularity="per_grouped_channel", group_size=group_size))
        .set_op_name("3", None),
        "kmeans": KMeansPalettizerConfig(global_config=ModuleKMeansPalettizerConfig(op_state_spec={"weight": spec}))
        .set_module_name("3", None),
    }


def _selected(planned: list[PlannedWeight]) -> dict:
    return {p.name: p.spec for p in planned if p.selected}


def test_three_front_doors_plan_the_same_weights():
    plans = {door: _selected(cfg.plan(_model())) for door, cfg in _doors().items()}
    assert set(plans["dkm"]) == {"0.weight", "2.fc.weight", "4.weight"}
    assert plans["dkm"] == plans["coreml"] == plans["kmeans"]
    assert all(s.n_bits == 4 and s.granularity.group_size == 8 for s in plans["dkm"].values())


def test_every_consumer_palettizes_what_the_plan_selects():
    doors = _doors(n_bits=2)
    expected = set(_selected(doors["dkm"].plan(_model())))
    pal = DKMPalettizer(_model(), doors["dkm"])
    pal.prepare(inplace=True)
    assert {n for n, *_ in fake_palettizers(pal.model)} == expected
    assert set(check_layers(_model(), doors["dkm"])) == expected
    assert {n for n, *_ in palettized_tensors(palettize_weights(_model(), doors["coreml"]))} == expected
    assert {n for n, *_ in palettized_tensors(KMeansPalettizer(_model(), doors["kmeans"]).prepare())} == expected
    batches = [(torch.randn(4, 32),)]
    for config in (doors["coreml"], doors["kmeans"]):
        sensitive = SensitiveKMeansPalettizer(_model(), config)
        out = sensitive.compress(batches, lambda m, b: m[0](b[0]).pow(2).mean())
        assert set(sensitive.sensitivities) == expected
        assert {n for n, *_ in palettized_tensors(out)} == expected


def test_skipped_weights_keep_their_reasons():
    dkm = DKMPalettizerConfig(global_config=ModuleDKMPalettizerConfig(weight_threshold=2048)).plan(_model())
    reasons = {p.name: p.reason for p in dkm if not p.selected}
    assert reasons == {"0.weight": "2048 elements <= weight_threshold=2048", "2.norm": "unsupported module type BatchNorm1d",
                       "3.weight": "1024 elements <= weight_threshold=2048", "4.weight": "288 elements <= weight_threshold=2048"}
    assert all(p.spec is None for p in dkm if not p.selected)
    coreml = _doors()["coreml"].plan(_model())
    assert {p.name: p.reason for p in coreml if not p.selected} == {"3.weight": "no config applies (None)"}
    _, report = palettize_weights(_model(), _doors()["coreml"], return_report=True)
    assert report["3.weight"]["reason"] == "no config applies (None)"


@pytest.mark.parametrize("door", ["dkm", "coreml", "kmeans"])
def test_explicit_unsupported_target_names_it(door):
    config = _doors()[door]
    entry = config.global_config
    with pytest.raises(ValueError, match=r"\['2\.norm'\] names module '2\.norm' \(BatchNorm1d\), which is not supported"):
        type(config)(global_config=entry).set_module_name("2.norm", entry).plan(_model())
    with pytest.raises(ValueError, match=r"names torch\.nn\.modules\.batchnorm\.BatchNorm1d, which is not supported"):
        type(config)(global_config=entry).set_module_type(nn.BatchNorm1d, entry).plan(_model())
    # None entries only skip, so they may name anything
    type(config)(global_config=entry).set_module_name("2.norm", None).set_module_type(nn.BatchNorm1d, None).plan(
        _model())


def test_a_scope_or_a_parameter_is_an_explicit_target_where_the_door_allows_it():
    entry = _doors()["kmeans"].global_config
    planned = KMeansPalettizerConfig().set_module_name("2", entry).plan(_model())  # a Block holds a Linear
    assert "2.fc.weight" in _selected(planned)
    planned = OptimizationConfig().set_op_name("2.fc.weight", OpPalettizerConfig(nbits=2, weight_threshold=0)).plan(
        _model())
    assert set(_selected(planned)) == {"2.fc.weight"}
    with pytest.raises(ValueError, match=r"'2' \(Block\), which is not supported"):
        DKMPalettizerConfig().set_module_name("2", ModuleDKMPalettizerConfig()).plan(_model())


def test_name_keys_that_match_nothing():
    with pytest.raises(ValueError, match="op_name_configs key 'fc9' matches no module"):
        OptimizationConfig().set_op_name("fc9", None).plan(_model())
    with pytest.raises(ValueError, match="module_name_configs key 'fc9' matches no module"):
        KMeansPalettizerConfig().set_module_name("fc9", None).plan(_model())
    # DKM configs may name modules a model does not have (one config, several models)
    assert _selected(DKMPalettizerConfig().set_module_name("fc9", ModuleDKMPalettizerConfig()).plan(_model()))


@pytest.mark.parametrize("door", ["dkm", "coreml", "kmeans"])
def test_model_config_round_trip_and_setters(door, tmp_path):
    config = _doors()[door]
    config.set_module_type("torch.nn.Conv2d", None)
    text = config.to_yaml(tmp_path / "config.yaml")
    again = type(config).from_yaml(tmp_path / "config.yaml")
    assert again.to_yaml() == text and again.as_dict() == config.as_dict()
    assert nn.Conv2d in again.type_configs and again.name_configs == {"3": None}
    assert type(config).from_yaml(text.replace("'3'", "3")).name_configs == {"3": None}  # YAML reads 3 as an int
    with pytest.raises(TypeError, match="key must be str"):
        config.set_module_name(("3",), None)
