"""Post-training palettization configs with coremltools' ``optimize.coreml`` names: OpPalettizerConfig and
OptimizationConfig. Here an "op" is a parameter-owning PyTorch module: op types are module classes (or dotted
strings, or the Core ML op names ``linear``, ``conv``, ``gather``, ``layer_norm``), op names are module qualified
names (exact, a full regex, or ``<module>.<param>``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
import os
from typing import IO, Any, Optional, Union

import yaml
from torch import nn

from dkm_palett.config.base import coerce_entry, load_yaml_mapping
from dkm_palett.io import atomic_write_text
from dkm_palett.module_support import name_matches, resolve_type_key, type_name
from dkm_palett.spec import (
    ALLOWED_N_BITS,
    GRANULARITIES,
    PalettizationSpec,
    PerGroupedChannelGranularity,
    PerTensorGranularity,
    canonical_lut_dtype,
)
from dkm_palett.validation import check_choice, check_int, check_keys, check_type

MODES = ("kmeans", "uniform", "unique")

#: Core ML op names accepted as op-type keys, and the module classes they stand for.
COREML_OP_ALIASES: dict[str, tuple[type, ...]] = {
    "linear": (nn.Linear,),
    "conv": (nn.Conv1d, nn.Conv2d, nn.Conv3d),
    "gather": (nn.Embedding,),
    "layer_norm": (nn.LayerNorm,),
}


def _granularity_name(value: Any) -> str:
    """Accept 'per_tensor', 'PER_TENSOR', coremltools' CompressionGranularity enum or a spec granularity."""
    if isinstance(value, PerTensorGranularity):
        return "per_tensor"
    if isinstance(value, PerGroupedChannelGranularity):
        return "per_grouped_channel"
    if hasattr(value, "name") and not isinstance(value, str):
        value = value.name
    if isinstance(value, str):
        value = value.lower()
    check_choice("granularity", value, GRANULARITIES)
    return value


@dataclass
class OpPalettizerConfig:
    """How to palettize one weight after training (coremltools field names and defaults).

    mode: ``kmeans`` (optimal 1-D k-means for scalars, k-means++ with restarts for vectors), ``uniform`` (evenly
        spaced LUT between the weight's min and max) or ``unique`` (the weight's distinct values, kept exactly, when
        there are at most 256 of them; otherwise the weight is left as is and the report says why).
    nbits: index width in {1, 2, 3, 4, 6, 8}; required for kmeans/uniform. For ``unique`` leave it ``None`` to pick
        the smallest width that holds the distinct values, or set it to require that width.
    weight_threshold: a weight is palettized only if it has MORE than this many elements (coremltools semantics).
    granularity: ``per_tensor`` or ``per_grouped_channel`` (``group_size`` channels per LUT along ``channel_axis``).
    channel_axis: ``None`` means the output-channel axis 0.
    cluster_dim: LUT entry length (> 1: vector palettization along the channel axis).
    enable_per_channel_scale: cluster ``w / max|w_channel|`` and keep the per-channel scales.
    lut_dtype: LUT storage (``None``/``fp32``, ``fp16``, ``int8``/``uint8`` quantized LUT, ...).
    num_kmeans_workers: worker processes used to cluster weights in parallel.
    """

    mode: str = "kmeans"
    nbits: Optional[int] = None
    weight_threshold: Optional[int] = 2048
    granularity: Any = "per_tensor"
    group_size: int = 32
    channel_axis: Optional[int] = None
    cluster_dim: int = 1
    enable_per_channel_scale: bool = False
    lut_dtype: Any = None
    num_kmeans_workers: int = 1

    def __post_init__(self):
        if isinstance(self.mode, str):
            self.mode = self.mode.lower()
        check_choice("mode", self.mode, MODES)
        if self.nbits is not None:
            check_choice("nbits", self.nbits, ALLOWED_N_BITS)
        elif self.mode != "unique":
            raise ValueError(f"nbits is required for mode={self.mode!r}; allowed values: "
                             f"{', '.join(map(str, ALLOWED_N_BITS))}.")
        if self.weight_threshold is None:
            self.weight_threshold = 2048
        check_int("weight_threshold", self.weight_threshold, minimum=0)
        self.granularity = _granularity_name(self.granularity)
        check_int("group_size", self.group_size, minimum=1)
        if self.channel_axis is not None:
            check_int("channel_axis", self.channel_axis, minimum=0)
        check_int("cluster_dim", self.cluster_dim, minimum=1)
        if self.cluster_dim > 1 and self.mode == "uniform":
            raise ValueError("mode='uniform' builds scalar LUTs; use cluster_dim=1 or mode='kmeans' for vectors.")
        check_type("enable_per_channel_scale", self.enable_per_channel_scale, bool)
        self.lut_dtype = canonical_lut_dtype(self.lut_dtype)
        check_int("num_kmeans_workers", self.num_kmeans_workers, minimum=1)

    def applies_to(self, numel: int) -> bool:
        """coremltools semantics: only weights with more than ``weight_threshold`` elements are palettized."""
        return numel > self.weight_threshold

    def to_spec(self, n_bits: Optional[int] = None) -> PalettizationSpec:
        """The PalettizationSpec for this config (``n_bits`` overrides ``nbits``; needed for ``unique``)."""
        bits = n_bits if n_bits is not None else self.nbits
        if bits is None:
            raise ValueError("mode='unique' picks nbits from the data; pass n_bits to to_spec().")
        axis = 0 if self.channel_axis is None else self.channel_axis
        granularity: Any = PerTensorGranularity()
        if self.granularity == "per_grouped_channel":
            granularity = PerGroupedChannelGranularity(axis=axis, group_size=self.group_size)
        return PalettizationSpec(n_bits=bits, granularity=granularity, cluster_dim=self.cluster_dim,
                                 lut_dtype=self.lut_dtype, enable_per_channel_scale=self.enable_per_channel_scale,
                                 channel_axis=axis)

    def as_dict(self) -> dict:
        return {
            "mode": self.mode, "nbits": self.nbits, "weight_threshold": self.weight_threshold,
            "granularity": self.granularity, "group_size": self.group_size, "channel_axis": self.channel_axis,
            "cluster_dim": self.cluster_dim, "enable_per_channel_scale": self.enable_per_channel_scale,
            "lut_dtype": self.lut_dtype, "num_kmeans_workers": self.num_kmeans_workers,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "OpPalettizerConfig":
        check_keys("OpPalettizerConfig", data, cls.__dataclass_fields__)
        return cls(**data)


def _op_entry(value: Any, where: str) -> Optional[OpPalettizerConfig]:
    return coerce_entry(value, OpPalettizerConfig, where)


def _type_key(key: Any) -> Union[type, str]:
    """Op-type keys: a Core ML alias (kept as the lowercase string) or a module class."""
    if isinstance(key, str) and key.lower() in COREML_OP_ALIASES:
        return key.lower()
    return resolve_type_key(key)


def _key_classes(key: Union[type, str]) -> tuple[type, ...]:
    return COREML_OP_ALIASES[key] if isinstance(key, str) else (key,)


@dataclass
class OptimizationConfig:
    """Which weights ``palettize_weights`` touches and how: ``op_name_configs`` beat ``op_type_configs`` beat
    ``global_config``; a ``None`` entry skips the matching weights. Type keys match subclasses too (the most specific
    class wins)."""

    global_config: Optional[OpPalettizerConfig] = None
    op_type_configs: dict = field(default_factory=dict)
    op_name_configs: dict = field(default_factory=dict)

    def __post_init__(self):
        self.global_config = _op_entry(self.global_config, "global_config")
        self.op_type_configs = {} if self.op_type_configs is None else self.op_type_configs
        self.op_name_configs = {} if self.op_name_configs is None else self.op_name_configs
        check_type("op_type_configs", self.op_type_configs, dict)
        check_type("op_name_configs", self.op_name_configs, dict)
        self.op_type_configs = {_type_key(k): _op_entry(v, f"op_type_configs[{k!r}]")
                                for k, v in self.op_type_configs.items()}
        for key in self.op_name_configs:
            check_type("op_name_configs key", key, str)
        self.op_name_configs = {k: _op_entry(v, f"op_name_configs[{k!r}]") for k, v in self.op_name_configs.items()}

    # setters (coremltools style, chainable)
    def set_global(self, op_config: Optional[OpPalettizerConfig]) -> "OptimizationConfig":
        self.global_config = _op_entry(op_config, "global_config")
        return self

    def set_op_type(self, op_type: Any, op_config: Optional[OpPalettizerConfig]) -> "OptimizationConfig":
        self.op_type_configs[_type_key(op_type)] = _op_entry(op_config, f"op_type_configs[{op_type!r}]")
        return self

    def set_op_name(self, op_name: str, op_config: Optional[OpPalettizerConfig]) -> "OptimizationConfig":
        check_type("op_name", op_name, str)
        self.op_name_configs[op_name] = _op_entry(op_config, f"op_name_configs[{op_name!r}]")
        return self

    # resolution
    def resolve(self, module_name: str, module: nn.Module, param_name: str) -> Optional[OpPalettizerConfig]:
        """The config for ``module.<param_name>`` (``None``: leave it alone)."""
        full = f"{module_name}.{param_name}" if module_name else param_name
        for key, cfg in self.op_name_configs.items():  # exact names first, then regexes
            if key in (module_name, full):
                return cfg
        for key, cfg in self.op_name_configs.items():
            if name_matches(key, module_name) or name_matches(key, full):
                return cfg
        for cls in type(module).__mro__:
            for key, cfg in self.op_type_configs.items():
                if cls in _key_classes(key):
                    return cfg
        return self.global_config

    # dict / yaml
    def as_dict(self) -> dict:
        def entry(v):
            return None if v is None else v.as_dict()

        return {
            "global_config": entry(self.global_config),
            "op_type_configs": {(k if isinstance(k, str) else type_name(k)): entry(v)
                                for k, v in self.op_type_configs.items()},
            "op_name_configs": {k: entry(v) for k, v in self.op_name_configs.items()},
        }

    @classmethod
    def from_dict(cls, data: dict) -> "OptimizationConfig":
        """Accepts coremltools' YAML layout too (an optional ``config_type: OpPalettizerConfig``)."""
        check_keys("OptimizationConfig", data, ("config_type", "global_config", "op_type_configs", "op_name_configs"))
        data = dict(data)
        config_type = data.pop("config_type", "OpPalettizerConfig")
        check_choice("config_type", config_type, ("OpPalettizerConfig",))
        return cls(**data)

    @classmethod
    def from_yaml(cls, yml: Union[IO, str, os.PathLike]) -> "OptimizationConfig":
        return cls.from_dict(load_yaml_mapping(yml))

    def to_yaml(self, path: Union[str, os.PathLike, None] = None) -> str:
        """The config as YAML (coremltools layout); also written atomically to ``path`` when given."""
        text = yaml.safe_dump({"config_type": "OpPalettizerConfig", **self.as_dict()}, sort_keys=False)
        if path is not None:
            atomic_write_text(path, text)
        return text
