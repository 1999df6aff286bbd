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

import json
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import nn

from dkm_palett import lut as lut_mod
from dkm_palett.palettized_weight import dense_weights, palettized_tensors
from dkm_palett.export.coreml_mil import (
    float_lut,
    fp16_exact,
    import_coremltools,
    placeholder_values,
    quiet,
    replace_placeholders,
)
from dkm_palett.export.coreml_read import load_program, read_back_lut_weights
from dkm_palett.io import atomic_directory
from dkm_palett.progress import StageBar, show_progress
from dkm_palett.spec import ALLOWED_N_BITS, lut_dtype_info
from dkm_palett.validation import check_choice

__all__ = ["export_coreml", "required_target", "load_program", "read_back_lut_weights"]

PathLike = Union[str, os.PathLike]

TRACE_MODES = ("torchscript", "torch_export")
_META_PREFIX = "_COREML_"


# ----------------------------------------------------------------------------------------- targets & features


def _target_from(value: Any):
    ct = import_coremltools()
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
    if lut_dtype_info(rec.lut_dtype).is_integer:
        out.append(f"quantized LUT (lut_dtype={rec.lut_dtype!r})")
    if rec.n_bits == 3:
        out.append("3-bit indices")
    return out


def required_target(model: nn.Module):
    """The lowest Core ML target that holds every palettized weight of ``model`` (None when there are none)."""
    ct = import_coremltools()
    best = None
    for _, _, _, rec in palettized_tensors(model):
        need = ct.target.iOS18 if _features(rec) else ct.target.iOS16
        if best is None or need.value > best.value:
            best = need
    return best


def _check_records(records, target) -> None:
    ct = import_coremltools()
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


def _auto_precision(records) -> str:
    """float16 only when every palettized weight is exactly representable at fp16, else float32."""
    for _, _, _, rec in records:
        if rec.lut_dtype == "f32" or lut_dtype_info(rec.lut_dtype).is_integer or rec.scale is not None or not fp16_exact(rec.lut):
            return "float32"
    return "float16" if records else "float32"


# ----------------------------------------------------------------------------------------- stage 1: metadata


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
            lo, hi = placeholder_values(k)
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
    ct = import_coremltools()
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
    ct = import_coremltools()
    kwargs = dict(
        convert_to="milinternal", minimum_deployment_target=target,
        compute_precision=ct.precision.FLOAT16 if precision == "float16" else ct.precision.FLOAT32,
    )
    # the tracers see plain parameters of the dense LUT[indices] values (torch.jit.trace takes no tensor subclass)
    with _metadata_buffers(model, records), dense_weights(model), _no_mha_fastpath(), torch.no_grad():
        if trace == "torchscript":
            traced = torch.jit.trace(model, example, check_trace=False, strict=False)
            kwargs["inputs"] = _input_types(example)
        else:
            traced = torch.export.export(model, example).run_decompositions({})
        return ct.convert(traced, **kwargs)


# ----------------------------------------------------------------------------------------- public API


def export_coreml(
    model: nn.Module,
    example_inputs: Any = None,
    path: PathLike = "model.mlpackage",
    minimum_deployment_target: Any = None,
    trace: str = "torchscript",
    compute_precision: Optional[str] = None,
    verbose: bool = False,
    progress: Optional[bool] = None,
) -> Path:
    """Convert a finalized palettized ``model`` to a Core ML ``.mlpackage`` at ``path`` (written atomically).

    example_inputs: a tensor or tuple of tensors; defaults to ``model.example_input_array``.
    minimum_deployment_target: None picks the lowest that holds every feature used (iOS16 for per-tensor scalar
        float LUTs, iOS18 for grouped/vector/per-channel-scale/quantized LUTs or 3-bit); a lower explicit one raises.
    trace: ``'torchscript'`` (``torch.jit.trace``) or ``'torch_export'`` (``torch.export.export``).
    compute_precision: ``'float32'`` / ``'float16'`` (or ``ct.precision``); None uses float16 only when every
        palettized weight is exactly representable at fp16, else float32, so LUTs stay exact.
    verbose: show coremltools' progress bars and warnings.
    progress: a bar over the export's stages (trace, LUT ops, convert, save); None shows it in interactive sessions
        only (see ``dkm_palett.progress``).
    The model is traced in eval mode and left as it was.
    """
    show = show_progress(progress)
    ct = import_coremltools()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    check_choice("trace", trace, TRACE_MODES)
    path = _checked_path(path)
    example = _as_tuple(_example_of(model, example_inputs))
    compute_precision = _precision_name(compute_precision)
    records = list(palettized_tensors(model))
    needed = required_target(model)
    target = needed if minimum_deployment_target is None else _target_from(minimum_deployment_target)
    _check_records(records, target)
    for name, _, _, rec in records:
        float_lut(name, rec)  # bf16/fp8 exactness, before conversion
    precision = compute_precision or _auto_precision(records)
    ios18 = target is not None and target.value >= ct.target.iOS18.value
    # the bar opens before quiet() silences stderr, so it stays visible
    with StageBar(("trace", "LUT ops", "convert", "save"), show, "Core ML export") as stage, quiet(not verbose):
        stage("trace")
        prog = _convert_stage1(model, example, records, target, precision, trace)
        stage("LUT ops")
        rounded = replace_placeholders(prog, records, ios18)
        stage("convert")
        mlmodel = ct.convert(
            prog, convert_to="mlprogram", minimum_deployment_target=target, pass_pipeline=ct.PassPipeline.EMPTY,
            compute_precision=ct.precision.FLOAT32,
        )
        stage("save")
        _save(mlmodel, records, precision, path)
    if rounded:
        warnings.warn(f"compute_precision='float16' rounds the float32 LUTs of {rounded} to fp16.", stacklevel=2)
    return path


def _checked_path(path: PathLike) -> Path:
    path = Path(path)
    if path.suffix != ".mlpackage":
        raise ValueError(f"path={str(path)!r} must end with '.mlpackage' (an ML program is saved as a package).")
    if not path.parent.is_dir():
        raise ValueError(f"path={str(path)!r}: the folder {str(path.parent)!r} does not exist.")
    return path


def _example_of(model: nn.Module, example_inputs: Any) -> Any:
    if example_inputs is None:
        example_inputs = getattr(model, "example_input_array", None)
        if example_inputs is None:
            raise ValueError(
                "example_inputs is None and the model has no example_input_array; pass example inputs "
                "(a tensor or tuple of tensors) for tracing."
            )
    return example_inputs


def _precision_name(compute_precision: Any) -> Optional[str]:
    """``'float32'``/``'float16'``/None from a string or a ``ct.precision`` member."""
    if compute_precision is None:
        return None
    if not isinstance(compute_precision, str):
        ct = import_coremltools()
        compute_precision = "float16" if compute_precision == ct.precision.FLOAT16 else (
            "float32" if compute_precision == ct.precision.FLOAT32 else compute_precision)
    check_choice("compute_precision", compute_precision, ("float32", "float16"))
    return compute_precision


def _save(mlmodel, records, precision: str, path: Path) -> None:
    """Record what was palettized in the package's metadata and write it atomically."""
    meta = {name: {"n_bits": r.n_bits, "lut_dtype": r.lut_dtype, "cluster_dim": r.cluster_dim,
                   "n_groups": r.n_groups, "per_channel_scale": r.scale is not None} for name, _, _, r in records}
    mlmodel.user_defined_metadata["dkm_palett.palettized"] = json.dumps(meta, sort_keys=True)
    mlmodel.user_defined_metadata["dkm_palett.compute_precision"] = precision
    with atomic_directory(path) as tmp:
        mlmodel.save(str(tmp))
