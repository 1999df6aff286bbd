"""FakePalettize: the DKM layer, registered as a parametrization on a module's weight."""

from __future__ import annotations

import math
import zlib
from typing import Optional

import torch
from torch import nn

from dkm_palett import kmeans as km
from dkm_palett import engine_choice, recompute
from dkm_palett.kmeans.histogram import histogram_points
from dkm_palett.budget import MemoryBudget
from dkm_palett.config.training import ModuleDKMPalettizerConfig
from dkm_palett.dkm_binned import BinnedDKM, ValueRange
from dkm_palett.dkm_math import DenseDKM, DKMParams, chunk_rows
from dkm_palett.dkm_sensitivity import Sensitivity, active_weights, factor_shapes
from dkm_palett.layer_settings import DKMLayerSettings
from dkm_palett.lut import (
    PalettizedTensor,
    broadcast_scale,
    channel_scale,
    from_grouped_vectors,
    nearest_entry,
    palettize_with_lut,
    round_lut,
    to_grouped_vectors,
)
from dkm_palett.progress import LayerProgress
from dkm_palett.schedule import cluster_means
from dkm_palett.spec import ALLOWED_N_BITS, PalettizationSpec
from dkm_palett.validation import check_finite

_INIT_POINTS = 2 ** 16  # k-means initialisation runs on at most this many (weighted) points per LUT


class FakePalettize(nn.Module):
    """Differentiable k-means palettization of one weight (a ``torch.nn.utils.parametrize`` parametrization).

    In training it runs DKM: soft attention to the centroids, ``kmeans_max_iter`` centroid updates warm-started
    from the previous step, output ``A @ C``. In eval it snaps each weight to its nearest (stored-dtype) centroid,
    exactly what :meth:`to_palettized` (and so ``finalize``) produces. Disabled (before the milestone) it is the
    identity. State lives in persistent buffers so checkpoints carry it.
    """

    #: Recompute the palettized weight in backward instead of letting the module's matmul keep it (4 bytes a
    #: weight until the layer's backward); False keeps it and saves one DKM forward per layer and step.
    recompute = True
    #: Before a module's DKM backward on CPU, give the C heap's free memory back to the OS once it grew by more than
    #: 256 MiB since the last trim, and always before a module of at least 32 MB (glibc's ``malloc_trim``; see
    #: :mod:`dkm_palett.heap`). It lowers the peak.
    trim_heap = True

    def __init__(self, spec: PalettizationSpec, settings: DKMLayerSettings, shape: tuple[int, ...],
                 name: str = "weight"):
        super().__init__()
        if not isinstance(settings, DKMLayerSettings):
            raise TypeError(f"settings must be DKMLayerSettings (DKMLayerSettings.from_config(module_config)), got "
                            f"{type(settings).__name__}.")
        self.spec = spec
        self.settings = settings
        self.name = name
        self.shape = tuple(shape)
        self.axis = spec.axis
        self.group_size = spec.group_size_for(self.shape)
        n_groups = self.shape[self.axis] // self.group_size
        self.n_clusters = spec.n_clusters + (1 if settings.add_extra_centroid else 0)
        zero_index = None
        if settings.add_extra_centroid:
            zero_index = self.n_clusters - 1
        self.register_buffer("centroids", torch.zeros(n_groups, self.n_clusters, spec.cluster_dim))
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("enabled", torch.tensor(settings.milestone == 0))
        self.register_buffer("zero_index", torch.tensor(-1 if zero_index is None else zero_index))
        self.register_buffer("steps", torch.tensor(0, dtype=torch.int64))
        self.register_buffer("last_error", torch.tensor(float("nan")))
        #: sensitivity_weighted, resolved for this layer's n_bits ("auto": on at 2 bits)
        self.sensitivity_weighted = ModuleDKMPalettizerConfig.sensitivity_weighted_at(settings.sensitivity_weighted,
                                                                                      spec.n_bits)
        if self.sensitivity_weighted:  # dkm_palett.dkm_sensitivity: factored, rows + cols numbers a weight matrix
            rows, cols = factor_shapes(n_groups, math.prod(self.shape) // n_groups // spec.cluster_dim,
                                       self.group_size, spec.cluster_dim)
            self.register_buffer("sensitivity_rows", torch.zeros(rows))
            self.register_buffer("sensitivity_cols", torch.zeros(cols))
            self.register_buffer("sensitivity_pending_rows", torch.zeros(rows))
            self.register_buffer("sensitivity_pending_cols", torch.zeros(cols))
            self.register_buffer("sensitivity_folds", torch.tensor(0, dtype=torch.int64))
        self._seed = zlib.crc32(name.encode())
        self.init_progress: Optional[LayerProgress] = None  # set by DKMPalettizer: one bar over the layers' inits
        #: palett_max_mem's budget; DKMPalettizer.prepare gives all layers of a model the same one
        self.memory_budget = MemoryBudget()
        #: set by DKMPalettizer.step(): whether this step is in the hard phase (dkm_palett.schedule)
        self.hard = False

    # ------------------------------------------------------------------------------------ helpers
    @property
    def index_bits(self) -> int:
        """Index width at export: ``n_bits``, or the next width Core ML holds when an extra centroid was added."""
        need = math.ceil(math.log2(self.n_clusters))
        return min(b for b in ALLOWED_N_BITS if b >= need)

    def params(self) -> DKMParams:
        cfg = self.settings
        zi = int(self.zero_index)
        return DKMParams(
            tau=cfg.palett_tau, mode=cfg.palett_mode, max_iter=cfg.kmeans_max_iter, epsilon=cfg.palett_epsilon,
            lam=cfg.palett_lambda, zero_index=None if zi < 0 else zi, lut_dtype=self.spec.lut_dtype,
            quant_min=cfg.quant_min, quant_max=cfg.quant_max, seed=self._seed + int(self.steps),
        )

    def sensitivity(self) -> Optional[Sensitivity]:
        """The centroid-update weights (``sensitivity_weighted``), or None."""
        if not self.sensitivity_weighted:
            return None
        return Sensitivity(self.sensitivity_rows, self.sensitivity_cols, self.sensitivity_pending_rows,
                           self.sensitivity_pending_cols, active=int(self.sensitivity_folds) > 0)

    @torch.no_grad()
    def fold_sensitivity(self) -> None:
        """Once a training step (``DKMPalettizer.step()``): fold this step's squared gradients into the estimate."""
        if self.sensitivity_weighted:
            Sensitivity.fold(self.sensitivity_rows, self.sensitivity_cols, self.sensitivity_pending_rows,
                             self.sensitivity_pending_cols, self.sensitivity_folds)

    def _prepare_input(self, weight: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Prune, scale and regroup the weight into ``(G, N, D)`` float32 vectors (differentiable)."""
        w = weight.float()
        if self.settings.prune_threshold > 0:
            w = torch.nn.functional.hardshrink(w, self.settings.prune_threshold)
        scale = None
        if self.spec.enable_per_channel_scale:
            scale = channel_scale(w.detach(), self.axis)
            w = w / broadcast_scale(scale, self.shape, self.axis)
        return to_grouped_vectors(w, self.axis, self.group_size, self.spec.cluster_dim), scale

    def _finish_output(self, out: torch.Tensor, scale: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        dense = from_grouped_vectors(out, self.shape, self.axis, self.group_size)
        if scale is not None:
            dense = dense * broadcast_scale(scale, self.shape, self.axis)
        return dense.to(dtype)

    def _budget(self, device: torch.device) -> float:
        """The DKM memory this layer may use now (shared with the model's other layers, see budget.py)."""
        return self.memory_budget.free(self.settings.palett_max_mem, device)

    def engine(self, weight: torch.Tensor, x: torch.Tensor, c0: torch.Tensor,
               bounds: Optional[ValueRange] = None) -> tuple[str, int]:
        """``(name, grid points)`` of the DKM implementation for this step (:func:`engine_choice.choose`)."""
        return engine_choice.choose(self.settings, self.spec.cluster_dim, self.n_clusters, x, c0,
                                    self._exact_dtype(weight), self.sensitivity_weighted, self.name, bounds)

    def _exact_dtype(self, weight: torch.Tensor) -> Optional[torch.dtype]:
        """fp16/bf16 weights (unscaled): the binned DKM then keeps one bin per distinct value and is exact."""
        if weight.dtype in (torch.float16, torch.bfloat16) and not self.spec.enable_per_channel_scale:
            return weight.dtype
        return None

    # ------------------------------------------------------------------------------------ init
    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """k-means on the first enabled forward, per LUT group, with ``kmeans_init``."""
        cfg = self.settings
        groups, _, dim = x.shape
        k = self.n_clusters - (1 if cfg.add_extra_centroid else 0)
        gen = torch.Generator().manual_seed(self._seed)
        out = torch.zeros(groups, self.n_clusters, dim)
        method = self._init_method(dim)
        for g in range(groups):
            points, weights = _compress_points(x[g].float().cpu(), gen)
            out[g, :k] = km.kmeans(points, k, weights, method=method, generator=gen).reshape(k, dim)
        if (cfg.enforce_zero or cfg.prune_threshold > 0) and not cfg.add_extra_centroid:
            # Each group's own centroid nearest 0 moves to entry 0 and becomes exactly 0 (DKM pins one index for
            # all groups). With prune_threshold this keeps the pruned weights exactly 0 after finalize.
            rows, near = torch.arange(groups), out.norm(dim=-1).argmin(dim=1)
            out[rows, near] = out[rows, 0]
            out[rows, 0] = 0
            self.zero_index.fill_(0)
        self.centroids.copy_(out.to(self.centroids.device))
        self.initialized.fill_(True)
        if self.init_progress is not None:
            self.init_progress.update(self.name)

    def _init_method(self, dim: int) -> str:
        """The :func:`dkm_palett.kmeans.kmeans` method for ``kmeans_init`` (coremltools' names for k-means++
        use exact 1-D k-means for scalar LUTs on weights with at least ``kmeans_opt1d_threshold`` channels)."""
        method = self.settings.kmeans_init
        if method in ("auto", "cpu.kmeans++", "kmeans++", "kmeans_pp", "efficient_kmeans"):
            use_opt1d = dim == 1 and self.shape[self.axis] >= self.settings.kmeans_opt1d_threshold
            return "opt1d" if use_opt1d else "kmeans++"
        if method == "opt1d" and dim > 1:
            return "kmeans++"
        if method == "uniform" and dim > 1:
            raise ValueError(f"{self.name}: kmeans_init='uniform' needs cluster_dim=1.")
        return method

    @torch.no_grad()
    def split_duplicates(self, x: torch.Tensor) -> int:
        """palett_cluster_tol: move centroids closer than ``tol * range / K`` to the worst-fit weight vector."""
        tol = self.settings.palett_cluster_tol
        if tol <= 0:
            return 0
        moved = 0
        zi = int(self.zero_index)
        for g in range(self.centroids.shape[0]):
            c = self.centroids[g]
            spread = (x[g].amax(0) - x[g].amin(0)).norm().item()
            limit = tol * spread / self.n_clusters
            dist = torch.cdist(c, c)
            dist.fill_diagonal_(float("inf"))
            dup = torch.triu(dist < limit, diagonal=1).any(dim=0).nonzero().flatten().tolist()
            dup = [j for j in dup if j != zi]
            if not dup:
                continue
            for j, worst in zip(dup, _worst_fit(x[g], c, len(dup)).tolist()):
                c[j] = x[g, worst]
                moved += 1
        return moved

    # ------------------------------------------------------------------------------------ forward
    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not bool(self.enabled):
            return weight
        try:
            return self._palettize(weight)
        except AttributeError as err:  # parametrized attribute access would mask it as "no attribute 'weight'"
            raise RuntimeError(f"{self.name}: DKM forward failed: {err}") from err

    def _palettize(self, weight: torch.Tensor) -> torch.Tensor:
        x, scale = self._prepare_input(weight)
        bounds = self._checked_range(weight, x)
        if not bool(self.initialized):
            self.initialize(x.detach())
        if not self.training or self.hard:
            return self._finish_output(self._snap(x), scale, weight.dtype)
        self.split_duplicates(x.detach())
        p = self.params()
        c0 = self.centroids.to(x.dtype).clone()
        choice = self.engine(weight, x, c0, bounds)
        # palett_max_mem: half of the budget for the chunk working set, half for the attention cache (the fused
        # kernels use neither: fixed blocks, nothing kept, so they skip reading the free memory)
        budget = 0.0 if choice[0] == "fused" else self._budget(x.device) / 2
        rows = chunk_rows(self.n_clusters, self.spec.cluster_dim, budget, x.shape[0])
        out, c = self._dkm(x, c0, p, rows, budget, choice, weight, bounds)
        dense = getattr(out.grad_fn, "engine", None)  # the dense engine keeps its attention for backward
        if dense is not None and dense.cache is not None:
            self.memory_budget.hold(dense, dense.cache_size(self.n_clusters))
        with torch.no_grad():
            self.centroids.copy_(c)
            self.steps += 1
            sq_error = getattr(out.grad_fn, "sq_error", None)  # fused, grid binned: summed in the output pass
            self.last_error.fill_(_rms_difference(out, x) if sq_error is None else math.sqrt(sq_error / x.numel()))
        result = self._finish_output(out, scale, weight.dtype)
        if self.recompute and torch.is_grad_enabled() and result.requires_grad:
            replay = getattr(out.grad_fn, "replay", None)  # fused, binned: the output pass only, from the weight
            recompute.register_output(result, weight, lambda: self._replay(weight, c0, p, rows, choice, replay))
        return result

    def _checked_range(self, weight: torch.Tensor, x: torch.Tensor) -> Optional[ValueRange]:
        """Raise ValueError if the weight holds NaN or Inf. For scalar LUTs the check is the :class:`ValueRange` of
        the grouped weights ``x``, returned for the engine choice and the grid to share: one pass over the weight
        for all three (a 1.1B decoder spends about 0.2 s a step on each pass: 12-15 ms per 64M weights)."""
        if self.spec.cluster_dim > 1:
            check_finite(self.name, weight.detach())
            return None
        bounds = ValueRange(x.detach()[..., 0])
        if not bounds.finite():
            check_finite(self.name, weight.detach())  # raises, with the count
            raise ValueError(f"{self.name}: the weight is finite, but scaled per channel it holds NaN/Inf; "
                             "check the weight's per-channel scale (enable_per_channel_scale).")
        return bounds

    def _snap(self, x: torch.Tensor) -> torch.Tensor:
        """Each weight vector snapped to its entry of the LUT finalize ships (:meth:`final_lut`; in the hard phase of
        :mod:`dkm_palett.schedule` always the clusters' means), exactly its values forward, a straight-through
        gradient. A pure function of the weight and the centroids, so a module that reads its weight twice in one
        forward sees the same values; the hard phase moves the centroids in :meth:`advance`, once per step."""
        cfg = self.settings
        centroids = self.final_lut(x.detach(), mean=self.training or None)
        lut = round_lut(centroids, self.spec.lut_dtype, cfg.quant_min, cfg.quant_max)
        idx = nearest_entry(x.detach(), lut)
        hard = torch.gather(lut, 1, idx.unsqueeze(-1).expand(-1, -1, lut.shape[-1]))
        return hard + (x - x.detach())  # exactly the LUT values forward (x + (hard - x) may round), identity backward

    @torch.no_grad()
    def advance(self, weight: torch.Tensor) -> None:
        """The hard phase's LUT update, once per training step (``DKMPalettizer.step()``): the centroids move to the
        means of the weights nearest to them (one Lloyd step)."""
        x = self._prepare_input(weight.detach())[0]
        if not bool(self.initialized):
            self.initialize(x)
        self.centroids.copy_(self.final_lut(x, mean=True))
        self.steps += 1

    def _dkm(self, x, c0, p: DKMParams, rows: int, budget: float, choice: tuple[str, int], weight: torch.Tensor,
             bounds: Optional[ValueRange] = None):
        """One DKM forward with the implementation ``choice`` from :meth:`engine` (``bounds``: ``x``'s range)."""
        name, bins = choice
        if name == "fused":
            from dkm_palett.dkm_fused import FusedDKM  # numba: imported (and compiled, or loaded from cache) on use

            return FusedDKM.apply(x, c0, p, self.sensitivity())
        if name == "binned":
            return BinnedDKM.apply(x, c0, p, bins, self._exact_dtype(weight), rows, self.sensitivity(), bounds)
        return DenseDKM.apply(x, c0, p, rows, budget, self.sensitivity())

    def _replay(self, weight: torch.Tensor, c0: torch.Tensor, p: DKMParams, rows: int, choice,
                replay=None) -> torch.Tensor:
        """The training output of :meth:`_palettize` again, from the same weight and centroids (no updates): the
        saved-tensor hooks of :mod:`dkm_palett.recompute` call it in backward instead of keeping the output. With
        the engine's ``replay`` (fused and binned) only the output pass runs again (not the k-means iterations)."""
        x, scale = self._prepare_input(weight.detach())
        if replay is not None:
            out = replay(x)
        else:
            out, _ = self._dkm(x, c0, p, rows, 0.0, choice, weight)
        return self._finish_output(out, scale, weight.dtype)

    # ------------------------------------------------------------------------------------ finalize
    @torch.no_grad()
    def final_lut(self, x: torch.Tensor, mean: Optional[bool] = None) -> torch.Tensor:
        """The centroids ``(G, K, D)`` finalize ships for the grouped weights ``x``: DKM's, or with
        ``finalize_lut="mean"`` (or ``mean=True``) each moved to the mean of the weights nearest to it (one Lloyd
        step, the best LUT for that assignment; :func:`dkm_palett.schedule.cluster_means`). Leaves the state alone."""
        if not (self.settings.finalize_lut == "mean" if mean is None else mean):
            return self.centroids
        zi, cfg, sens = int(self.zero_index), self.settings, self.sensitivity()
        return cluster_means(x, self.centroids, None if zi < 0 else zi, self.spec.lut_dtype, cfg.quant_min,
                             cfg.quant_max, active_weights(sens))

    @torch.no_grad()
    def to_palettized(self, weight: torch.Tensor) -> PalettizedTensor:
        """Hard-assign ``weight`` to the learned (stored-dtype) LUT: the record finalize attaches."""
        check_finite(self.name, weight)
        x, scale = self._prepare_input(weight)
        if not bool(self.initialized):
            self.initialize(x)
        spec = self.spec
        if self.index_bits != spec.n_bits:
            spec = PalettizationSpec(n_bits=self.index_bits, granularity=spec.granularity,
                                     cluster_dim=spec.cluster_dim, lut_dtype=spec.lut_dtype,
                                     enable_per_channel_scale=spec.enable_per_channel_scale,
                                     channel_axis=spec.channel_axis)
        lut = self.final_lut(x).float().cpu()
        if lut.shape[1] < spec.n_clusters:  # pad the LUT to 2**index_bits entries; the pads are never indexed
            pad = lut[:, -1:].expand(-1, spec.n_clusters - lut.shape[1], -1)
            lut = torch.cat([lut, pad], dim=1)
        pre = weight.float()
        if self.settings.prune_threshold > 0:
            pre = torch.nn.functional.hardshrink(pre, self.settings.prune_threshold)
        return palettize_with_lut(pre.to(weight.dtype), lut, spec, scale, self.settings.quant_min,
                                  self.settings.quant_max)

    def extra_repr(self) -> str:
        return (f"n_bits={self.spec.n_bits}, cluster_dim={self.spec.cluster_dim}, groups={self.centroids.shape[0]}, "
                f"lut_dtype={self.spec.lut_dtype}, mode={self.settings.palett_mode}")


def _worst_fit(x: torch.Tensor, lut: torch.Tensor, count: int, chunk: int = 1 << 20) -> torch.Tensor:
    """Indices of the ``count`` vectors of ``x (M, D)`` farthest from their nearest LUT entry (chunked)."""
    values, indices = [], []
    for start in range(0, x.shape[0], chunk):
        xc = x[start:start + chunk]
        near = lut[nearest_entry(xc.unsqueeze(0), lut.unsqueeze(0))[0]]
        top = (xc - near).square_().sum(-1).topk(min(count, xc.shape[0]))
        values.append(top.values)
        indices.append(top.indices + start)
    values, indices = torch.cat(values), torch.cat(indices)
    return indices[values.topk(min(count, values.numel())).indices]


def _rms_difference(a: torch.Tensor, b: torch.Tensor, chunk: int = 1 << 20) -> float:
    """``sqrt(mean((a - b)^2))`` in chunks, so no full-size temporary is allocated (the fused engine computes it in
    its kernel instead: in a training loop this cost 6 ms a step at 1M weights, in page faults)."""
    a, b = a.detach().reshape(-1), b.detach().reshape(-1)
    total = sum(float(torch.sub(a[i:i + chunk], b[i:i + chunk]).square_().sum()) for i in range(0, a.numel(), chunk))
    return math.sqrt(total / max(1, a.numel()))


def _compress_points(x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Weighted points for initialisation, at most ``_INIT_POINTS`` of them. Scalars become the means of a
    uniform ``_INIT_POINTS``-bin histogram (O(N), no sort), weighted by their counts; vectors are a uniform
    random sample (DKM moves the centroids from there)."""
    if x.shape[0] <= _INIT_POINTS:
        return x, None
    if x.shape[1] > 1:
        return x[torch.randperm(x.shape[0], generator=generator)[:_INIT_POINTS]], None
    return histogram_points(x[:, 0], _INIT_POINTS)
