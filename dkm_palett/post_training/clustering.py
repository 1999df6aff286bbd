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


def cluster_weight(weight: torch.Tensor, spec: PalettizationSpec, *, mode: str = "kmeans",
                   importance: Optional[torch.Tensor] = None, seed: int = 0, name: str = "weight",
                   fixed_bits: bool = True) -> tuple[Optional[PalettizedTensor], Optional[str]]:
    """Cluster ``weight`` per LUT group as ``spec`` says. Returns ``(record, None)``, or ``(None, reason)`` when
    ``mode='unique'`` finds too many distinct values. ``importance`` (same shape as ``weight``, >= 0) weights the
    squared error of each element (scaled by the per-channel scale squared when that is enabled)."""
    check_finite(name, weight)
    spec.check_shape(tuple(weight.shape), name)
    vectors, imp, scale = _grouped_inputs(weight, spec, importance, name)
    if mode == "unique":
        lut, spec, reason = _unique_lut(vectors, spec, fixed_bits)
        if lut is None:
            return None, reason
        return palettize_with_lut(weight, lut, spec, scale), None
    generator = torch.Generator().manual_seed(int(seed))
    method = "uniform" if mode == "uniform" else "auto"
    luts = [km.kmeans(vectors[g], spec.n_clusters, None if imp is None else imp[g], method=method,
                      generator=generator, n_init=VECTOR_N_INIT, max_iter=VECTOR_MAX_ITER)
            for g in range(vectors.shape[0])]
    return palettize_with_lut(weight, torch.stack(luts).float(), spec, scale), None


def _grouped_inputs(weight: torch.Tensor, spec: PalettizationSpec, importance: Optional[torch.Tensor], name: str):
    """``(vectors (G, M, D), importance (G, M) or None, per-channel scale or None)`` of ``weight`` for ``spec``."""
    w = weight.detach().float().cpu()
    shape, axis, dim = tuple(w.shape), spec.axis, spec.cluster_dim
    group_size = spec.group_size_for(shape)
    scale = channel_scale(w, axis) if spec.enable_per_channel_scale else None
    scaled = w if scale is None else w / broadcast_scale(scale, shape, axis)
    vectors = to_grouped_vectors(scaled, axis, group_size, dim)
    if importance is None:
        return vectors, None, scale
    if tuple(importance.shape) != shape:
        raise ValueError(f"{name}: importance has shape {tuple(importance.shape)}, expected {shape}.")
    imp = importance.detach().float().cpu().clamp(min=0)
    if scale is not None:
        imp = imp * broadcast_scale(scale, shape, axis) ** 2
    return vectors, to_grouped_vectors(imp, axis, group_size, dim).sum(-1), scale


def _unique_lut(vectors: torch.Tensor, spec: PalettizationSpec, fixed_bits: bool):
    """``(lut, spec, None)`` holding each group's distinct values, or ``(None, spec, reason)`` when they do not fit."""
    uniques = [torch.unique(vectors[g], dim=0) for g in range(vectors.shape[0])]
    most = max(u.shape[0] for u in uniques)
    if most > MAX_UNIQUE:
        return None, spec, f"mode='unique': {most} distinct values (more than {MAX_UNIQUE}); left as is."
    if fixed_bits:
        if most > spec.n_clusters:
            return None, spec, f"mode='unique': {most} distinct values do not fit nbits={spec.n_bits}; left as is."
    else:
        spec = dataclasses.replace(spec, n_bits=next(b for b in ALLOWED_N_BITS if 2 ** b >= most))
    return torch.stack([km.pad_centroids(u, spec.n_clusters).float() for u in uniques]), spec, None
