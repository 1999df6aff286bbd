"""Which DKM implementation a layer runs this step (:meth:`dkm_palett.fake_palettize.FakePalettize.engine`).

* ``"fused"``: exact DKM in numba kernels (scalar LUTs, ``dkm`` mode, float32 weights on CPU);
* ``"dense"``: exact chunked torch DKM (everything else: vectors, ``gsm``/``hard``, GPUs, other dtypes);
* ``"binned"``: scalar DKM on a histogram (:mod:`dkm_palett.dkm_binned`): exact for fp16/bf16 weights (one bin per
  distinct value); for fp32 a grid from tau and the centroid spacing that bounds the error
  (:func:`dkm_palett.dkm_binned.grid_points`).

``dkm_impl="auto"`` picks by measured speed. Binned over exact step speed, one ``Linear(d, d)`` at batch 64 (2
threads): 4 bits 0.8x at 64k weights, 1.45x at 147k, 1.5x at 262k, 2.8x at 1M; 3 bits 1.0x at 262k and 1.6x at 1M;
2 bits about 1.1x at 1M (the exact kernels' cost grows with the centroids, the grid's does not). On whole
decoders at 4 bits the binned step was 1.5-1.75x faster than exact (``benchmarks/results/model_scale.md``).
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from dkm_palett.dkm_binned import ValueRange, grid_points

MAX_GRID_ENTRIES = 1 << 22  # binned DKM: at most this many grid points over all LUTs (float64 per-point cubics)
FUSED_MAX_CLUSTERS = 17  # auto: exact fused kernels up to 4 bits (+ an extra centroid) on LUTs under BINNED_MIN_POINTS
FUSED_ALWAYS_MAX_CLUSTERS = 5  # auto: exact fused kernels at 2 bits (+ an extra centroid) on LUTs of any size
BINNED_MIN_POINTS = 1 << 18  # auto at 3-4 bits: the bounded binned DKM from this many weights a LUT
_log = logging.getLogger(__name__)


def choose(cfg, cluster_dim: int, n_clusters: int, x: torch.Tensor, c0: torch.Tensor,
           exact_dtype: Optional[torch.dtype], weighted: bool, name: str,
           bounds: Optional[ValueRange] = None) -> tuple[str, int]:
    """``(engine, grid points)`` for one DKM forward of the layer ``name`` with settings ``cfg``, grouped weights
    ``x (G, N, cluster_dim)`` (``bounds``: the :class:`ValueRange` of ``x[..., 0]`` the grid will use), start
    centroids ``c0``, ``exact_dtype`` (fp16/bf16 weights that bin exactly, else None) and ``weighted`` (sensitivity
    weights on). ``grid points`` is 0 except for the fp32 grid."""
    exact = "fused" if x.device.type == "cpu" and x.dtype == torch.float32 else "dense"
    if cluster_dim != 1 or cfg.palett_mode != "dkm":
        return "dense", 0
    if cfg.dkm_impl == "dense":
        return exact, 0
    if exact_dtype is not None:  # exact bins per fp16/bf16 value (they take no sensitivity weights)
        return (exact, 0) if weighted else ("binned", 0)
    if cfg.dkm_impl == "auto" and exact == "fused" and n_clusters <= FUSED_MAX_CLUSTERS and (
            n_clusters <= FUSED_ALWAYS_MAX_CLUSTERS or x.shape[1] < BINNED_MIN_POINTS):
        return exact, 0  # before grid_points (its centroid sort; without bounds, a range pass)
    bins = grid_points(x[..., 0], c0, cfg.palett_tau, bounds)
    if cfg.dkm_impl == "binned":
        cap = max(16, MAX_GRID_ENTRIES // x.shape[0])
        if bins > cap:
            _log.warning("%s: dkm_impl='binned' needs %d grid points per LUT for its error bound; capped at %d "
                         "(the bound may not hold). dkm_impl='auto' or 'dense' runs exact DKM here.", name, bins, cap)
        return "binned", min(bins, cap)
    if bins <= min(cfg.dkm_bins, x.shape[1] // 4):
        return "binned", bins
    return exact, 0
