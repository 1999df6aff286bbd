"""plan_bits: mixed bit widths under a size budget (LUTs included), ranked by sensitivity; the Hydra option
``palettization.average_bits``."""

import pytest
import torch
from torch import nn

from dkm_palett import DKMPalettizer, DKMPalettizerConfig, ModuleDKMPalettizerConfig, palettized_tensors
from dkm_palett.mixed_bits import plan_bits


class TwoBranches(nn.Module):
    """``out = a(x) + gain * b(x)``: two same-shaped layers, ``b``'s weights matter ``gain**2`` times as much."""

    def __init__(self, gain: float):
        super().__init__()
        self.a = nn.Linear(64, 64)
        self.b = nn.Linear(64, 64)
        self.gain = gain

    def forward(self, x):
        return self.a(x) + self.gain * self.b(x)


def _data(batches=4):
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(32, 64, generator=gen), torch.randint(0, 64, (32,), generator=gen)) for _ in range(batches)]


def _model(gain):
    torch.manual_seed(0)
    return TwoBranches(gain)


def _config():
    return DKMPalettizerConfig(global_config=ModuleDKMPalettizerConfig(n_bits=2, weight_threshold=1024))


def _finalized_bits(model, config):
    """``(storage bits of every finalized record, palettized elements, {name: n_bits})``."""
    palettizer = DKMPalettizer(model, config)
    palettizer.prepare()
    final = palettizer.finalize()
    records = {name: record for name, _, _, record in palettized_tensors(final)}
    return (sum(r.storage_bits() for r in records.values()), sum(r.numel for r in records.values()),
            {name: r.n_bits for name, r in records.items()})


@pytest.mark.parametrize("gain, sensitive, other", [(10.0, "b", "a"), (0.1, "a", "b")])
def test_plan_spends_the_budget_on_the_sensitive_layer(gain, sensitive, other):
    """Budget for one layer at 3 bits and one at 2 (LUTs included): the layer the loss is more sensitive to gets 3,
    whichever it is; the finalized records meet the budget."""
    model = _model(gain)
    plan = plan_bits(model, _data(), average_bits=2.55, config=_config(), bits=(2, 3, 4))
    assert {k: v.n_bits for k, v in plan.module_name_configs.items()} == {sensitive: 3, other: 2}
    assert plan.module_name_configs[sensitive].weight_threshold == 1024  # the base config's other fields stay
    storage, elements, bits = _finalized_bits(model, plan)
    assert bits == {f"{sensitive}.weight": 3, f"{other}.weight": 2}
    assert storage <= 2.55 * elements


def test_plan_counts_the_luts_in_the_budget():
    """Uniform 2 bits takes 2 bits per element plus the LUTs: average_bits=2 does not fit, and a budget just below
    the next upgrade keeps everything at 2 bits."""
    model = _model(1.0)
    with pytest.raises(ValueError, match="average_bits=2 is below"):
        plan_bits(model, _data(), average_bits=2.0, config=_config())
    plan = plan_bits(model, _data(), average_bits=2.05, config=_config(), bits=(2, 3))
    assert {v.n_bits for v in plan.module_name_configs.values()} == {2}
    storage, elements, _ = _finalized_bits(model, plan)
    assert 2.0 * elements < storage <= 2.05 * elements


def test_plan_with_a_large_budget_takes_the_widest_bits():
    plan = plan_bits(_model(1.0), _data(), average_bits=9.0, config=_config(), bits=(2, 4))
    assert {v.n_bits for v in plan.module_name_configs.values()} == {4}


@pytest.mark.parametrize("kwargs, exc, message", [
    ({"average_bits": 0}, ValueError, "average_bits"),
    ({"average_bits": "2.5"}, TypeError, "average_bits"),
    ({"average_bits": 2.5, "bits": (2, 5)}, ValueError, "bits="),
    ({"average_bits": 2.5, "bits": ()}, ValueError, "bits="),
])
def test_plan_rejects_bad_arguments(kwargs, exc, message):
    with pytest.raises(exc, match=message):
        plan_bits(_model(1.0), _data(), config=_config(), **kwargs)


def test_plan_needs_a_module_and_something_to_palettize():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        plan_bits("model", _data(), average_bits=2.5)
    with pytest.raises(ValueError, match="no weight"):
        plan_bits(nn.Linear(4, 4), _data(), average_bits=2.5)


# ----------------------------------------------------------------------------------------------- the recipe option


def _compose(overrides):
    from hydra import compose, initialize_config_dir

    from dkm_palett.recipes.config import conf_dir

    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def test_recipe_average_bits_plans_mixed_widths_within_the_budget():
    """``palettization.average_bits=2.5`` on the default experiment (digits CNN): the config composes, the
    ModuleDKMPalettizerConfig ignores the key, and the planned config mixes widths within the budget."""
    from hydra.utils import instantiate

    from dkm_palett.recipes.config import build_dkm_config, check_targets, planned_config

    cfg = _compose(["palettization.average_bits=2.5", "palettization.n_bits=2"])
    check_targets(cfg)
    base = build_dkm_config(cfg.palettization)
    assert base.global_config.n_bits == 2
    torch.manual_seed(0)
    lit, datamodule = instantiate(cfg.model), instantiate(cfg.data)
    plan = planned_config(cfg, lit, datamodule, base)
    widths = {name: entry.n_bits for name, entry in plan.module_name_configs.items()}
    assert len(widths) >= 2 and len(set(widths.values())) >= 2, widths
    storage, elements, _ = _finalized_bits(lit, plan)
    assert storage <= 2.5 * elements
    assert planned_config(_compose([]), lit, datamodule, base) is base  # without the option: the config as is


@pytest.mark.parametrize("overrides, exc, message", [
    (["palettization.average_bits=0"], ValueError, "palettization.average_bits"),
    (["palettization.average_bits=2.5", "mode=compare"], ValueError, "mode=compare"),
])
def test_recipe_average_bits_bad_values_fail_before_training(overrides, exc, message):
    from dkm_palett.recipes.config import check_targets

    with pytest.raises(exc, match=message):
        check_targets(_compose(overrides))
