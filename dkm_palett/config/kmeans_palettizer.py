"""Spec-style k-means palettization configs: KMeansPalettizerConfig > ModuleKMeansPalettizerConfig >
OpKMeansPalettizerConfig, each naming a :class:`PalettizationSpec` per parameter.

Eager-PyTorch interpretation of "modules" and "ops":

* A *module config* applies to a scope: the module matched by ``module_name_configs`` / ``module_type_configs``
  (nearest matching ancestor of a weight's owner, name beats type), or, for ``global_config``, each module itself.
* The *ops* in a scope are the parameter-owning supported modules in it (the scope module and its descendants:
  Linear, Conv1d/2d/3d, Embedding, LayerNorm, MultiheadAttention). An op's *name* is its qualified name relative to
  the scope (its full name also matches); an op's *type* is its module class (subclasses match).
* For a parameter ``p`` of op ``o`` the spec is, highest first: ``module_state_spec[p]`` (only for parameters the
  scope module owns itself), the ``op_name_config`` entry matching ``o``, the ``op_type_config`` entry matching ``o``,
  then ``op_state_spec[p]``. A matching op entry decides alone: parameters it does not list are left alone. ``None``
  anywhere means "leave it uncompressed".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

from torch import nn

from dkm_palett.config.base import ModelConfig, coerce_entry, name_key, name_table, plain_entry, type_table
from dkm_palett.module_support import is_supported, resolve_type_key, type_name
from dkm_palett.plan import PlannedWeight, full_name, match_name, match_type
from dkm_palett.spec import (
    PalettizationSpec,
    PerGroupedChannelGranularity,
    PerTensorGranularity,
    default_weight_palettization_spec,
)
from dkm_palett.validation import check_keys, check_type

YAML_ROOT = "kmeans_palettization_config"
DEFAULT_PARAMS = ("weight", "in_proj_weight")


def _default_state_specs() -> dict:
    return {name: default_weight_palettization_spec() for name in DEFAULT_PARAMS}


def _spec_entry(value: Any, where: str) -> Optional[PalettizationSpec]:
    return coerce_entry(value, PalettizationSpec, where)


def _spec_map(value: Any, where: str) -> dict:
    return name_table(value, where, _spec_entry)


def _specs_as_dict(specs: dict) -> dict:
    return {k: None if v is None else v.as_dict() for k, v in specs.items()}


@dataclass
class OpKMeansPalettizerConfig:
    """Specs for one op (a parameter-owning module): ``op_state_spec`` maps parameter names to specs."""

    op_state_spec: dict = field(default_factory=_default_state_specs)

    def __post_init__(self):
        self.op_state_spec = _spec_map(self.op_state_spec, "op_state_spec")

    def as_dict(self) -> dict:
        return {"op_state_spec": _specs_as_dict(self.op_state_spec)}

    @classmethod
    def from_dict(cls, data: dict) -> "OpKMeansPalettizerConfig":
        check_keys("OpKMeansPalettizerConfig", data, ("op_state_spec",))
        return cls(**data)


def _op_entry(value: Any, where: str) -> Optional[OpKMeansPalettizerConfig]:
    return coerce_entry(value, OpKMeansPalettizerConfig, where)


def _preset_spec(n_bits: int) -> PalettizationSpec:
    if n_bits == 8:
        return PalettizationSpec(n_bits=8, granularity=PerTensorGranularity())
    group = 16 if n_bits == 4 else 8
    return PalettizationSpec(n_bits=n_bits, granularity=PerGroupedChannelGranularity(axis=0, group_size=group))


class _ModulePresets:
    """``w2``: 2-bit, one LUT per 8 output channels; ``w4``: 4-bit, one LUT per 16 output channels;
    ``w8``: 8-bit per-tensor. All on ``weight`` and ``in_proj_weight``."""

    @staticmethod
    def _make(n_bits: int) -> "ModuleKMeansPalettizerConfig":
        return ModuleKMeansPalettizerConfig(op_state_spec={p: _preset_spec(n_bits) for p in DEFAULT_PARAMS})

    def w2(self) -> "ModuleKMeansPalettizerConfig":
        return self._make(2)

    def w4(self) -> "ModuleKMeansPalettizerConfig":
        return self._make(4)

    def w8(self) -> "ModuleKMeansPalettizerConfig":
        return self._make(8)


@dataclass
class ModuleKMeansPalettizerConfig:
    """Specs for every op in a module's scope (see the module docstring for the resolution order)."""

    op_state_spec: dict = field(default_factory=_default_state_specs)
    op_type_config: dict = field(default_factory=dict)
    op_name_config: dict = field(default_factory=dict)
    module_state_spec: dict = field(default_factory=dict)

    presets = _ModulePresets()

    def __post_init__(self):
        self.op_state_spec = _spec_map(self.op_state_spec, "op_state_spec")
        self.module_state_spec = _spec_map(self.module_state_spec, "module_state_spec")
        self.op_type_config = type_table(self.op_type_config, "op_type_config", resolve_type_key, _op_entry)
        self.op_name_config = name_table(self.op_name_config, "op_name_config", _op_entry)

    def set_op_type(self, op_type: Any, config: Optional[OpKMeansPalettizerConfig]) -> "ModuleKMeansPalettizerConfig":
        self.op_type_config[resolve_type_key(op_type)] = _op_entry(config, f"op_type_config[{op_type!r}]")
        return self

    def set_op_name(self, op_name: str, config: Optional[OpKMeansPalettizerConfig]) -> "ModuleKMeansPalettizerConfig":
        self.op_name_config[name_key(op_name, "op_name_config")] = _op_entry(config, f"op_name_config[{op_name!r}]")
        return self

    def resolve(self, op_names: tuple[str, ...], op: nn.Module, param_name: str,
                owned_by_scope: bool) -> Optional[PalettizationSpec]:
        """The spec for ``op.<param_name>``; ``op_names`` = (name relative to the scope, full name)."""
        if owned_by_scope and param_name in self.module_state_spec:
            return self.module_state_spec[param_name]
        for found, entry in (match_name(self.op_name_config, op_names), match_type(self.op_type_config, op)):
            if found:
                return None if entry is None else entry.op_state_spec.get(param_name)
        return self.op_state_spec.get(param_name)

    def as_dict(self) -> dict:
        return {
            "op_state_spec": _specs_as_dict(self.op_state_spec),
            "op_type_config": {type_name(k): plain_entry(v) for k, v in self.op_type_config.items()},
            "op_name_config": {k: plain_entry(v) for k, v in self.op_name_config.items()},
            "module_state_spec": _specs_as_dict(self.module_state_spec),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "ModuleKMeansPalettizerConfig":
        check_keys("ModuleKMeansPalettizerConfig", data,
                   ("op_state_spec", "op_type_config", "op_name_config", "module_state_spec"))
        return cls(**data)


class _Unset:
    def __repr__(self) -> str:
        return "<default>"


_UNSET = _Unset()


class _ConfigPresets:
    """Whole-model presets: ``KMeansPalettizerConfig.presets.w4()`` has the global config
    ``ModuleKMeansPalettizerConfig.presets.w4()`` (same for w2, w8)."""

    def w2(self) -> "KMeansPalettizerConfig":
        return KMeansPalettizerConfig(global_config=ModuleKMeansPalettizerConfig.presets.w2())

    def w4(self) -> "KMeansPalettizerConfig":
        return KMeansPalettizerConfig(global_config=ModuleKMeansPalettizerConfig.presets.w4())

    def w8(self) -> "KMeansPalettizerConfig":
        return KMeansPalettizerConfig(global_config=ModuleKMeansPalettizerConfig.presets.w8())


@dataclass
class KMeansPalettizerConfig(ModelConfig):
    """Model-wide config: ``module_name_configs`` > ``module_type_configs`` > ``global_config``.

    With no arguments, ``global_config`` is the 4-bit per-tensor default. When only type/name configs are given and
    ``global_config`` is not, modules they do not cover are left alone (as in the docs' "conv 4-bit, linear 8-bit"
    example). ``None`` entries skip the matched modules.
    """

    entry_class: ClassVar[type] = ModuleKMeansPalettizerConfig

    global_config: Any = _UNSET
    module_type_configs: dict = field(default_factory=dict)
    module_name_configs: dict = field(default_factory=dict)

    presets = _ConfigPresets()

    def __post_init__(self):
        if self.global_config is _UNSET:
            empty = not self.module_type_configs and not self.module_name_configs
            self.global_config = ModuleKMeansPalettizerConfig() if empty else None
        self._normalize()

    # ------------------------------------------------------------------------------------ planning
    def _scope(self, name: str, modules: dict) -> tuple[str, Optional[ModuleKMeansPalettizerConfig]]:
        """The scope of module ``name``: its nearest ancestor (itself included) matched by name, else by type, and
        that entry; else the module itself with ``global_config``."""
        ancestors = [name]
        while ancestors[-1]:
            ancestors.append(ancestors[-1].rpartition(".")[0])
        for anc in ancestors:
            found, cfg = match_name(self.module_name_configs, (anc,))
            if found:
                return anc, cfg
        for anc in ancestors:
            found, cfg = match_type(self.module_type_configs, modules[anc])
            if found:
                return anc, cfg
        return name, self.global_config

    def plan(self, model: nn.Module) -> list[PlannedWeight]:
        """Every weight this config palettizes in ``model``, with its spec (the scope's module config as
        ``config``); raises ValueError on config mistakes (name keys matching nothing, unsupported modules named
        explicitly, specs that do not fit a weight)."""
        modules = dict(model.named_modules())
        self._check_targets(modules, scoped=True)
        planned = []
        for name, module in modules.items():
            if not is_supported(module):
                continue
            scope, cfg = self._scope(name, modules)
            if cfg is None:
                continue
            rel = "" if name == scope else (name[len(scope) + 1:] if scope else name)
            for param_name, param in module.named_parameters(recurse=False):
                spec = cfg.resolve((rel, name), module, param_name, owned_by_scope=(scope == name))
                if spec is None:
                    continue
                spec.check_shape(tuple(param.shape), full_name(name, param_name))
                planned.append(PlannedWeight(name, module, param_name, spec, cfg))
        return planned

    # ------------------------------------------------------------------------------------ dict / yaml
    @classmethod
    def _unwrap(cls, data: Any) -> Any:
        """Accepts the bare mapping or one wrapped in ``kmeans_palettization_config:``."""
        check_type("KMeansPalettizerConfig data", data, dict)
        if YAML_ROOT in data:
            check_keys("KMeansPalettizerConfig YAML", data, (YAML_ROOT,))
            data = data[YAML_ROOT] or {}
        return data

    def _wrap(self, data: dict) -> dict:
        return {YAML_ROOT: data}
