"""Core ML export, stage 2: the MIL rewrite. Each placeholder ``constexpr_lut_to_dense`` that stage 1 left in the
converted program is replaced by exact ops built from its :class:`~dkm_palett.lut.PalettizedTensor` record (see
:mod:`dkm_palett.export.coreml` for the whole pipeline). Also the quiet coremltools import shared by the export."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from contextlib import contextmanager
from typing import Optional

import numpy as np
import torch

from dkm_palett import lut as lut_mod
from dkm_palett.spec import lut_dtype_info

_PLACEHOLDER_BASE = 1024  # placeholder LUT values are small integers, exact in fp16


def import_coremltools():
    """Import coremltools quietly (it logs about untested torch versions and the missing native library)."""
    logger = logging.getLogger("coremltools")
    old = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import coremltools as ct
    except ImportError:
        raise ImportError("Core ML export needs coremltools: pip install 'dkm_palett[export]'.") from None
    finally:
        logger.setLevel(old)
    return ct


@contextmanager
def quiet(enabled: bool = True):
    """Silence coremltools' progress bars (stderr), logging and warnings during conversion."""
    if not enabled:
        yield
        return
    logger = logging.getLogger("coremltools")
    old = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(old)


def fp16_exact(values: torch.Tensor) -> bool:
    values = values.detach().float()
    return bool(torch.equal(values.half().float(), values))


def float_lut(name: str, rec: lut_mod.PalettizedTensor) -> torch.Tensor:
    """The float LUT values Core ML will hold; bf16/fp8 LUTs go as fp16 when that is lossless."""
    if not lut_dtype_info(rec.lut_dtype).coreml_native:
        if not fp16_exact(rec.lut):
            raise ValueError(
                f"{name}: Core ML has no {rec.lut_dtype} LUT dtype and its LUT values are not exactly representable "
                "as float16 (out of fp16 range or too small), so it cannot be exported losslessly; "
                "use lut_dtype 'f16' or 'f32' for this layer."
            )
    return rec.lut.detach().float()


def placeholder_values(k: int) -> tuple[float, float]:
    return -float(k // _PLACEHOLDER_BASE + 1), float(k % _PLACEHOLDER_BASE + 1)


def _placeholder_id(lut_values: np.ndarray) -> Optional[int]:
    flat = np.asarray(lut_values, dtype=np.float64).reshape(-1)
    if flat.size != 2:
        return None
    lo, hi = flat
    if lo >= 0 or hi <= 0 or lo != round(lo) or hi != round(hi) or hi > _PLACEHOLDER_BASE:
        return None
    return int(-lo - 1) * _PLACEHOLDER_BASE + int(hi - 1)


def walk_ops(block):
    for op in list(block.operations):
        yield block, op
        for inner in op.blocks:
            yield from walk_ops(inner)


def _np_float(builtin_dtype):
    from coremltools.converters.mil.mil import types

    return np.float16 if builtin_dtype == types.fp16 else np.float32


def _exact_var(name: str, rec: lut_mod.PalettizedTensor, out_np, before_op, ios18: bool):
    """Build our ops for ``rec`` before ``before_op``; returns the var holding the dense weight."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    if not ios18:  # per-tensor scalar float LUT
        values = float_lut(name, rec).reshape(-1).numpy().astype(out_np)
        packed = lut_mod.pack_indices(rec.coreml_indices().reshape(-1), rec.n_bits).numpy()
        return mb.constexpr_lut_to_dense(
            indices=packed, lut=values, shape=np.array(rec.shape, dtype=np.uint32), before_op=before_op,
            name=name,
        )
    idx_np = types.nptype_from_builtin(types.string_to_builtin(f"uint{rec.n_bits}"))
    indices = rec.coreml_indices().numpy().astype(idx_np)
    if lut_dtype_info(rec.lut_dtype).is_integer:
        quant = rec.lut_quant
        if quant is None:
            raise ValueError(f"{name}: lut_dtype={rec.lut_dtype!r} but the record holds no integer LUT (lut_quant).")
        int_np = torch.empty(0, dtype=lut_dtype_info(rec.lut_dtype).torch_dtype).numpy().dtype
        q = rec.coreml_lut(quant.q).numpy().astype(int_np)
        view = [1] * (len(rec.shape) + 2)
        view[rec.axis] = rec.n_groups
        scale = quant.scale.detach().float().numpy().reshape(view).astype(out_np)
        zero_point = quant.zero_point.detach().numpy()
        offset = zero_point.reshape(view).astype(int_np) if np.any(zero_point != 0) else None
        lut_var = mb.constexpr_blockwise_shift_scale(
            data=q, scale=scale, offset=offset, before_op=before_op, name=f"{name}_lut_dequantize",
        )
    else:
        lut_var = rec.coreml_lut(float_lut(name, rec)).numpy().astype(out_np)
    kwargs = dict(indices=indices, lut=lut_var, before_op=before_op)
    if rec.cluster_dim > 1:
        kwargs["vector_axis"] = np.int32(rec.axis)
    if rec.scale is None:
        return mb.constexpr_lut_to_dense(name=name, **kwargs)
    dense = mb.constexpr_lut_to_dense(name=f"{name}_unscaled", **kwargs)
    scale = lut_mod.broadcast_scale(rec.scale.detach().float(), rec.shape, rec.axis).numpy().astype(out_np)
    return mb.constexpr_blockwise_shift_scale(data=dense, scale=scale, offset=None, before_op=before_op, name=name)


def _same_scope(op):
    """New ops inherit the replaced op's scope info (module names), which the serializer requires."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil.scope import ScopeInfo

    return mb.scope(*[ScopeInfo(source=src, data=list(data)) for src, data in op.scopes.items() if data])


def replace_placeholders(prog, records, ios18: bool) -> list[str]:
    """Swap each placeholder op for the exact ops of its record. Returns the names of weights rounded to fp16."""
    from coremltools.converters.mil.mil import types

    found: dict[int, int] = {}
    rounded: list[str] = []
    for func in prog.functions.values():
        for block, op in list(walk_ops(func)):
            if op.op_type != "constexpr_lut_to_dense" or op.lut.val is None:
                continue
            k = _placeholder_id(op.lut.val)
            if k is None or k >= len(records):
                continue
            name, _, _, rec = records[k]
            out = op.outputs[0]
            if tuple(out.shape) != tuple(rec.shape):
                raise RuntimeError(f"{name}: the converted weight has shape {tuple(out.shape)}, expected {rec.shape}.")
            out_np = _np_float(out.dtype)
            if out_np is np.float16 and rec.lut_dtype == "f32" and not fp16_exact(rec.lut):
                rounded.append(name)
            with block, _same_scope(op):
                new_var = _exact_var(name, rec, out_np, op, ios18)
            block.replace_uses_of_var_after_op(anchor_op=op, old_var=out, new_var=new_var, force_replace=True)
            block.remove_ops([op])
            found[k] = found.get(k, 0) + 1
            if new_var.dtype != out.dtype:
                raise RuntimeError(f"{name}: dtype mismatch {types.builtin_to_string(new_var.dtype)} vs "
                                   f"{types.builtin_to_string(out.dtype)}.")
    params = {}
    for k, (name, module, param_name, _) in enumerate(records):
        param = getattr(module, param_name)
        if k in found:
            params.setdefault(id(param), k)
    missing = [records[k][0] for k in range(len(records))
               if k not in found and id(getattr(records[k][1], records[k][2])) not in params]
    if missing:
        raise RuntimeError(
            f"the converted program does not use the palettized weight(s) {missing} as constants (they may be "
            "unused by forward, or transformed in a way the converter folded); nothing was exported."
        )
    return rounded
