"""Read a saved ``.mlpackage`` back: the MIL program and every palettized weight in it (LUT, indices, dense)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

from dkm_palett import lut as lut_mod
from dkm_palett.export.coreml_mil import import_coremltools, quiet, walk_ops

PathLike = Union[str, os.PathLike]


def load_program(path: PathLike):
    """Read a saved ``.mlpackage`` back into a MIL Program (works without the Core ML runtime)."""
    ct = import_coremltools()
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_load

    path = Path(path)
    if not (path / "Manifest.json").is_file():
        raise ValueError(f"{str(path)!r} is not an .mlpackage (no Manifest.json).")
    spec = ct.utils.load_spec(str(path))
    weights = path / "Data" / "com.apple.CoreML" / "weights"
    with quiet():
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
        for _, op in walk_ops(func):
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
