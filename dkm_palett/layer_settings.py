"""The frozen settings one DKM layer (:class:`~dkm_palett.fake_palettize.FakePalettize`) reads."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

from dkm_palett.config.training import ModuleDKMPalettizerConfig


@dataclass(frozen=True)
class DKMLayerSettings:
    """What one DKM layer reads, fixed when the model is prepared: the DKM fields of the user's
    :class:`~dkm_palett.config.training.ModuleDKMPalettizerConfig` (same names and meanings), kept apart from the
    user config as torchao keeps its config apart from its fake quantizer. The layout fields (bits,
    granularity, cluster_dim, LUT dtype, scale) are in the layer's :class:`~dkm_palett.spec.PalettizationSpec`.

    No defaults here: :meth:`from_config` copies every field, so the config is the one place that holds them."""

    milestone: int
    palett_mode: str
    palett_tau: float
    palett_epsilon: float
    palett_lambda: float
    kmeans_max_iter: int
    kmeans_init: str
    kmeans_opt1d_threshold: int
    palett_max_mem: float
    palett_cluster_tol: float
    dkm_impl: str
    dkm_bins: int
    add_extra_centroid: bool
    enforce_zero: bool
    prune_threshold: float
    quant_min: int
    quant_max: int
    total_steps: Optional[int]
    hard_fraction: float
    finalize_lut: str
    sensitivity_weighted: bool

    @classmethod
    def from_config(cls, config: ModuleDKMPalettizerConfig) -> "DKMLayerSettings":
        """The settings of a validated module config."""
        if not isinstance(config, ModuleDKMPalettizerConfig):
            raise TypeError(f"config must be a ModuleDKMPalettizerConfig, got {type(config).__name__}.")
        return cls(**{f.name: getattr(config, f.name) for f in fields(cls)})
