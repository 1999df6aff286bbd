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

import os
from dataclasses import dataclass, field
from typing import IO, Any, Optional, Union

import yaml
from torch import nn

from dkm_palett.config.base import coerce_entry, load_yaml_mapping
from dkm_palett.io import atomic_write_text
from dkm_palett.module_support import (
    SUPPORTED_PARAMS,
    is_supported,
    name_matches,
    resolve_type_key,
    type_name,
)
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
    if value is None:
        return {}
    check_type(where, value, dict)
    out = {}
    for key, spec in value.items():
        check_type(f"{where} key", key, str)
        out[key] = _spec_entry(spec, f"{where}[{key!r}]")
    return out


def _specs_as_dict(specs: dict) -> dict:
    return {k: None if v is None else v.as_dict() for k, v in specs.items()}


def _match_name(table: dict, names: tuple[str, ...]) -> tuple[bool, Any]:
    """First entry whose key equals one of ``names``, else the first whose key fully matches one as a regex."""
    for key, value in table.items():
        if key in names:
            return True, value
    for key, value in table.items():
        if any(name_matches(key, n) for n in names):
            return True, value
    return False, None


def _match_type(table: dict, module: nn.Module) -> tuple[bool, Any]:
    """The entry for the most specific class of ``module`` present in ``table``."""
    for cls in type(module).__mro__:
        if cls in table:
            return True, table[cls]
    return False, None


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
        self.op_type_config = {} if self.op_type_config is None else self.op_type_config
        self.op_name_config = {} if self.op_name_config is None else self.op_name_config
        check_type("op_type_config", self.op_type_config, dict)
        check_type("op_name_config", self.op_name_config, dict)
        self.op_type_config = {resolve_type_key(k): _op_entry(v, f"op_type_config[{k!r}]")
                               for k, v in self.op_type_config.items()}
        for key in self.op_name_config:
            check_type("op_name_config key", key, str)
        self.op_name_config = {k: _op_entry(v, f"op_name_config[{k!r}]") for k, v in self.op_name_config.items()}

    def set_op_type(self, op_type: Any, config: Optional[OpKMeansPalettizerConfig]) -> "ModuleKMeansPalettizerConfig":
        self.op_type_config[resolve_type_key(op_type)] = _op_entry(config, f"op_type_config[{op_type!r}]")
        return self

    def set_op_name(self, op_name: str, config: Optional[OpKMeansPalettizerConfig]) -> "ModuleKMeansPalettizerConfig":
        check_type("op_name", op_name, str)
        self.op_name_config[op_name] = _op_entry(config, f"op_name_config[{op_name!r}]")
        return self

    def resolve(self, op_names: tuple[str, ...], op: nn.Module, param_name: str,
                owned_by_scope: bool) -> Optional[PalettizationSpec]:
        """The spec for ``op.<param_name>``; ``op_names`` = (name relative to the scope, full name)."""
        if owned_by_scope and param_name in self.module_state_spec:
            return self.module_state_spec[param_name]
        for table, found_entry in ((self.op_name_config, _match_name(self.op_name_config, op_names)),
                                   (self.op_type_config, _match_type(self.op_type_config, op))):
            found, entry = found_entry
            if found:
                return None if entry is None else entry.op_state_spec.get(param_name)
        return self.op_state_spec.get(param_name)

    def as_dict(self) -> dict:
        def entry(v):
            return None if v is None else v.as_dict()

        return {
            "op_state_spec": _specs_as_dict(self.op_state_spec),
            "op_type_config": {type_name(k): entry(v) for k, v in self.op_type_config.items()},
            "op_name_config": {k: entry(v) for k, v in self.op_name_config.items()},
            "module_state_spec": _specs_as_dict(self.module_state_spec),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "ModuleKMeansPalettizerConfig":
        check_keys("ModuleKMeansPalettizerConfig", data,
                   ("op_state_spec", "op_type_config", "op_name_config", "module_state_spec"))
        return cls(**data)


def _module_entry(value: Any, where: str) -> Optional[ModuleKMeansPalettizerConfig]:
    return coerce_entry(value, ModuleKMeansPalettizerConfig, where)


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
class PlannedWeight:
    """One weight to palettize: where it lives and its spec."""

    module_name: str
    module: nn.Module
    param_name: str
    spec: PalettizationSpec

    @property
    def name(self) -> str:
        return f"{self.module_name}.{self.param_name}" if self.module_name else self.param_name


@dataclass
class KMeansPalettizerConfig:
    """Model-wide config: ``module_name_configs`` > ``module_type_configs`` > ``global_config``.

    With no arguments, ``global_config`` is the 4-bit per-tensor default. When only type/name configs are given and
    ``global_config`` is not, modules they do not cover are left alone (as in the docs' "conv 4-bit, linear 8-bit"
    example). ``None`` entries skip the matched modules.
    """

    global_config: Any = _UNSET
    module_type_configs: dict = field(default_factory=dict)
    module_name_configs: dict = field(default_factory=dict)

    presets = _ConfigPresets()

    def __post_init__(self):
        self.module_type_configs = {} if self.module_type_configs is None else self.module_type_configs
        self.module_name_configs = {} if self.module_name_configs is None else self.module_name_configs
        check_type("module_type_configs", self.module_type_configs, dict)
        check_type("module_name_configs", self.module_name_configs, dict)
        if self.global_config is _UNSET:
            empty = not self.module_type_configs and not self.module_name_configs
            self.global_config = ModuleKMeansPalettizerConfig() if empty else None
        self.global_config = _module_entry(self.global_config, "global_config")
        self.module_type_configs = {resolve_type_key(k): _module_entry(v, f"module_type_configs[{k!r}]")
                                    for k, v in self.module_type_configs.items()}
        for key in self.module_name_configs:
            check_type("module_name_configs key", key, str)
        self.module_name_configs = {k: _module_entry(v, f"module_name_configs[{k!r}]")
                                    for k, v in self.module_name_configs.items()}

    # chainable setters
    def set_global(self, config: Optional[ModuleKMeansPalettizerConfig]) -> "KMeansPalettizerConfig":
        self.global_config = _module_entry(config, "global_config")
        return self

    def set_module_type(self, module_type: Any,
                        config: Optional[ModuleKMeansPalettizerConfig]) -> "KMeansPalettizerConfig":
        self.module_type_configs[resolve_type_key(module_type)] = _module_entry(
            config, f"module_type_configs[{module_type!r}]")
        return self

    def set_module_name(self, module_name: str,
                        config: Optional[ModuleKMeansPalettizerConfig]) -> "KMeansPalettizerConfig":
        check_type("module_name", module_name, str)
        self.module_name_configs[module_name] = _module_entry(config, f"module_name_configs[{module_name!r}]")
        return self

    # resolution
    def _scope(self, name: str, modules: dict) -> tuple[str, Optional[ModuleKMeansPalettizerConfig]]:
        ancestors = [name]
        while ancestors[-1]:
            ancestors.append(ancestors[-1].rpartition(".")[0])
        for anc in ancestors:
            found, cfg = _match_name(self.module_name_configs, (anc,))
            if found:
                return anc, cfg
        for anc in ancestors:
            found, cfg = _match_type(self.module_type_configs, modules[anc])
            if found:
                return anc, cfg
        return name, self.global_config

    def plan(self, model: nn.Module) -> list[PlannedWeight]:
        """Every weight this config palettizes in ``model``, with its spec; raises ValueError on config mistakes
        (name keys matching nothing, unsupported modules named explicitly, specs that do not fit a weight)."""
        modules = dict(model.named_modules())
        self._check_explicit_targets(modules)
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
                full = f"{name}.{param_name}" if name else param_name
                spec.check_shape(tuple(param.shape), full)
                planned.append(PlannedWeight(name, module, param_name, spec))
        return planned

    def _check_explicit_targets(self, modules: dict) -> None:
        supported_names = [n for n, m in modules.items() if is_supported(m)]

        def has_supported(scope: str) -> bool:
            return any(n == scope or not scope or n.startswith(scope + ".") for n in supported_names)

        allowed = ", ".join(c.__name__ for c in SUPPORTED_PARAMS)
        for key, cfg in self.module_name_configs.items():
            matches = [n for n in modules if name_matches(key, n)]
            if not matches:
                raise ValueError(f"module_name_configs key {key!r} matches no module in the model.")
            if cfg is not None:
                bad = [n for n in matches if not has_supported(n)]
                if bad and len(bad) == len(matches):
                    raise ValueError(
                        f"module_name_configs[{key!r}] names module {bad[0]!r} ({type(modules[bad[0]]).__name__}), "
                        f"which holds no palettizable weights; supported module types: {allowed}.")
        for cls, cfg in self.module_type_configs.items():
            if cfg is None:
                continue
            instances = [n for n, m in modules.items() if isinstance(m, cls)]
            if instances and not any(has_supported(n) for n in instances):
                raise ValueError(f"module_type_configs names {type_name(cls)}, which holds no palettizable weights; "
                                 f"supported module types: {allowed}.")

    # dict / yaml
    def as_dict(self) -> dict:
        def entry(v):
            return None if v is None else v.as_dict()

        return {
            "global_config": entry(self.global_config),
            "module_type_configs": {type_name(k): entry(v) for k, v in self.module_type_configs.items()},
            "module_name_configs": {k: entry(v) for k, v in self.module_name_configs.items()},
        }

    @classmethod
    def from_dict(cls, data: dict) -> "KMeansPalettizerConfig":
        """Accepts the bare mapping or one wrapped in ``kmeans_palettization_config:``."""
        check_type("KMeansPalettizerConfig data", data, dict)
        if YAML_ROOT in data:
            check_keys("KMeansPalettizerConfig YAML", data, (YAML_ROOT,))
            data = data[YAML_ROOT] or {}
        check_keys("KMeansPalettizerConfig", data, ("global_config", "module_type_configs", "module_name_configs"))
        return cls(**data)

    @classmethod
    def from_yaml(cls, yml: Union[IO, str, os.PathLike]) -> "KMeansPalettizerConfig":
        return cls.from_dict(load_yaml_mapping(yml))

    def to_yaml(self, path: Union[str, os.PathLike, None] = None) -> str:
        """The config as YAML under ``kmeans_palettization_config:``; also written (atomically) to ``path``."""
        text = yaml.safe_dump({YAML_ROOT: self.as_dict()}, sort_keys=False)
        if path is not None:
            atomic_write_text(path, text)
        return text

