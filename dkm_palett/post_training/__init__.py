"""Post-training (data-free) and sensitivity-weighted (data-aware) palettization of PyTorch modules.

* :func:`palettize_weights` -- coremltools ``optimize.coreml`` style (``OptimizationConfig`` of ``OpPalettizerConfig``).
* :class:`KMeansPalettizer` -- spec-style (``KMeansPalettizerConfig``), ``prepare(example_inputs, num_workers)``.
* :class:`SensitiveKMeansPalettizer` -- k-means weighted by a Fisher diagonal from calibration batches.

Scalar LUTs (``cluster_dim=1``) are globally optimal weighted 1-D k-means at every tensor size
(:func:`dkm_palett.kmeans.kmeans_1d_exact`, through the one dispatcher :func:`dkm_palett.kmeans.kmeans`); vector LUTs use k-means++ with restarts.

All three attach a :class:`~dkm_palett.lut.PalettizedTensor` per weight as a
:class:`~dkm_palett.palettized_weight.PalettizedWeight` (``palettized_weight.attach``), so their output has the
same form as a DKM-finalized model and the same export paths apply.
"""

from dkm_palett.post_training.api import KMeansPalettizer, palettize_weights
from dkm_palett.post_training.clustering import cluster_weight
from dkm_palett.post_training.jobs import PalettizationJob, run_jobs
from dkm_palett.post_training.sensitivity import SensitiveKMeansPalettizer

__all__ = [
    "palettize_weights",
    "cluster_weight",
    "KMeansPalettizer",
    "SensitiveKMeansPalettizer",
    "PalettizationJob",
    "run_jobs",
]
