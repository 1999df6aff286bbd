"""Training-time (DKM) configs, with coremltools' field names: ModuleDKMPalettizerConfig and DKMPalettizerConfig."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Union

import torch
from torch import nn
from torch.nn.utils import parametrize

from dkm_palett.config.base import ConfigIO, ModelConfig, coerce_entry, coerce_model_config
from dkm_palett.module_support import is_supported, supported_params
from dkm_palett.plan import PlannedWeight, full_name
from dkm_palett.spec import ALLOWED_N_BITS, GRANULARITIES, PalettizationSpec, canonical_lut_dtype, granularity_from
from dkm_palett.validation import check_choice, check_int, check_number, check_type

KMEANS_INITS = ("auto", "cpu.kmeans++", "kmeans++", "kmeans_pp", "efficient_kmeans", "opt1d", "uniform")
PALETT_MODES = ("dkm", "gsm", "hard")
DKM_IMPLS = ("auto", "dense", "binned")
FINALIZE_LUTS = ("dkm", "mean")
#: ``sensitivity_weighted="auto"`` weights the centroid update at this many bits and fewer (measured: see the class
#: docstring)
SENSITIVITY_AUTO_MAX_BITS = 2
_ACT_DTYPES = {"qint8": torch.qint8, "quint8": torch.quint8, torch.qint8: torch.qint8, torch.quint8: torch.quint8}
_ACT_RANGES = {torch.qint8: (-128, 127), torch.quint8: (0, 255)}


@dataclass
class ModuleDKMPalettizerConfig(ConfigIO):
    """How DKM palettizes one module. Field names and defaults follow coremltools' ModuleDKMPalettizerConfig, except
    ``kmeans_max_iter``: 1 here, 3 in coremltools. Centroids are warm-started from the previous step, so one
    soft k-means update per training step keeps tracking the weights; it halves the passes over the weights per
    step and was as good as 3 on both tasks of ``benchmarks/quality.py`` (rows ``ours`` and ``ours-iter-3``).
    And ``palett_tau``: 3e-4 here, 1e-4 in coremltools. On both tasks of ``benchmarks/quality.py`` (3 seeds each)
    3e-4 gave a lower finalized validation loss than 1e-4 at 2, 3 and 4 bits; 1e-3 was lower still on 4 of those 6
    cells but lost on the MNIST CNN at 4 bits (a finalize gap of 0.035: too soft to snap), and 3e-5 lost at 2 bits.
    It is a value tuned on two small tasks (rows ``ours-tau-*``), at the weights' own scale (``d = |w - c|^2`` is
    absolute). Set ``kmeans_max_iter=3, palett_tau=1e-4`` for coremltools' math step for step.

    Beyond coremltools: ``granularity``/``group_size`` (one LUT per group of output channels),
    ``enable_per_channel_scale``, ``lut_dtype`` (modern spelling of ``cluster_dtype``), and the speed controls
    ``dkm_impl`` (``dense``: exact DKM on every weight, fused kernels for scalar LUTs on CPU; ``binned``: scalar
    LUTs on a grid chosen from tau and the centroid spacing for a bounded error; ``auto``: exact at 2 bits and, up to
    4 bits, on LUTs of fewer than 2^18 weights; elsewhere binned where its grid has at most ``dkm_bins`` points and at
    most a quarter as many as the weights per LUT, else exact; :mod:`dkm_palett.engine_choice`) and ``dkm_bins``.

    ``sensitivity_weighted``: weight DKM's centroid update, and the finalize LUT's cluster means, by each weight's
    running squared gradient (a Fisher diagonal from the training's own backward passes, factored into row and
    column sums as Adafactor keeps its second moments; :mod:`dkm_palett.dkm_sensitivity`). Centroids move to where the
    loss is sensitive. ``"auto"`` (the default) turns it on for layers of at most ``SENSITIVITY_AUTO_MAX_BITS`` (2)
    bits, where ``benchmarks/quality.py`` measured it better than without on both tasks (at 2 bits: charlm -0.078
    nats against coremltools instead of -0.067, MNIST +0.57 points instead of +0.27) and off above, a range chosen
    at ``palett_tau=1e-4``, where it lost 0.005 nats at 3 bits on charlm. Memory: ``rows + cols`` numbers a
    weight matrix kept, and the point weights of the layer whose DKM runs (4 bytes a weight; on the dense engine,
    GPU or vector LUTs, 8, from the layer's forward to its backward). The exact engines and the binned grid (6-8
    bits) weight their points the same way; fp16/bf16 weights, whose binned DKM is exact per distinct value, run
    exact DKM with it.
    """

    n_bits: Optional[int] = None
    weight_threshold: int = 2048
    milestone: int = 0
    cluster_dim: Optional[int] = None
    quant_min: int = -128
    quant_max: int = 127
    dtype: Any = torch.qint8
    cluster_dtype: str = "f32"
    quantize_activations: bool = False
    partition_size: int = 2000000000
    cluster_permute: Optional[tuple] = None
    palett_max_mem: float = 1.0
    kmeans_max_iter: int = 1  # coremltools: 3 (see the class docstring)
    prune_threshold: float = 0.0
    kmeans_init: str = "auto"
    kmeans_opt1d_threshold: int = 1024
    enforce_zero: bool = False
    palett_mode: str = "dkm"
    palett_tau: float = 3e-4  # coremltools: 1e-4 (see the class docstring)
    palett_epsilon: float = 1e-4
    palett_lambda: float = 0.0
    add_extra_centroid: bool = False
    palett_cluster_tol: float = 0.0
    granularity: str = "per_tensor"
    group_size: Optional[int] = None
    enable_per_channel_scale: bool = False
    lut_dtype: Optional[str] = None
    dkm_impl: str = "auto"
    dkm_bins: int = 65536
    total_steps: Optional[int] = None
    hard_fraction: float = 0.0
    finalize_lut: str = "mean"
    sensitivity_weighted: Union[bool, str] = "auto"  # auto: on at n_bits <= SENSITIVITY_AUTO_MAX_BITS

    def __post_init__(self):
        self._check_schedule()
        self._check_activation_quant()
        self._check_lut_dtype()
        self._check_layout()
        self._check_dkm()
        self._check_combinations()

    def _check_schedule(self) -> None:
        if self.n_bits is not None:
            check_choice("n_bits", self.n_bits, ALLOWED_N_BITS)
        check_int("weight_threshold", self.weight_threshold, minimum=0)
        check_int("milestone", self.milestone, minimum=0)
        if self.cluster_dim is not None:
            check_int("cluster_dim", self.cluster_dim, minimum=1)

    def _check_activation_quant(self) -> None:
        check_int("quant_min", self.quant_min)
        check_int("quant_max", self.quant_max)
        if self.dtype not in _ACT_DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not allowed; allowed values: torch.qint8, torch.quint8 "
                             "(or the strings 'qint8', 'quint8').")
        self.dtype = _ACT_DTYPES[self.dtype]
        lo, hi = _ACT_RANGES[self.dtype]
        if not lo <= self.quant_min < self.quant_max <= hi:
            raise ValueError(f"quant_min={self.quant_min}, quant_max={self.quant_max} must satisfy "
                             f"{lo} <= quant_min < quant_max <= {hi} for dtype={self.dtype}.")
        check_type("quantize_activations", self.quantize_activations, bool)

    def _check_lut_dtype(self) -> None:
        """``lut_dtype`` is the modern spelling of ``cluster_dtype``: both end up holding the canonical name."""
        self.cluster_dtype = canonical_lut_dtype(self.cluster_dtype, "cluster_dtype")
        if self.lut_dtype is not None:
            self.lut_dtype = canonical_lut_dtype(self.lut_dtype, "lut_dtype")
            if self.cluster_dtype != "f32" and self.cluster_dtype != self.lut_dtype:
                raise ValueError(f"cluster_dtype={self.cluster_dtype!r} and lut_dtype={self.lut_dtype!r} disagree; "
                                 "lut_dtype is the modern spelling of cluster_dtype, set only one.")
            self.cluster_dtype = self.lut_dtype
        self.lut_dtype = self.cluster_dtype

    def _check_layout(self) -> None:
        check_int("partition_size", self.partition_size, minimum=1)
        if self.cluster_permute is not None:
            if not isinstance(self.cluster_permute, (tuple, list)) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in self.cluster_permute
            ) or sorted(self.cluster_permute) != list(range(len(self.cluster_permute))):
                raise ValueError(f"cluster_permute={self.cluster_permute!r} must be a permutation of the weight's "
                                 "dimensions, e.g. (1, 0) for a Linear or (1, 0, 2, 3) for a Conv2d.")
            self.cluster_permute = tuple(self.cluster_permute)
        check_choice("granularity", self.granularity, GRANULARITIES)
        if self.group_size is not None:
            check_int("group_size", self.group_size, minimum=1)
        if self.granularity == "per_tensor" and self.group_size is not None:
            raise ValueError("group_size is only used with granularity='per_grouped_channel'; "
                             "set granularity='per_grouped_channel' or drop group_size.")
        check_type("enable_per_channel_scale", self.enable_per_channel_scale, bool)

    def _check_dkm(self) -> None:
        check_number("palett_max_mem", self.palett_max_mem, minimum=0.0, maximum=1.0, strict_min=True)
        check_int("kmeans_max_iter", self.kmeans_max_iter, minimum=1)
        check_number("prune_threshold", self.prune_threshold, minimum=0.0)
        check_choice("kmeans_init", self.kmeans_init, KMEANS_INITS)
        check_int("kmeans_opt1d_threshold", self.kmeans_opt1d_threshold, minimum=0)
        check_type("enforce_zero", self.enforce_zero, bool)
        check_choice("palett_mode", self.palett_mode, PALETT_MODES)
        check_number("palett_tau", self.palett_tau, minimum=0.0, strict_min=True)
        check_number("palett_epsilon", self.palett_epsilon, minimum=0.0)
        check_number("palett_lambda", self.palett_lambda, minimum=0.0)
        check_type("add_extra_centroid", self.add_extra_centroid, bool)
        check_number("palett_cluster_tol", self.palett_cluster_tol, minimum=0.0, maximum=1.0)
        check_choice("dkm_impl", self.dkm_impl, DKM_IMPLS)
        check_int("dkm_bins", self.dkm_bins, minimum=16)
        if self.total_steps is not None:
            check_int("total_steps", self.total_steps, minimum=1)
        check_number("hard_fraction", self.hard_fraction, minimum=0.0, maximum=1.0)
        check_choice("finalize_lut", self.finalize_lut, FINALIZE_LUTS)
        if not isinstance(self.sensitivity_weighted, (bool, str)):
            raise TypeError(f"sensitivity_weighted must be True, False or 'auto', got "
                            f"{type(self.sensitivity_weighted).__name__} ({self.sensitivity_weighted!r}).")
        check_choice("sensitivity_weighted", self.sensitivity_weighted, (True, False, "auto"))

    def _check_combinations(self) -> None:
        if self.cluster_dim not in (None, 1) and self.dkm_impl == "binned":
            raise ValueError("dkm_impl='binned' needs scalar LUTs (cluster_dim=1); use 'dense' or 'auto' for vectors.")
        if self.add_extra_centroid and self.n_bits == 8:
            raise ValueError("add_extra_centroid=True needs 2**n_bits + 1 LUT entries, which an 8-bit index cannot "
                             "address; use n_bits <= 6.")

    # -------------------------------------------------------------------------------- resolution per module
    @staticmethod
    def sensitivity_weighted_at(value: Union[bool, str], n_bits: int) -> bool:
        """Whether a layer of ``n_bits`` runs ``sensitivity_weighted``: ``value``, with ``"auto"`` on at
        ``SENSITIVITY_AUTO_MAX_BITS`` bits and fewer."""
        return n_bits <= SENSITIVITY_AUTO_MAX_BITS if value == "auto" else bool(value)

    def n_bits_for(self, module: nn.Module) -> int:
        """``n_bits``, or its default: 4 for Linear, 2 for other modules."""
        if self.n_bits is not None:
            return self.n_bits
        return 4 if isinstance(module, nn.Linear) else 2

    def to_spec(self, module: nn.Module, weight: torch.Tensor, name: str = "weight") -> PalettizationSpec:
        """The PalettizationSpec this config gives ``weight`` of ``module``; raises ValueError naming ``name``."""
        shape = tuple(weight.shape)
        axis = 0
        if self.cluster_permute is not None:
            if len(self.cluster_permute) != len(shape):
                raise ValueError(f"{name}: cluster_permute={self.cluster_permute} has {len(self.cluster_permute)} "
                                 f"entries but the weight has {len(shape)} dimensions (shape {shape}).")
            axis = self.cluster_permute[0]
        granularity = granularity_from(self.granularity, group_size=self.group_size, axis=axis)
        if self.granularity == "per_tensor" and self.partition_size < weight.numel():
            per_channel = weight.numel() // shape[axis]
            if self.partition_size % per_channel:
                raise ValueError(f"{name}: partition_size={self.partition_size} must be a multiple of the "
                                 f"{per_channel} elements per channel (shape {shape}).")
            granularity = granularity_from("per_grouped_channel", group_size=self.partition_size // per_channel,
                                           axis=axis)
        spec = PalettizationSpec(
            n_bits=self.n_bits_for(module), granularity=granularity, cluster_dim=self.cluster_dim or 1,
            lut_dtype=self.lut_dtype, enable_per_channel_scale=self.enable_per_channel_scale, channel_axis=axis,
        )
        spec.check_shape(shape, name)
        return spec


ModuleConfigEntry = Union[ModuleDKMPalettizerConfig, list, None]


@dataclass
class DKMPalettizerConfig(ModelConfig):
    """Which modules DKM palettizes and how. Precedence: ``module_name_configs``, then ``module_type_configs``,
    then ``global_config``. Type keys are classes or dotted strings; a type entry may be a list of configs chosen by
    ``weight_threshold`` (the largest threshold the module exceeds wins). Name keys may be regexes. ``None`` = skip.
    """

    entry_class: ClassVar[type] = ModuleDKMPalettizerConfig

    global_config: Optional[ModuleDKMPalettizerConfig] = field(default_factory=ModuleDKMPalettizerConfig)
    module_type_configs: dict = field(default_factory=dict)
    module_name_configs: dict = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.global_config, dict):  # its errors name the field alone (``n_bits=5 is not allowed ...``)
            self.global_config = ModuleDKMPalettizerConfig.from_dict(self.global_config)
        self._normalize()

    def _entry(self, value: Any, where: str, in_type_table: bool = False) -> ModuleConfigEntry:
        """A config, a dict or None; in ``module_type_configs`` also a list of those (chosen by threshold)."""
        if isinstance(value, (list, tuple)):
            if not in_type_table:
                raise TypeError(f"{where}: a list of configs is only allowed for module_type_configs.")
            entries = [self._entry(v, where) for v in value]
            if any(e is None for e in entries):
                raise TypeError(f"{where}: a list entry cannot be None; drop it instead.")
            return entries
        return coerce_entry(value, ModuleDKMPalettizerConfig, where,
                            "a dict, None or a list of those" if in_type_table else "a dict or None")

    # ------------------------------------------------------------------------------------ planning
    def module_config(self, name: str, module: nn.Module) -> Optional[ModuleDKMPalettizerConfig]:
        """The config for the module ``name``: by name, else by type (a list: chosen by threshold), else global."""
        found, entry = self._match((name,), module)
        if not found:
            return self.global_config
        return _by_threshold(entry, module) if isinstance(entry, list) else entry

    def plan(self, model: nn.Module) -> list[PlannedWeight]:
        """Every weight DKM palettizes, with its spec and module config; skipped: weights at or under
        ``weight_threshold`` and leaf modules of unsupported types that hold a ``weight``. Raises ValueError for
        explicit targets that cannot be palettized and for configs that do not fit a weight."""
        modules = dict(model.named_modules())
        self._check_targets(modules, require_match=False)
        planned = []
        for name, module in modules.items():
            if parametrize.is_parametrized(module):
                continue  # prepared already (or parametrized otherwise): left as it is
            cfg = self.module_config(name, module)
            if cfg is None:
                continue
            if not is_supported(module):
                if isinstance(getattr(module, "weight", None), nn.Parameter) and not list(module.children()):
                    planned.append(PlannedWeight(name, module, None, None, cfg,
                                                 reason=f"unsupported module type {type(module).__name__}"))
                continue
            planned.extend(_plan_module(name, module, cfg))
        return planned


def _plan_module(name: str, module: nn.Module, cfg: ModuleDKMPalettizerConfig) -> list[PlannedWeight]:
    planned = []
    for param_name in supported_params(module):
        weight = getattr(module, param_name)
        if weight.numel() <= cfg.weight_threshold:
            planned.append(PlannedWeight(name, module, param_name, None, cfg, reason=(
                f"{weight.numel()} elements <= weight_threshold={cfg.weight_threshold}")))
            continue
        spec = cfg.to_spec(module, weight, full_name(name, param_name))
        planned.append(PlannedWeight(name, module, param_name, spec, cfg))
    return planned


def _by_threshold(entries: list, module: nn.Module) -> Optional[ModuleDKMPalettizerConfig]:
    """Of a type entry's configs, the one with the largest ``weight_threshold`` the module's largest weight exceeds."""
    numel = max([getattr(module, p).numel() for p in supported_params(module)] or [0])
    fitting = [e for e in entries if numel > e.weight_threshold]
    return max(fitting, key=lambda e: e.weight_threshold) if fitting else None


def load_dkm_config(source: Any) -> DKMPalettizerConfig:
    """A DKMPalettizerConfig from a config, a dict, a YAML path/stream, or None (defaults)."""
    return coerce_model_config(source, DKMPalettizerConfig, ModuleDKMPalettizerConfig,
                               "a DKMPalettizerConfig, a dict, a YAML path or None", allow_none=True, allow_yaml=True)

