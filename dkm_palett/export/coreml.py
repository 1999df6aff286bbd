"""Core ML export of palettized models: every palettized weight becomes ``constexpr_lut_to_dense`` with exactly the
learned LUT and indices.

How it works:

1. Each palettized weight gets coremltools' compression-metadata buffers (``_COREML_/<param>/lut``,
   ``.../compression_type``, model-level ``_COREML_/metadata_version``), so ``ct.convert`` places a
   ``constexpr_lut_to_dense`` op where the weight is used. The LUT in those buffers is a tiny 1-bit *placeholder*
   whose two values encode which weight it stands for: coremltools would otherwise re-derive indices from the dense
   weight (a ``numel x K`` search), fold per-channel scales into per-channel LUTs, and has no quantized-LUT +
   per-channel-scale form, so it cannot hold our records exactly.
2. The converted MIL program (``convert_to="milinternal"``) is post-processed: each placeholder op is replaced by our
   exact ops (below), built from the :class:`~dkm_palett.lut.PalettizedTensor` record.
3. The program is serialized with ``ct.convert(program, pass_pipeline=EMPTY)`` and saved atomically.

Ops per weight (iOS18): ``[int8 LUT -> constexpr_blockwise_shift_scale ->] constexpr_lut_to_dense(indices, lut,
vector_axis) [-> constexpr_blockwise_shift_scale(per-channel scale)]``. Per-tensor scalar float LUTs also have the
iOS16 form (packed indices + ``shape``). Op names are the weights' names as the serializer writes them
(``fc.weight`` -> ``fc_weight``). Note: the per-channel-scale form (``lut -> blockwise_shift_scale``) is what
coremltools itself emits for ``enable_per_channel_scale``; it keeps the learned LUT exact instead of folding scales.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import nn

from dkm_palett import lut as lut_mod
from dkm_palett.io import atomic_directory
from dkm_palett.spec import ALLOWED_N_BITS
from dkm_palett.validation import check_choice

PathLike = Union[str, os.PathLike]

TRACE_MODES = ("torchscript", "torch_export")
CONVERT_TO = ("mlprogram",)
_META_PREFIX = "_COREML_"
_PLACEHOLDER_BASE = 1024  # placeholder LUT values are small integers, exact in fp16


def _ct():
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
def _quiet(enabled: bool = True):
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


# ----------------------------------------------------------------------------------------- targets & features


def _target_from(value: Any):
    ct = _ct()
    if isinstance(value, ct.target):
        return value
    if isinstance(value, str):
        for name in (value, value.replace("ios", "iOS").replace("macos", "macOS")):
            member = getattr(ct.target, name, None)
            if isinstance(member, ct.target):
                return member
    allowed = ", ".join(t.name for t in ct.target)
    raise ValueError(
        f"minimum_deployment_target={value!r} is not a Core ML target; use ct.target.<name> or one of: {allowed} "
        "(macOS/watchOS/tvOS spellings work too)."
    )


def _features(rec: lut_mod.PalettizedTensor) -> list[str]:
    """The features of ``rec`` that need the iOS18 ``constexpr_lut_to_dense``."""
    out = []
    if rec.n_groups > 1:
        out.append(f"grouped LUT (per_grouped_channel, {rec.n_groups} LUTs)")
    if rec.cluster_dim > 1:
        out.append(f"vector palettization (cluster_dim={rec.cluster_dim})")
    if rec.scale is not None:
        out.append("per-channel scale")
    if rec.lut_dtype in ("i8", "u8"):
        out.append(f"quantized LUT (lut_dtype={rec.lut_dtype!r})")
    if rec.n_bits == 3:
        out.append("3-bit indices")
    return out


def required_target(model: nn.Module):
    """The lowest Core ML target that holds every palettized weight of ``model`` (None when there are none)."""
    ct = _ct()
    best = None
    for _, _, _, rec in lut_mod.palettized_tensors(model):
        need = ct.target.iOS18 if _features(rec) else ct.target.iOS16
        if best is None or need.value > best.value:
            best = need
    return best


def _check_records(records, target) -> None:
    ct = _ct()
    for name, _, _, rec in records:
        if rec.n_bits not in ALLOWED_N_BITS:
            raise ValueError(
                f"{name}: {rec.n_bits}-bit indices cannot be exported; Core ML's constexpr_lut_to_dense holds "
                f"{', '.join(map(str, ALLOWED_N_BITS))}-bit indices."
            )
        if rec.lut.shape[1] != 2 ** rec.n_bits:
            raise ValueError(f"{name}: the LUT has {rec.lut.shape[1]} entries, expected 2**n_bits={2 ** rec.n_bits}.")
        feats = _features(rec)
        if feats and target is not None and target.value < ct.target.iOS18.value:
            raise ValueError(
                f"{name} uses {', '.join(feats)}, which needs minimum_deployment_target=ct.target.iOS18 "
                f"(or macOS15) or later; got {target.name}. Pass a higher target or leave it as None "
                "to pick the lowest one that works."
            )
        if target is not None and target.value < ct.target.iOS16.value:
            raise ValueError(
                f"{name}: palettized weights (constexpr_lut_to_dense) need minimum_deployment_target="
                f"ct.target.iOS16 (or macOS13) or later; got {target.name}."
            )


def _fp16_exact(values: torch.Tensor) -> bool:
    values = values.detach().float()
    return bool(torch.equal(values.half().float(), values))


def _float_lut(name: str, rec: lut_mod.PalettizedTensor) -> torch.Tensor:
    """The float LUT values Core ML will hold; bf16/fp8 LUTs go as fp16 when that is lossless."""
    if rec.lut_dtype in ("bf16", "fp8_e4m3", "fp8_e5m2"):
        if not _fp16_exact(rec.lut):
            raise ValueError(
                f"{name}: Core ML has no {rec.lut_dtype} LUT dtype and its LUT values are not exactly representable "
                "as float16 (out of fp16 range or too small), so it cannot be exported losslessly; "
                "use lut_dtype 'f16' or 'f32' for this layer."
            )
    return rec.lut.detach().float()


def _auto_precision(records) -> str:
    """float16 only when every palettized weight is exactly representable at fp16, else float32."""
    for _, _, _, rec in records:
        if rec.lut_dtype in ("f32", "i8", "u8") or rec.scale is not None or not _fp16_exact(rec.lut):
            return "float32"
    return "float16" if records else "float32"


# ----------------------------------------------------------------------------------------- stage 1: metadata


def _placeholder_values(k: int) -> tuple[float, float]:
    return -float(k // _PLACEHOLDER_BASE + 1), float(k % _PLACEHOLDER_BASE + 1)


def _placeholder_id(lut_values: np.ndarray) -> Optional[int]:
    flat = np.asarray(lut_values, dtype=np.float64).reshape(-1)
    if flat.size != 2:
        return None
    lo, hi = flat
    if lo >= 0 or hi <= 0 or lo != round(lo) or hi != round(hi) or hi > _PLACEHOLDER_BASE:
        return None
    return int(-lo - 1) * _PLACEHOLDER_BASE + int(hi - 1)


@contextmanager
def _metadata_buffers(model: nn.Module, records):
    """Temporarily register coremltools' compression-metadata buffers (placeholder LUTs) and eval mode."""
    modes = {m: m.training for m in model.modules()}
    saved: list[tuple[nn.Module, str, Any]] = []  # (module, buffer name, the user's buffer it replaced or None)

    def put(module: nn.Module, buf: str, value: torch.Tensor) -> None:
        saved.append((module, buf, module._buffers.get(buf)))
        module._buffers[buf] = value

    try:
        model.eval()
        put(model, f"{_META_PREFIX}/metadata_version", torch.tensor(1))
        for k, (_, module, param_name, rec) in enumerate(records):
            lo, hi = _placeholder_values(k)
            shape = [1] * len(rec.shape) + [2, 1]
            put(module, f"{_META_PREFIX}/{param_name}/lut",
                torch.tensor([lo, hi], dtype=torch.float32).reshape(shape))
            put(module, f"{_META_PREFIX}/{param_name}/compression_type", torch.tensor([2]))
        yield
    finally:
        for module, buf, old in reversed(saved):
            if old is None:
                module._buffers.pop(buf, None)
            else:
                module._buffers[buf] = old
        for m, mode in modes.items():
            m.training = mode


def _as_tuple(example_inputs) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and all(isinstance(x, torch.Tensor) for x in example_inputs):
        return tuple(example_inputs)
    raise TypeError(
        "example_inputs must be a tensor or a tuple/list of tensors (one per forward argument), got "
        f"{type(example_inputs).__name__}."
    )


def _input_types(example: tuple):
    ct = _ct()
    out = []
    for i, x in enumerate(example):
        if x.dtype.is_floating_point:
            dtype = np.float32
        elif x.dtype == torch.bool:
            dtype = bool
        else:
            dtype = np.int32
        out.append(ct.TensorType(name=f"input_{i}", shape=tuple(x.shape), dtype=dtype))
    return out


@contextmanager
def _no_mha_fastpath():
    """Trace MultiheadAttention through its plain ops: its eval fast path (_native_multi_head_attention) has no
    Core ML conversion."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    old = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(old)


def _convert_stage1(model, example, records, target, precision, trace):
    ct = _ct()
    kwargs = dict(
        convert_to="milinternal", minimum_deployment_target=target,
        compute_precision=ct.precision.FLOAT16 if precision == "float16" else ct.precision.FLOAT32,
    )
    with _metadata_buffers(model, records), _no_mha_fastpath(), torch.no_grad():
        if trace == "torchscript":
            traced = torch.jit.trace(model, example, check_trace=False, strict=False)
            kwargs["inputs"] = _input_types(example)
        else:
            traced = torch.export.export(model, example).run_decompositions({})
        return ct.convert(traced, **kwargs)


# ----------------------------------------------------------------------------------------- stage 2: exact ops


def _walk_ops(block):
    for op in list(block.operations):
        yield block, op
        for inner in op.blocks:
            yield from _walk_ops(inner)


def _np_float(builtin_dtype):
    from coremltools.converters.mil.mil import types

    return np.float16 if builtin_dtype == types.fp16 else np.float32


def _exact_var(name: str, rec: lut_mod.PalettizedTensor, out_np, before_op, ios18: bool):
    """Build our ops for ``rec`` before ``before_op``; returns the var holding the dense weight."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    if not ios18:  # per-tensor scalar float LUT
        values = _float_lut(name, rec).reshape(-1).numpy().astype(out_np)
        packed = lut_mod.pack_indices(rec.coreml_indices().reshape(-1), rec.n_bits).numpy()
        return mb.constexpr_lut_to_dense(
            indices=packed, lut=values, shape=np.array(rec.shape, dtype=np.uint32), before_op=before_op,
            name=name,
        )
    idx_np = types.nptype_from_builtin(types.string_to_builtin(f"uint{rec.n_bits}"))
    indices = rec.coreml_indices().numpy().astype(idx_np)
    if rec.lut_dtype in ("i8", "u8"):
        quant = rec.lut_quant
        if quant is None:
            raise ValueError(f"{name}: lut_dtype={rec.lut_dtype!r} but the record holds no integer LUT (lut_quant).")
        int_np = np.int8 if rec.lut_dtype == "i8" else np.uint8
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
        lut_var = rec.coreml_lut(_float_lut(name, rec)).numpy().astype(out_np)
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


def _replace_placeholders(prog, records, ios18: bool) -> list[str]:
    """Swap each placeholder op for the exact ops of its record. Returns the names of weights rounded to fp16."""
    from coremltools.converters.mil.mil import types

    found: dict[int, int] = {}
    rounded: list[str] = []
    for func in prog.functions.values():
        for block, op in list(_walk_ops(func)):
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
            if out_np is np.float16 and rec.lut_dtype == "f32" and not _fp16_exact(rec.lut):
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


# ----------------------------------------------------------------------------------------- public API


def export_coreml(
    model: nn.Module,
    example_inputs: Any = None,
    path: PathLike = "model.mlpackage",
    minimum_deployment_target: Any = None,
    convert_to: str = "mlprogram",
    trace: str = "torchscript",
    compute_precision: Optional[str] = None,
    verbose: bool = False,
) -> Path:
    """Convert a finalized palettized ``model`` to a Core ML ``.mlpackage`` at ``path`` (written atomically).

    example_inputs: a tensor or tuple of tensors; defaults to ``model.example_input_array``.
    minimum_deployment_target: None picks the lowest that holds every feature used (iOS16 for per-tensor scalar
        float LUTs, iOS18 for grouped/vector/per-channel-scale/quantized LUTs or 3-bit); a lower explicit one raises.
    trace: ``'torchscript'`` (``torch.jit.trace``) or ``'torch_export'`` (``torch.export.export``).
    compute_precision: ``'float32'`` / ``'float16'`` (or ``ct.precision``); None uses float16 only when every
        palettized weight is exactly representable at fp16, else float32, so LUTs stay exact.
    verbose: show coremltools' progress bars and warnings.
    The model is traced in eval mode and left as it was.
    """
    ct = _ct()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    check_choice("convert_to", convert_to, CONVERT_TO)
    check_choice("trace", trace, TRACE_MODES)
    path = Path(path)
    if path.suffix != ".mlpackage":
        raise ValueError(f"path={str(path)!r} must end with '.mlpackage' (an ML program is saved as a package).")
    if not path.parent.is_dir():
        raise ValueError(f"path={str(path)!r}: the folder {str(path.parent)!r} does not exist.")
    if example_inputs is None:
        example_inputs = getattr(model, "example_input_array", None)
        if example_inputs is None:
            raise ValueError(
                "example_inputs is None and the model has no example_input_array; pass example inputs "
                "(a tensor or tuple of tensors) for tracing."
            )
    example = _as_tuple(example_inputs)
    if compute_precision is not None and not isinstance(compute_precision, str):
        compute_precision = "float16" if compute_precision == ct.precision.FLOAT16 else (
            "float32" if compute_precision == ct.precision.FLOAT32 else compute_precision)
    if compute_precision is not None:
        check_choice("compute_precision", compute_precision, ("float32", "float16"))

    records = list(lut_mod.palettized_tensors(model))
    needed = required_target(model)
    target = needed if minimum_deployment_target is None else _target_from(minimum_deployment_target)
    _check_records(records, target)
    for name, _, _, rec in records:
        _float_lut(name, rec)  # bf16/fp8 exactness, before conversion
    precision = compute_precision or _auto_precision(records)
    ios18 = target is not None and target.value >= ct.target.iOS18.value

    with _quiet(not verbose):
        prog = _convert_stage1(model, example, records, target, precision, trace)
        rounded = _replace_placeholders(prog, records, ios18)
        mlmodel = ct.convert(
            prog, convert_to="mlprogram", minimum_deployment_target=target, pass_pipeline=ct.PassPipeline.EMPTY,
            compute_precision=ct.precision.FLOAT32,
        )
    if rounded:
        warnings.warn(f"compute_precision='float16' rounds the float32 LUTs of {rounded} to fp16.", stacklevel=2)
    meta = {name: {"n_bits": r.n_bits, "lut_dtype": r.lut_dtype, "cluster_dim": r.cluster_dim,
                   "n_groups": r.n_groups, "per_channel_scale": r.scale is not None} for name, _, _, r in records}
    mlmodel.user_defined_metadata["dkm_palett.palettized"] = json.dumps(meta, sort_keys=True)
    mlmodel.user_defined_metadata["dkm_palett.compute_precision"] = precision
    with atomic_directory(path) as tmp:
        mlmodel.save(str(tmp))
    return path


def load_program(path: PathLike):
    """Read a saved ``.mlpackage`` back into a MIL Program (works without the Core ML runtime)."""
    ct = _ct()
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_load

    path = Path(path)
    if not (path / "Manifest.json").is_file():
        raise ValueError(f"{str(path)!r} is not an .mlpackage (no Manifest.json).")
    spec = ct.utils.load_spec(str(path))
    weights = path / "Data" / "com.apple.CoreML" / "weights"
    with _quiet():
        return milproto_load(spec, spec.specificationVersion, str(weights))


def _value(var) -> np.ndarray:
    if var.val is not None:
        return np.asarray(var.val)
    return np.asarray(var.op.materialized_val_inference())


def read_back_lut_weights(path: PathLike) -> list[dict]:
    """Every ``constexpr_lut_to_dense`` of a saved package, as dicts.

    Keys: ``name`` (the weight's op name, after an optional per-channel scale op), ``lut_op``, ``lut`` (the float
    LUT the op reads, Core ML layout ``(..., K, D)``), ``lut_storage`` (the stored LUT: int8/uint8 for a quantized
    LUT), ``lut_scale``/``lut_offset`` (quantized LUT), ``indices`` (unpacked, Core ML layout), ``vector_axis``,
    ``per_channel_scale``, ``dense`` (the decompressed weight, scale applied), ``opset`` (``'iOS16'``/``'iOS18'``).
    """
    from coremltools.converters.mil.mil import types

    prog = load_program(path)
    out = []
    for func in prog.functions.values():
        for _, op in _walk_ops(func):
            if op.op_type != "constexpr_lut_to_dense":
                continue
            entry: dict[str, Any] = {"lut_op": op.name, "lut_scale": None, "lut_offset": None,
                                     "per_channel_scale": None, "vector_axis": None}
            lut_var = op.lut
            if lut_var.val is None and lut_var.op.op_type == "constexpr_blockwise_shift_scale":
                producer = lut_var.op
                entry["lut_storage"] = np.asarray(producer.data.val)
                entry["lut_scale"] = np.asarray(producer.scale.val)
                entry["lut_offset"] = None if producer.offset is None else np.asarray(producer.offset.val)
            else:
                entry["lut_storage"] = np.asarray(lut_var.val)
            entry["lut"] = _value(lut_var)
            if "shape" in op.inputs:  # iOS16 op: packed indices + shape
                shape = tuple(int(s) for s in op.shape.val)
                n_bits = int(math.log2(entry["lut"].shape[0]))
                count = int(np.prod(shape))
                packed = torch.from_numpy(np.asarray(op.indices.val).astype(np.uint8))
                entry["indices"] = lut_mod.unpack_indices(packed, n_bits, count).numpy().reshape(shape)
                entry["opset"] = "iOS16"
            else:
                entry["indices"] = np.asarray(op.indices.val).astype(np.int64)
                entry["opset"] = "iOS18"
                if op.vector_axis is not None:
                    entry["vector_axis"] = int(op.vector_axis.val)
            if entry["opset"] == "iOS16":
                dense = np.asarray(op.materialized_val_inference())
            else:  # decompress with coremltools' own op semantics (the LUT may come from a dequantize op)
                dense = np.asarray(op.decompress(np.asarray(op.indices.val), entry["lut"], entry["vector_axis"]))
            name = op.name
            children = op.outputs[0].child_ops
            if len(children) == 1 and children[0].op_type == "constexpr_blockwise_shift_scale":
                scale_op = children[0]
                entry["per_channel_scale"] = np.asarray(scale_op.scale.val)
                offset = None if scale_op.offset is None else scale_op.offset.val
                dense = np.asarray(scale_op.decompress(dense, np.asarray(scale_op.scale.val), offset))
                name = scale_op.name
            entry["name"] = name
            entry["dense"] = dense
            entry["dtype"] = types.builtin_to_string(op.outputs[0].dtype)
            out.append(entry)
    return out
