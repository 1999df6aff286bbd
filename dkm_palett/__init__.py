"""dkm_palett: palettization (weight clustering) for PyTorch, trained with DKM, exported to Core ML."""

from dkm_palett.config.palettize_weights import OpPalettizerConfig, OptimizationConfig
from dkm_palett.config.training import DKMPalettizerConfig, ModuleDKMPalettizerConfig
from dkm_palett.config.kmeans_palettizer import (
    KMeansPalettizerConfig,
    ModuleKMeansPalettizerConfig,
    OpKMeansPalettizerConfig,
)
from dkm_palett.fake_palettize import FakePalettize
from dkm_palett.export import export_coreml, load_compressed, read_back_lut_weights, save_compressed
from dkm_palett.lut import PalettizedTensor
from dkm_palett.palettized_weight import PalettizedWeight, palettized_tensors
from dkm_palett.palettizer import DKMPalettizer
from dkm_palett.mixed_bits import plan_bits
from dkm_palett.post_training import KMeansPalettizer, SensitiveKMeansPalettizer, palettize_weights
from dkm_palett.spec import PalettizationSpec

__all__ = [
    "DKMPalettizer", "plan_bits", "DKMPalettizerConfig", "ModuleDKMPalettizerConfig", "FakePalettize",
    "palettize_weights", "OpPalettizerConfig", "OptimizationConfig",
    "KMeansPalettizer", "KMeansPalettizerConfig", "ModuleKMeansPalettizerConfig", "OpKMeansPalettizerConfig",
    "SensitiveKMeansPalettizer", "PalettizationSpec", "PalettizedTensor", "PalettizedWeight",
    "palettized_tensors",
    "export_coreml", "save_compressed", "load_compressed", "read_back_lut_weights",
]
