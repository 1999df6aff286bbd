"""Post-training palettization configs with coremltools' ``optimize.coreml`` names: OpPalettizerConfig and
OptimizationConfig. Here an "op" is a parameter-owning PyTorch module: op types are module classes (or dotted
strings, or the Core ML op names ``linear``, ``conv``, ``gather``, ``layer_norm``), op names are module qualified
names (exact, a full regex, or ``<module>.<param>``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Union

from torch import nn

from dkm_palett.config.base import ConfigIO, ModelConfig
from dkm_palett.module_support import resolve_type_key, supported_params
from dkm_palett.plan import PlannedWeight, full_name
from dkm_palett.spec import (
    ALLOWED_N_BITS,
    GRANULARITIES,
    PalettizationSpec,
    PerGroupedChannelGranularity,
    PerTensorGranularity,
    canonical_lut_dtype,
    granularity_from,
)
from dkm_palett.validation import check_choice, check_int, check_type

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
class OpPalettizerConfig(ConfigIO):
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
        granularity = granularity_from(self.granularity, group_size=self.group_size, axis=axis)
        return PalettizationSpec(n_bits=bits, granularity=granularity, cluster_dim=self.cluster_dim,
                                 lut_dtype=self.lut_dtype, enable_per_channel_scale=self.enable_per_channel_scale,
                                 channel_axis=axis)


@dataclass
class OptimizationConfig(ModelConfig):
    """Which weights ``palettize_weights`` touches and how: ``op_name_configs`` beat ``op_type_configs`` beat
    ``global_config``; a ``None`` entry skips the matching weights. Type keys match subclasses too (the most specific
    class wins)."""

    entry_class: ClassVar[type] = OpPalettizerConfig
    types_field: ClassVar[str] = "op_type_configs"
    names_field: ClassVar[str] = "op_name_configs"

    global_config: Optional[OpPalettizerConfig] = None
    op_type_configs: dict = field(default_factory=dict)
    op_name_configs: dict = field(default_factory=dict)

    def __post_init__(self):
        self._normalize()

    @staticmethod
    def _type_key(key: Any) -> Union[type, str]:
        """Op-type keys: a Core ML alias (kept as the lowercase string) or a module class."""
        if isinstance(key, str) and key.lower() in COREML_OP_ALIASES:
            return key.lower()
        return resolve_type_key(key)

    @staticmethod
    def key_classes(key: Union[type, str]) -> tuple[type, ...]:
        return COREML_OP_ALIASES[key] if isinstance(key, str) else (key,)

    # coremltools' names for set_module_type / set_module_name (here an op is a module), kept for compatibility
    def set_op_type(self, op_type: Any, op_config: Optional[OpPalettizerConfig]) -> "OptimizationConfig":
        return self.set_module_type(op_type, op_config)

    def set_op_name(self, op_name: str, op_config: Optional[OpPalettizerConfig]) -> "OptimizationConfig":
        return self.set_module_name(op_name, op_config)

    # ------------------------------------------------------------------------------------ planning
    def resolve(self, module_name: str, module: nn.Module, param_name: str) -> Optional[OpPalettizerConfig]:
        """The config for ``module.<param_name>`` (``None``: leave it alone): by op name (the module's or
        ``<module>.<param>``), else by op type, else global."""
        found, entry = self._match((module_name, full_name(module_name, param_name)), module)
        return entry if found else self.global_config

    def plan(self, model: nn.Module) -> list[PlannedWeight]:
        """Every supported weight with its spec and op config, or the reason it is skipped (no config applies, or
        ``weight_threshold``). ``mode='unique'`` without ``nbits`` plans 8 bits; clustering picks the width."""
        modules = dict(model.named_modules())
        self._check_targets(modules, param_names=True)
        planned = []
        for module_name, module in modules.items():
            for param_name in supported_params(module):
                numel = getattr(module, param_name).numel()
                cfg = self.resolve(module_name, module, param_name)
                reason = ("no config applies (None)" if cfg is None else None if cfg.applies_to(numel) else
                          f"{numel} elements <= weight_threshold={cfg.weight_threshold}")
                if reason is not None:
                    planned.append(PlannedWeight(module_name, module, param_name, None, cfg, reason))
                    continue
                spec = cfg.to_spec(n_bits=cfg.nbits if cfg.nbits is not None else 8)
                spec.check_shape(tuple(getattr(module, param_name).shape), full_name(module_name, param_name))
                planned.append(PlannedWeight(module_name, module, param_name, spec, cfg))
        return planned

    # ------------------------------------------------------------------------------------ dict / yaml
    @classmethod
    def _unwrap(cls, data: Any) -> Any:
        """Accepts coremltools' YAML layout too (an optional ``config_type: OpPalettizerConfig``)."""
        check_type("OptimizationConfig data", data, dict)
        data = dict(data)
        check_choice("config_type", data.pop("config_type", "OpPalettizerConfig"), ("OpPalettizerConfig",))
        return data

    def _wrap(self, data: dict) -> dict:
        return {"config_type": "OpPalettizerConfig", **data}
