"""The one LUT/indices representation, shared by DKM finalize, post-training, report and both exports.

Internal layout ("grouped vectors"): a weight of shape ``S`` with channel axis ``a`` and ``C = S[a]`` channels is
viewed as ``(G, M, D)``: ``G`` LUT groups of ``group_size`` channels, ``M`` vectors per group, ``D = cluster_dim``
consecutive channels per vector. A LUT is ``(G, K, D)`` and indices are ``(G, M)``.

Core ML layout (``constexpr_lut_to_dense``, iOS18): indices have the weight's shape with ``S[a] / D`` along the
vector axis; the LUT has rank ``len(S) + 2``: ``G`` along ``a``, 1 elsewhere, then ``K`` and ``D``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from dkm_palett.kmeans import nearest_centroid
from dkm_palett.spec import PalettizationSpec, lut_dtype_info

# ----------------------------------------------------------------------------------------------- layout


def to_grouped_vectors(weight: torch.Tensor, axis: int, group_size: int, cluster_dim: int) -> torch.Tensor:
    """View ``weight`` as ``(G, M, D)`` vectors (see module docstring). Returns a new contiguous tensor."""
    w = weight.movedim(axis, 0)
    channels = w.shape[0]
    w = w.reshape(channels, -1)
    rest = w.shape[1]
    groups = channels // group_size
    w = w.reshape(groups, group_size // cluster_dim, cluster_dim, rest).permute(0, 1, 3, 2)
    return w.reshape(groups, (group_size // cluster_dim) * rest, cluster_dim).contiguous()


def from_grouped_vectors(x: torch.Tensor, shape: tuple[int, ...], axis: int, group_size: int) -> torch.Tensor:
    """Inverse of :func:`to_grouped_vectors`."""
    groups, _, cluster_dim = x.shape
    moved = (shape[axis],) + tuple(s for i, s in enumerate(shape) if i != axis)
    rest = int(np.prod(moved[1:])) if len(moved) > 1 else 1
    w = x.reshape(groups, group_size // cluster_dim, rest, cluster_dim).permute(0, 1, 3, 2)
    return w.reshape(moved).movedim(0, axis).contiguous()


def channel_scale(weight: torch.Tensor, axis: int) -> torch.Tensor:
    """Per-channel scale along ``axis``: the channel's max |w| (1 for an all-zero channel). Shape ``(C,)``."""
    w = weight.detach().movedim(axis, 0).reshape(weight.shape[axis], -1)
    scale = w.abs().amax(dim=1).float()
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def broadcast_scale(scale: torch.Tensor, shape: tuple[int, ...], axis: int) -> torch.Tensor:
    view = [1] * len(shape)
    view[axis] = shape[axis]
    return scale.reshape(view)


# ----------------------------------------------------------------------------------------- LUT dtypes

@dataclass
class LutQuantization:
    """An integer LUT: ``lut = (q - zero_point) * scale`` with one scale/zero point per LUT group."""

    q: torch.Tensor  # (G, K, D) int8 or uint8
    scale: torch.Tensor  # (G,) float32
    zero_point: torch.Tensor  # (G,) int32

    def dequantize(self) -> torch.Tensor:
        view = (-1, 1, 1)
        return (self.q.float() - self.zero_point.reshape(view).float()) * self.scale.reshape(view)


def integer_lut_range(lut_dtype: str, quant_min: int = -128, quant_max: int = 127) -> tuple[int, int]:
    """The integer range of a quantized LUT: ``[quant_min, quant_max]`` for i8, ``[0, 255]`` for u8."""
    if lut_dtype == "i8":
        return max(quant_min, -128), min(quant_max, 127)
    return 0, 255


def quantize_lut_int(lut: torch.Tensor, lut_dtype: str, quant_min: int = -128,
                     quant_max: int = 127) -> LutQuantization:
    """Quantize a ``(G, K, D)`` LUT to int8 (symmetric) or uint8 (affine), one scale per group."""
    lo, hi = integer_lut_range(lut_dtype, quant_min, quant_max)
    flat = lut.detach().float().reshape(lut.shape[0], -1)
    if lut_dtype == "i8":
        scale = flat.abs().amax(dim=1) / min(-lo, hi)
    else:
        vmin = flat.amin(dim=1).clamp(max=0)
        scale = (flat.amax(dim=1).clamp(min=0) - vmin) / (hi - lo)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    # built from the LUT's own tensors, so it stays on the LUT's device (an all-zero u8 LUT has vmin = 0: zero point lo)
    if lut_dtype == "i8":
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
    else:
        zero_point = (lo - torch.round(vmin / scale)).clamp(lo, hi).to(torch.int32)
    view = (-1, 1, 1)
    q = torch.round(lut.detach().float() / scale.reshape(view)) + zero_point.reshape(view)
    q = q.clamp(lo, hi).to(lut_dtype_info(lut_dtype).torch_dtype)
    return LutQuantization(q=q, scale=scale.float(), zero_point=zero_point)


def round_lut(lut: torch.Tensor, lut_dtype: str, quant_min: int = -128, quant_max: int = 127) -> torch.Tensor:
    """The LUT values as they will be stored (not differentiable). Raises if a float LUT overflows its dtype."""
    if lut_dtype == "f32":
        return lut.float()
    info = lut_dtype_info(lut_dtype)
    if info.is_integer:
        return quantize_lut_int(lut, lut_dtype, quant_min, quant_max).dequantize().to(lut.device)
    peak = lut.detach().abs().max().item() if lut.numel() else 0.0
    if peak > info.max_abs:
        raise ValueError(
            f"a LUT entry of magnitude {peak:.4g} does not fit lut_dtype={lut_dtype!r} (max {info.max_abs:g}); "
            "enable per-channel scale or choose a wider lut_dtype."
        )
    return lut.to(info.torch_dtype).float()


def fake_quantize_lut(lut: torch.Tensor, lut_dtype: str, quant_min: int = -128, quant_max: int = 127) -> torch.Tensor:
    """Round the LUT to its storage dtype in the forward pass, straight-through in the backward pass."""
    if lut_dtype == "f32":
        return lut
    return lut + (round_lut(lut, lut_dtype, quant_min, quant_max) - lut).detach()


# ----------------------------------------------------------------------------------------- indices


_PACK_CHUNK = 1 << 20  # indices per packing step (a multiple of 8, so every step fills whole bytes)


def _check_chunk(chunk: int) -> None:
    if chunk <= 0 or chunk % 8:
        raise ValueError(f"chunk must be a positive multiple of 8 (whole bytes per step), got {chunk}.")


def pack_indices(indices: torch.Tensor, n_bits: int, chunk: int = _PACK_CHUNK) -> torch.Tensor:
    """Pack integer indices into a little-endian bitstream of uint8 (``ceil(numel * n_bits / 8)`` bytes), index
    ``i``'s bit ``j`` at stream bit ``i * n_bits + j``. Works ``chunk`` indices at a time, so the bit temporaries
    stay small whatever the weight's size (one shot, a 65M-weight embedding needed 2 GB of them at 4 bits)."""
    _check_chunk(chunk)
    idx = indices.detach().reshape(-1).cpu().numpy()
    if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= 2 ** n_bits):
        raise ValueError(f"indices must lie in [0, {2 ** n_bits - 1}] to pack at {n_bits} bits.")
    out = np.empty(-(-idx.size * n_bits // 8), dtype=np.uint8)
    shifts = np.arange(n_bits, dtype=np.int64)
    for start in range(0, idx.size, chunk):
        part = idx[start:start + chunk].astype(np.int64)
        bits = ((part[:, None] >> shifts) & 1).astype(np.uint8)
        packed = np.packbits(bits.reshape(-1), bitorder="little")
        first = start * n_bits // 8
        out[first:first + packed.size] = packed
    return torch.from_numpy(out)


def unpack_indices(packed: torch.Tensor, n_bits: int, count: int, chunk: int = _PACK_CHUNK) -> torch.Tensor:
    """Inverse of :func:`pack_indices`: ``count`` indices as int64 (``chunk`` at a time, as it packs)."""
    _check_chunk(chunk)
    data = packed.cpu().numpy().astype(np.uint8, copy=False)
    out = np.empty(count, dtype=np.int64)
    weights = (1 << np.arange(n_bits)).astype(np.int64)
    for start in range(0, count, chunk):
        n = min(chunk, count - start)
        first = start * n_bits // 8
        bits = np.unpackbits(data[first:first + -(-n * n_bits // 8)], bitorder="little")[: n * n_bits]
        out[start:start + n] = bits.reshape(n, n_bits).astype(np.int64) @ weights
    return torch.from_numpy(out)


def nearest_entry(vectors: torch.Tensor, lut: torch.Tensor, max_chunk_elems: int = 2 ** 24) -> torch.Tensor:
    """Hard assignment: index of the nearest LUT entry for each vector, per group. ``(G,M,D), (G,K,D) -> (G,M)``.
    Per group :func:`dkm_palett.kmeans.nearest_centroid` (exact float64 distances, ties to the lower index)."""
    out = torch.empty(vectors.shape[:2], dtype=torch.int64, device=vectors.device)
    for g in range(vectors.shape[0]):
        out[g] = nearest_centroid(vectors[g], lut[g], max_chunk_elems=max_chunk_elems)
    return out


# ----------------------------------------------------------------------------------------- the record


@dataclass(eq=False)
class PalettizedTensor:
    """A palettized weight: ``dense = lut[group][indices] (* per-channel scale)``, in the grouped layout. On a
    module it is stored as a :class:`~dkm_palett.palettized_weight.PalettizedWeight` (``.record`` gives it back).
    Two records are equal when their metadata and tensors are equal."""

    lut: torch.Tensor  # (G, K, D) float32: the stored values (already rounded to lut_dtype)
    indices: torch.Tensor  # (G, M) uint8 (n_bits <= 8): 1 byte a weight, so a finalized 1B model stays small
    shape: tuple[int, ...]
    axis: int
    group_size: int
    n_bits: int
    lut_dtype: str = "f32"
    scale: Optional[torch.Tensor] = None  # (C,) float32 per-channel scale along axis
    lut_quant: Optional[LutQuantization] = None  # set for i8/u8 LUTs
    dtype: torch.dtype = torch.float32  # dtype of the dense weight

    @property
    def cluster_dim(self) -> int:
        return self.lut.shape[-1]

    @property
    def n_groups(self) -> int:
        return self.lut.shape[0]

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape))

    def __post_init__(self):
        if self.indices.dtype != torch.uint8:
            self.indices = self.indices.to(torch.uint8)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PalettizedTensor):
            return NotImplemented
        meta = ("shape", "axis", "group_size", "n_bits", "lut_dtype", "dtype")
        return (all(tuple(getattr(self, m)) == tuple(getattr(other, m)) if m == "shape" else
                    getattr(self, m) == getattr(other, m) for m in meta)
                and _same(self.lut, other.lut) and _same(self.indices, other.indices)
                and _same(self.scale, other.scale) and _same_quant(self.lut_quant, other.lut_quant))

    def to_dense(self) -> torch.Tensor:
        vectors = torch.gather(
            self.lut, 1, self.indices.long().unsqueeze(-1).expand(-1, -1, self.cluster_dim)
        )
        dense = from_grouped_vectors(vectors, self.shape, self.axis, self.group_size)
        if self.scale is not None:
            dense = dense * broadcast_scale(self.scale, self.shape, self.axis)
        return dense.to(self.dtype)

    # Core ML layout --------------------------------------------------------------------------------
    def coreml_indices(self) -> torch.Tensor:
        """Indices shaped like the weight with ``shape[axis] / cluster_dim`` along the vector axis."""
        moved = [self.shape[self.axis] // self.cluster_dim] + [s for i, s in enumerate(self.shape) if i != self.axis]
        idx = self.indices.reshape(self.n_groups, self.group_size // self.cluster_dim, -1)
        return idx.reshape(moved).movedim(0, self.axis).contiguous()

    def coreml_lut(self, values: Optional[torch.Tensor] = None) -> torch.Tensor:
        """LUT of rank ``len(shape) + 2``: groups along ``axis``, then ``(K, D)``."""
        values = self.lut if values is None else values
        view = [1] * len(self.shape)
        view[self.axis] = self.n_groups
        return values.reshape(*view, values.shape[1], values.shape[2])

    def storage_bits(self) -> int:
        """Bits needed to store this tensor compressed: packed indices + LUT (+ scales)."""
        lut_bits = lut_dtype_info(self.lut_dtype).bits
        bits = self.indices.numel() * self.n_bits + self.lut.numel() * lut_bits
        if self.lut_quant is not None:
            bits += self.n_groups * (32 + 32)
        if self.scale is not None:
            bits += self.scale.numel() * 32
        return bits


def _same(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> bool:
    if a is None or b is None:
        return a is b
    return a.dtype == b.dtype and torch.equal(a.cpu(), b.cpu())


def _same_quant(a: Optional[LutQuantization], b: Optional[LutQuantization]) -> bool:
    if a is None or b is None:
        return a is b
    return _same(a.q, b.q) and _same(a.scale, b.scale) and _same(a.zero_point, b.zero_point)


def palettize_with_lut(weight: torch.Tensor, lut: torch.Tensor, spec: PalettizationSpec,
                       scale: Optional[torch.Tensor] = None, quant_min: int = -128,
                       quant_max: int = 127) -> PalettizedTensor:
    """Round ``lut`` (``(G,K,D)``, in the scaled domain) to its dtype and hard-assign ``weight`` to it."""
    weight = weight.detach()
    lut = lut.detach()
    shape = tuple(weight.shape)
    axis = spec.axis
    group_size = spec.group_size_for(shape)
    scaled = weight.float()
    if scale is not None:
        scaled = scaled / broadcast_scale(scale, shape, axis)
    vectors = to_grouped_vectors(scaled, axis, group_size, spec.cluster_dim)
    lut_quant = None
    if spec.lut_dtype in ("i8", "u8"):
        lut_quant = quantize_lut_int(lut, spec.lut_dtype, quant_min, quant_max)
        stored = lut_quant.dequantize()
    else:
        stored = round_lut(lut, spec.lut_dtype)
    stored = stored.to(vectors.device)
    indices = nearest_entry(vectors, stored)
    return PalettizedTensor(
        lut=stored.cpu(), indices=indices.cpu(), shape=shape, axis=axis, group_size=group_size, n_bits=spec.n_bits,
        lut_dtype=spec.lut_dtype, scale=None if scale is None else scale.float().cpu(), lut_quant=lut_quant,
        dtype=weight.dtype,
    )
