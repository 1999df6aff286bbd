"""Clustering one weight for post-training palettization: per LUT group, exact 1-D k-means for scalar LUTs,
k-means++ with restarts for vector LUTs, an evenly spaced LUT (``uniform``) or the distinct values (``unique``)."""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from dkm_palett import kmeans as km
from dkm_palett.lut import PalettizedTensor, broadcast_scale, channel_scale, palettize_with_lut, to_grouped_vectors
from dkm_palett.spec import ALLOWED_N_BITS, PalettizationSpec
from dkm_palett.validation import check_finite

MAX_UNIQUE = 256
VECTOR_N_INIT = 4
VECTOR_MAX_ITER = 50


def kmeans_1d(values: torch.Tensor, k: int, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Weighted 1-D k-means, exact at every size (``kmeans.kmeans_1d_exact``); all-zero weights count as
    uniform. Returns ``k`` sorted float32 centroids."""
    values = values.detach().reshape(-1)
    if weights is not None:
        weights = weights.detach().reshape(-1)
        if values.numel() and not bool((weights > 0).any()):
            weights = None
    return km.kmeans_1d_exact(values, k, weights)


def cluster_weight(weight: torch.Tensor, spec: PalettizationSpec, *, mode: str = "kmeans",
                   importance: Optional[torch.Tensor] = None, seed: int = 0, name: str = "weight",
                   fixed_bits: bool = True) -> tuple[Optional[PalettizedTensor], Optional[str]]:
    """Cluster ``weight`` per LUT group as ``spec`` says. Returns ``(record, None)``, or ``(None, reason)`` when
    ``mode='unique'`` finds too many distinct values. ``importance`` (same shape as ``weight``, >= 0) weights the
    squared error of each element (scaled by the per-channel scale squared when that is enabled)."""
    check_finite(name, weight)
    spec.check_shape(tuple(weight.shape), name)
    w = weight.detach().float().cpu()
    shape, axis, dim = tuple(w.shape), spec.axis, spec.cluster_dim
    group_size = spec.group_size_for(shape)
    scale = channel_scale(w, axis) if spec.enable_per_channel_scale else None
    scaled = w if scale is None else w / broadcast_scale(scale, shape, axis)
    vectors = to_grouped_vectors(scaled, axis, group_size, dim)  # (G, M, D)
    imp = None
    if importance is not None:
        if tuple(importance.shape) != shape:
            raise ValueError(f"{name}: importance has shape {tuple(importance.shape)}, expected {shape}.")
        imp_t = importance.detach().float().cpu().clamp(min=0)
        if scale is not None:
            imp_t = imp_t * broadcast_scale(scale, shape, axis) ** 2
        imp = to_grouped_vectors(imp_t, axis, group_size, dim).sum(-1)  # (G, M)

    if mode == "unique":
        uniques = [torch.unique(vectors[g], dim=0) for g in range(vectors.shape[0])]
        most = max(u.shape[0] for u in uniques)
        if most > MAX_UNIQUE:
            return None, f"mode='unique': {most} distinct values (more than {MAX_UNIQUE}); left as is."
        if fixed_bits:
            if most > spec.n_clusters:
                return None, (f"mode='unique': {most} distinct values do not fit nbits={spec.n_bits}; left as is.")
        else:
            spec = dataclasses.replace(spec, n_bits=next(b for b in ALLOWED_N_BITS if 2 ** b >= most))
        lut = torch.stack([_pad_rows(u, spec.n_clusters) for u in uniques])
        return palettize_with_lut(weight, lut, spec, scale), None

    k = spec.n_clusters
    generator = torch.Generator().manual_seed(int(seed))
    luts = []
    for g in range(vectors.shape[0]):
        v = vectors[g]
        wg = None if imp is None else imp[g]
        if mode == "uniform":
            lo, hi = v.min().item(), v.max().item()
            luts.append(torch.linspace(lo, hi, k).reshape(k, 1))
        elif dim == 1:
            luts.append(kmeans_1d(v[:, 0], k, wg).reshape(k, 1))
        else:
            luts.append(_vector_kmeans(v, k, wg, generator))
    lut = torch.stack(luts).float()
    return palettize_with_lut(weight, lut, spec, scale), None


def _pad_rows(rows: torch.Tensor, k: int) -> torch.Tensor:
    reps = torch.arange(k) % rows.shape[0]
    return rows[reps].float()


def _vector_kmeans(v: torch.Tensor, k: int, weights: Optional[torch.Tensor], generator: torch.Generator):
    """k-means++ seeding with restarts + Lloyd for ``cluster_dim > 1`` (``kmeans.kmeans_plus_plus``)."""
    uniq = torch.unique(v, dim=0)
    if uniq.shape[0] <= k:
        return _pad_rows(uniq, k)
    return km.kmeans_plus_plus(v, k, weights, n_init=VECTOR_N_INIT, max_iter=VECTOR_MAX_ITER,
                                generator=generator).float()
