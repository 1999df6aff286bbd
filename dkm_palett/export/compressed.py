"""Portable compressed checkpoint: one safetensors file with packed indices + LUTs for palettized weights.

Layout, for a palettized weight ``N`` (e.g. ``fc.weight``):

- ``N::indices``: uint8, the ``(G, M)`` indices bit-packed at ``n_bits`` (:func:`dkm_palett.lut.pack_indices`);
- ``N::lut``: the ``(G, K, D)`` LUT in its storage dtype (float32, float16, bfloat16, float8_e4m3fn, float8_e5m2),
  or for integer LUTs ``N::lut_q`` (int8/uint8) + ``N::lut_scale`` (float32) + ``N::lut_zero_point`` (int32);
- ``N::scale``: the per-channel scale (float32), when used.

Every other state_dict entry is stored as it is. The header metadata holds the format name and version and, per
palettized weight, shape, axis, group_size, n_bits, lut_dtype, cluster_dim and the dense dtype.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Union

import torch
from torch import nn

from dkm_palett import lut as lut_mod
from dkm_palett.palettized_weight import attach, palettized_tensors
from dkm_palett.io import atomic_path
from dkm_palett.spec import LUT_DTYPE_TABLE, LUT_DTYPES, lut_dtype_info

FORMAT_NAME = "dkm_palett.compressed"
FORMAT_VERSION = 1
SEP = "::"

def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _dtype_from_name(name: str, where: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{where}: unknown dtype {name!r} in the file's metadata (corrupt file?).")
    return dtype


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _record_tensors(name: str, rec: lut_mod.PalettizedTensor) -> dict[str, torch.Tensor]:
    out = {f"{name}{SEP}indices": lut_mod.pack_indices(rec.indices, rec.n_bits)}
    info = lut_dtype_info(rec.lut_dtype)
    if info.is_integer:
        quant = rec.lut_quant
        if quant is None:
            raise ValueError(f"{name}: lut_dtype={rec.lut_dtype!r} but the record holds no integer LUT (lut_quant).")
        out[f"{name}{SEP}lut_q"] = quant.q.detach().cpu().to(info.torch_dtype).contiguous()
        out[f"{name}{SEP}lut_scale"] = quant.scale.detach().cpu().float().contiguous()
        out[f"{name}{SEP}lut_zero_point"] = quant.zero_point.detach().cpu().to(torch.int32).contiguous()
    else:
        stored = rec.lut.detach().cpu().float().to(info.torch_dtype)
        if not torch.equal(stored.float(), rec.lut.detach().cpu().float()):
            raise ValueError(f"{name}: the LUT values are not exactly representable in lut_dtype={rec.lut_dtype!r}.")
        out[f"{name}{SEP}lut"] = stored.contiguous()
    if rec.scale is not None:
        out[f"{name}{SEP}scale"] = rec.scale.detach().cpu().float().contiguous()
    return out


def _record_meta(rec: lut_mod.PalettizedTensor) -> dict:
    return {
        "shape": list(rec.shape), "axis": rec.axis, "group_size": rec.group_size, "n_bits": rec.n_bits,
        "lut_dtype": rec.lut_dtype, "cluster_dim": rec.cluster_dim, "n_groups": rec.n_groups,
        "dtype": _dtype_name(rec.dtype), "has_scale": rec.scale is not None,
    }


def save_compressed(model: nn.Module, path: Union[str, os.PathLike]) -> dict:
    """Write ``model`` (finalized, with palettized weights) to one safetensors file, atomically.

    Returns sizes in bytes: ``palettized_float_bytes`` (dense size of the palettized weights),
    ``palettized_compressed_bytes`` (their indices + LUTs + scales), ``compressed_fraction`` (compressed / float) and
    ``file_bytes`` (the whole file).
    """
    from safetensors.torch import save_file

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    tensors, meta, palettized_params, float_bytes, compressed_bytes = _palettized_part(model)
    aliases = _plain_part(model, meta, palettized_params, tensors)
    header = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "palettized": json.dumps(meta, sort_keys=True),
        "aliases": json.dumps(aliases, sort_keys=True),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)
    return {
        "palettized_float_bytes": float_bytes,
        "palettized_compressed_bytes": compressed_bytes,
        "compressed_fraction": compressed_bytes / float_bytes if float_bytes else float("nan"),
        "file_bytes": Path(path).stat().st_size,
        "n_palettized": len(meta),
    }


def _palettized_part(model: nn.Module):
    """The tensors and metadata of every palettized weight, the ids of their parameters, and their byte sizes."""
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, dict] = {}
    palettized_params: dict[int, str] = {}
    float_bytes = compressed_bytes = 0
    for name, module, param_name, rec in palettized_tensors(model):
        if rec.lut_dtype not in LUT_DTYPES:
            raise ValueError(f"{name}: lut_dtype={rec.lut_dtype!r} is not one of {', '.join(LUT_DTYPES)}.")
        part = _record_tensors(name, rec)
        tensors.update(part)
        meta[name] = _record_meta(rec)
        float_bytes += rec.numel * torch.empty((), dtype=rec.dtype).element_size()
        compressed_bytes += sum(_tensor_bytes(t) for t in part.values())
        palettized_params[id(getattr(module, param_name))] = name
    return tensors, meta, palettized_params, float_bytes, compressed_bytes


def _plain_part(model: nn.Module, meta: dict, palettized_params: dict, tensors: dict) -> dict[str, str]:
    """Add every other state_dict entry to ``tensors`` once; returns the aliases of tied (shared) entries."""
    aliases: dict[str, str] = {}
    seen_storage: dict[tuple, str] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        if key in meta:
            continue
        if id(value) in palettized_params:  # a tied weight that is stored palettized under another name
            aliases[key] = palettized_params[id(value)]
            continue
        tensor = value.detach().cpu()
        storage_key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                       tensor.dtype) if tensor.numel() else None
        if storage_key is not None and storage_key in seen_storage:
            aliases[key] = seen_storage[storage_key]
            continue
        if storage_key is not None:
            seen_storage[storage_key] = key
        tensors[key] = tensor.clone().contiguous()
    return aliases


# ----------------------------------------------------------------------------------------------- loading


def _read_file(path: Path):
    from safetensors import safe_open

    if not path.is_file():
        raise FileNotFoundError(f"no compressed model file at {str(path)!r}.")
    try:
        handle = safe_open(str(path), framework="pt")
        header = handle.metadata() or {}
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    except Exception as err:  # safetensors raises its own error types for garbage/truncated files
        raise ValueError(f"{str(path)!r} is not a readable safetensors file (wrong or corrupt file): {err}") from None
    if header.get("format") != FORMAT_NAME:
        raise ValueError(
            f"{str(path)!r} is a safetensors file but not a dkm_palett compressed model "
            f"(metadata format={header.get('format')!r}, expected {FORMAT_NAME!r}); use save_compressed to write one."
        )
    version = header.get("format_version")
    if version != str(FORMAT_VERSION):
        raise ValueError(
            f"{str(path)!r} has compressed format version {version!r}; this dkm_palett reads version "
            f"{FORMAT_VERSION}. Re-export it with a matching dkm_palett version."
        )
    try:
        meta = json.loads(header["palettized"])
        aliases = json.loads(header.get("aliases", "{}"))
    except (KeyError, json.JSONDecodeError) as err:
        raise ValueError(f"{str(path)!r}: corrupt metadata ({err}).") from None
    return meta, aliases, tensors


def _take(tensors: dict, key: str, path: Path) -> torch.Tensor:
    try:
        return tensors.pop(key)
    except KeyError:
        raise ValueError(f"{str(path)!r}: tensor {key!r} is missing (corrupt file).") from None


def _rebuild_record(name: str, info: dict, tensors: dict, path: Path) -> lut_mod.PalettizedTensor:
    try:
        shape = tuple(int(s) for s in info["shape"])
        axis, group_size, n_bits = int(info["axis"]), int(info["group_size"]), int(info["n_bits"])
        lut_dtype, cluster_dim = str(info["lut_dtype"]), int(info["cluster_dim"])
        n_groups, has_scale = int(info["n_groups"]), bool(info["has_scale"])
        dtype = _dtype_from_name(info["dtype"], name)
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{str(path)!r}: corrupt metadata for {name!r} ({err}).") from None
    if lut_dtype not in LUT_DTYPES:
        raise ValueError(f"{str(path)!r}: {name!r} has unknown lut_dtype {lut_dtype!r}.")
    numel = math.prod(shape)
    count = numel // cluster_dim
    packed = _take(tensors, f"{name}{SEP}indices", path)
    if packed.dtype != torch.uint8 or packed.numel() != math.ceil(count * n_bits / 8):
        raise ValueError(f"{str(path)!r}: packed indices of {name!r} have the wrong size (corrupt file).")
    indices = lut_mod.unpack_indices(packed, n_bits, count).reshape(n_groups, count // n_groups)
    lut_quant = None
    if LUT_DTYPE_TABLE[lut_dtype].is_integer:
        lut_quant = lut_mod.LutQuantization(
            q=_take(tensors, f"{name}{SEP}lut_q", path),
            scale=_take(tensors, f"{name}{SEP}lut_scale", path).float(),
            zero_point=_take(tensors, f"{name}{SEP}lut_zero_point", path).to(torch.int32),
        )
        values = lut_quant.dequantize()
    else:
        values = _take(tensors, f"{name}{SEP}lut", path).float()
    if tuple(values.shape) != (n_groups, 2 ** n_bits, cluster_dim):
        raise ValueError(f"{str(path)!r}: LUT of {name!r} has shape {tuple(values.shape)}, expected "
                         f"{(n_groups, 2 ** n_bits, cluster_dim)} (corrupt file).")
    scale = _take(tensors, f"{name}{SEP}scale", path).float() if has_scale else None
    return lut_mod.PalettizedTensor(
        lut=values, indices=indices, shape=shape, axis=axis, group_size=group_size, n_bits=n_bits,
        lut_dtype=lut_dtype, scale=scale, lut_quant=lut_quant, dtype=dtype,
    )


def _split(name: str) -> tuple[str, str]:
    mod_name, _, param_name = name.rpartition(".")
    return mod_name, param_name


def load_compressed(path: Union[str, os.PathLike], model: nn.Module) -> nn.Module:
    """Load a file written by :func:`save_compressed` into ``model`` (same architecture, plain modules).

    Palettized weights are restored bit-exactly and get their PalettizedTensor records back (so the model can be
    exported again); all other tensors are loaded as they are. Returns ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    path = Path(path)
    meta, aliases, tensors = _read_file(path)

    expected = model.state_dict()
    problems = []
    for name, info in meta.items():
        if name not in expected:
            problems.append(f"palettized weight {name!r} is not a parameter of the model")
        elif tuple(expected[name].shape) != tuple(info.get("shape", ())):
            problems.append(f"{name!r} has shape {tuple(expected[name].shape)} in the model but "
                            f"{tuple(info.get('shape', ()))} in the file")
    plain = {k for k in tensors if SEP not in k}
    for key in sorted(plain):
        if key not in expected:
            problems.append(f"{key!r} is in the file but not in the model")
        elif tuple(expected[key].shape) != tuple(tensors[key].shape):
            problems.append(f"{key!r} has shape {tuple(expected[key].shape)} in the model but "
                            f"{tuple(tensors[key].shape)} in the file")
    missing = sorted(set(expected) - plain - set(meta) - set(aliases))
    if missing:
        problems.append(f"the file has no value for {', '.join(map(repr, missing))}")
    if problems:
        raise ValueError(f"{str(path)!r} does not match the model: " + "; ".join(problems) + ".")

    records = {name: _rebuild_record(name, info, tensors, path) for name, info in meta.items()}
    leftover = sorted(k for k in tensors if SEP in k)
    if leftover:
        raise ValueError(f"{str(path)!r}: unexpected tensors {leftover} (corrupt file?).")

    state = {k: tensors[k] for k in plain}
    for alias, source in aliases.items():
        if alias in expected and source in state:
            state[alias] = state[source]
    result = model.load_state_dict(state, strict=False)
    unexpected = list(result.unexpected_keys)
    if unexpected:  # cannot happen after the checks above; kept as a guard
        raise ValueError(f"{str(path)!r}: keys not in the model: {unexpected}.")
    for name, record in records.items():
        mod_name, param_name = _split(name)
        module = model.get_submodule(mod_name) if mod_name else model
        attach(module, param_name, record)
    return model
