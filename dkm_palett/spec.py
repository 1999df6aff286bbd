"""PalettizationSpec: the one internal description of how a single tensor is palettized.

Every front door (DKM configs, ``OpPalettizerConfig``, the spec-style ``KMeansPalettizerConfig``) maps onto a
:class:`PalettizationSpec`. The LUT layout, the export paths and the report only ever read this object.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

import torch

from dkm_palett.validation import check_choice, check_int, check_type

#: Bit widths a LUT index may use. Core ML's ``constexpr_lut_to_dense`` holds exactly these.
ALLOWED_N_BITS = (1, 2, 3, 4, 6, 8)

@dataclass(frozen=True)
class LutDtype:
    """One LUT storage dtype: its canonical short name, torch dtype, bits per entry, value range, whether it is
    an integer (quantized, with per-LUT scale and zero point) LUT, and whether Core ML stores it natively."""

    name: str
    torch_dtype: torch.dtype
    bits: int
    max_abs: float  # largest finite magnitude (integer LUTs: of the stored integers)
    is_integer: bool
    coreml_native: bool  # False: Core ML holds it only as an exactly equal fp16 LUT
    aliases: tuple = ()


#: The one table of LUT dtypes; ``lut``, both exports and the configs read it.
LUT_DTYPE_TABLE: dict[str, LutDtype] = {d.name: d for d in (
    LutDtype("f32", torch.float32, 32, 3.4028234663852886e38, False, True, ("fp32", "float32", "float")),
    LutDtype("f16", torch.float16, 16, 65504.0, False, True, ("fp16", "float16", "half")),
    LutDtype("bf16", torch.bfloat16, 16, 3.3895313892515355e38, False, False, ("bfloat16",)),
    LutDtype("i8", torch.int8, 8, 128.0, True, True, ("int8", "qint8")),
    LutDtype("u8", torch.uint8, 8, 255.0, True, True, ("uint8", "quint8")),
    LutDtype("fp8_e4m3", torch.float8_e4m3fn, 8, 448.0, False, False, ("float8_e4m3fn", "e4m3")),
    LutDtype("fp8_e5m2", torch.float8_e5m2, 8, 57344.0, False, False, ("float8_e5m2", "e5m2")),
)}

#: LUT storage dtypes, canonical short names.
LUT_DTYPES = tuple(LUT_DTYPE_TABLE)

_LUT_DTYPE_ALIASES: dict[Any, str] = {
    key: d.name for d in LUT_DTYPE_TABLE.values() for key in (d.name, d.torch_dtype, *d.aliases)
}


def lut_dtype_info(name: str) -> LutDtype:
    """The table row of a canonical LUT dtype name (see :func:`canonical_lut_dtype` for other spellings)."""
    return LUT_DTYPE_TABLE[canonical_lut_dtype(name)]


def canonical_lut_dtype(value: Any, field_name: str = "lut_dtype") -> str:
    """Map any accepted spelling of a LUT dtype (``'int8'``, ``torch.int8``, ``'i8'`` ...) to its short name."""
    if value is None:
        return "f32"
    key = value.lower() if isinstance(value, str) else value
    try:
        return _LUT_DTYPE_ALIASES[key]
    except (KeyError, TypeError):
        raise ValueError(
            f"{field_name}={value!r} is not a supported LUT dtype; allowed: {', '.join(LUT_DTYPES)} "
            f"(or their torch spellings, e.g. 'int8', 'float16', 'float8_e4m3fn')."
        ) from None


@dataclass(frozen=True)
class PerTensorGranularity:
    """One LUT for the whole tensor."""

    def as_dict(self) -> dict:
        return {"type": "per_tensor"}


@dataclass(frozen=True)
class PerGroupedChannelGranularity:
    """One LUT per group of ``group_size`` consecutive channels along ``axis``."""

    axis: int = 0
    group_size: int = 16

    def __post_init__(self):
        check_int("group_size", self.group_size, minimum=1)
        check_int("axis", self.axis, minimum=0)

    def as_dict(self) -> dict:
        return {"type": "per_grouped_channel", "axis": self.axis, "group_size": self.group_size}


Granularity = Union[PerTensorGranularity, PerGroupedChannelGranularity]
GRANULARITIES = ("per_tensor", "per_grouped_channel")


def granularity_from(value: Any, *, group_size: int | None = None, axis: int = 0) -> Granularity:
    """Build a granularity from an instance, a name (``'per_tensor'``) or a dict (``{'type': ..., ...}``)."""
    if isinstance(value, (PerTensorGranularity, PerGroupedChannelGranularity)):
        return value
    if value is None:
        value = "per_tensor"
    if isinstance(value, dict):
        value = dict(value)
        kind = value.pop("type", None)
        unknown = set(value) - {"axis", "group_size"}
        if unknown:
            raise ValueError(f"granularity has unknown keys {sorted(unknown)}; allowed: type, axis, group_size.")
        group_size = value.get("group_size", group_size)
        axis = value.get("axis", axis)
        value = kind
    check_choice("granularity", value, GRANULARITIES)
    if value == "per_tensor":
        return PerTensorGranularity()
    return PerGroupedChannelGranularity(axis=axis, group_size=16 if group_size is None else group_size)


@dataclass(frozen=True)
class QuantizationSpec:
    """How a LUT's entries are quantized (spec-style API). Only ``dtype`` matters for a LUT."""

    dtype: Any = torch.int8
    qscheme: str = "symmetric"

    def __post_init__(self):
        canonical_lut_dtype(self.dtype, "lut_qspec.dtype")
        check_choice("lut_qspec.qscheme", self.qscheme, ("symmetric", "affine", "asymmetric"))


@dataclass(frozen=True)
class PalettizationSpec:
    """How to palettize one tensor.

    n_bits: LUT index width, 2**n_bits entries per LUT.
    granularity: one LUT per tensor, or one per group of channels.
    cluster_dim: length of each LUT entry; >1 clusters ``cluster_dim`` consecutive values along the channel axis.
    lut_dtype: how LUT entries are stored: f32, f16, bf16, i8, u8, fp8_e4m3, fp8_e5m2.
    enable_per_channel_scale: divide each channel by its max-abs before clustering, multiply back after.
    channel_axis: the channel axis used by per-tensor specs for vectors and scales (grouped specs use their own axis).
    lut_qspec: spec-style spelling of a quantized LUT; when given it sets ``lut_dtype``.
    """

    n_bits: int = 4
    granularity: Granularity = field(default_factory=PerTensorGranularity)
    cluster_dim: int = 1
    lut_dtype: str = "f32"
    enable_per_channel_scale: bool = False
    channel_axis: int = 0
    lut_qspec: QuantizationSpec | None = None

    def __post_init__(self):
        check_choice("n_bits", self.n_bits, ALLOWED_N_BITS)
        check_int("cluster_dim", self.cluster_dim, minimum=1)
        check_int("channel_axis", self.channel_axis, minimum=0)
        check_type("enable_per_channel_scale", self.enable_per_channel_scale, bool)
        object.__setattr__(self, "granularity", granularity_from(self.granularity))
        qspec = self.lut_qspec
        if qspec is not None and not isinstance(qspec, QuantizationSpec):
            qspec = QuantizationSpec(**qspec) if isinstance(qspec, dict) else QuantizationSpec(dtype=qspec)
            object.__setattr__(self, "lut_qspec", qspec)
        lut_dtype = canonical_lut_dtype(qspec.dtype if qspec is not None else self.lut_dtype)
        object.__setattr__(self, "lut_dtype", lut_dtype)

    @property
    def n_clusters(self) -> int:
        return 2 ** self.n_bits

    @property
    def axis(self) -> int:
        """The channel axis: groups, vectors and per-channel scales all run along it."""
        if isinstance(self.granularity, PerGroupedChannelGranularity):
            return self.granularity.axis
        return self.channel_axis

    @property
    def grouped(self) -> bool:
        return isinstance(self.granularity, PerGroupedChannelGranularity)

    def group_size_for(self, shape: tuple[int, ...]) -> int:
        """Channels per LUT for a tensor of ``shape`` (the whole axis for per-tensor)."""
        return self.granularity.group_size if self.grouped else shape[self.axis]

    def check_shape(self, shape: tuple[int, ...], name: str = "weight") -> None:
        """Raise ValueError when this spec cannot palettize a tensor of ``shape``."""
        shape = tuple(shape)
        axis = self.axis
        if axis >= len(shape):
            raise ValueError(f"{name}: channel axis {axis} is out of range for a tensor of shape {shape}.")
        channels = shape[axis]
        group_size = self.group_size_for(shape)
        if channels % group_size:
            raise ValueError(
                f"{name}: group_size={group_size} does not divide the {channels} channels along axis {axis} "
                f"(shape {shape}); pick a divisor of {channels}."
            )
        if group_size % self.cluster_dim:
            raise ValueError(
                f"{name}: cluster_dim={self.cluster_dim} does not divide the {group_size} channels per LUT along "
                f"axis {axis} (shape {shape}); pick a divisor of {group_size}."
            )

    def as_dict(self) -> dict:
        return {
            "n_bits": self.n_bits,
            "granularity": self.granularity.as_dict(),
            "cluster_dim": self.cluster_dim,
            "lut_dtype": self.lut_dtype,
            "enable_per_channel_scale": self.enable_per_channel_scale,
            "channel_axis": self.channel_axis,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "PalettizationSpec":
        from dkm_palett.validation import check_keys

        check_keys("PalettizationSpec", data, {f for f in cls.__dataclass_fields__})
        return cls(**data)


def default_weight_palettization_spec() -> PalettizationSpec:
    """4-bit, per-tensor, scalar LUT: the default for ``weight`` and ``in_proj_weight``."""
    return PalettizationSpec()
