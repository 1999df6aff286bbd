"""PalettizedWeight: a finalized weight that stores its record (uint8 indices + LUT), a torchao-style tensor subclass.

``finalize``, ``palettize_weights``, the k-means palettizers and ``load_compressed`` put a :class:`PalettizedWeight`
in place of each palettized parameter (:func:`attach`). It is a tensor of the weight's shape and dtype that holds only
the :class:`~dkm_palett.lut.PalettizedTensor` record's tensors (like torchao's ``CodebookQuantizedTensor``), so

- ``state_dict`` / ``torch.save`` / ``torch.load(weights_only=True)`` / ``copy.deepcopy`` / ``module.to()`` carry the
  record, and ``load_state_dict`` of such a state_dict gives the module the record back: into a finalized module the
  record's tensors are copied; into a plain parameter (e.g. Lightning's ``ddp_spawn`` handing the workers' weights
  back to the main process) the parameter is swapped for the palettized weight (``torch.utils.swap_tensors``, as
  torch does for tensor subclasses under ``swap_module_params_on_conversion``); loading a plain tensor into a
  palettized weight swaps it back to a plain parameter;
- ``F.linear`` / ``F.conv*`` / ``F.embedding`` and every other op read the dense weight ``LUT[indices] (* scale)``,
  built per call (:meth:`PalettizedWeight.dequantize`); the weight is frozen (``requires_grad=False``) and in-place
  ops raise. To train it again, ``DKMPalettizer.prepare`` turns it back into a plain parameter (:func:`make_dense`).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_map_only

from dkm_palett.lut import LutQuantization, PalettizedTensor

aten = torch.ops.aten

# the record's tensors, as attributes of the weight (None when unused)
_INNER = ("lut", "indices", "scale", "lut_q", "lut_q_scale", "lut_q_zero_point")
# functions that take the weight as an argument and run on its dense value once per call
_DENSE_FUNCTIONS = {F.linear, F.bilinear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d,
                    F.conv_transpose3d, F.embedding, F.embedding_bag,
                    torch.Tensor.numpy, torch.Tensor.__array__, torch.Tensor.tolist}


class PalettizedWeight(torch.Tensor):
    """A palettized weight of shape ``shape`` and dtype ``dtype`` stored as uint8 ``indices (G, M)`` into a float32
    ``lut (G, K, D)`` (+ a per-channel ``scale (C,)``, + the integer LUT ``lut_q``/``lut_q_scale``/
    ``lut_q_zero_point`` of i8/u8 LUTs), in the grouped layout of :mod:`dkm_palett.lut`. ``record`` is its
    :class:`~dkm_palett.lut.PalettizedTensor` (a view sharing these tensors)."""

    lut: torch.Tensor
    indices: torch.Tensor
    scale: Optional[torch.Tensor]
    lut_q: Optional[torch.Tensor]
    lut_q_scale: Optional[torch.Tensor]
    lut_q_zero_point: Optional[torch.Tensor]

    @staticmethod
    def __new__(cls, tensors: dict, shape: tuple[int, ...], dtype: torch.dtype, axis: int, group_size: int,
                n_bits: int, lut_dtype: str):
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=tensors["indices"].device,
                                                   requires_grad=False)

    def __init__(self, tensors: dict, shape: tuple[int, ...], dtype: torch.dtype, axis: int, group_size: int,
                 n_bits: int, lut_dtype: str):
        for name in _INNER:
            setattr(self, name, tensors.get(name))
        self.axis, self.group_size, self.n_bits, self.lut_dtype = int(axis), int(group_size), int(n_bits), lut_dtype

    # ------------------------------------------------------------------------------------ record
    @classmethod
    def from_record(cls, record: PalettizedTensor, device: Optional[torch.device] = None) -> "PalettizedWeight":
        """The weight holding ``record``'s tensors (moved to ``device`` when given)."""
        if not isinstance(record, PalettizedTensor):
            raise TypeError(f"record must be a PalettizedTensor, got {type(record).__name__}.")
        tensors = {"lut": record.lut.float(), "indices": record.indices, "scale": record.scale}
        if record.lut_quant is not None:
            tensors.update(lut_q=record.lut_quant.q, lut_q_scale=record.lut_quant.scale,
                           lut_q_zero_point=record.lut_quant.zero_point)
        if device is not None:
            tensors = {k: None if v is None else v.to(device) for k, v in tensors.items()}
        return cls(tensors, tuple(record.shape), record.dtype, record.axis, record.group_size, record.n_bits,
                   record.lut_dtype)

    @property
    def record(self) -> PalettizedTensor:
        lut_quant = None
        if self.lut_q is not None:
            lut_quant = LutQuantization(q=self.lut_q, scale=self.lut_q_scale, zero_point=self.lut_q_zero_point)
        return PalettizedTensor(lut=self.lut, indices=self.indices, shape=tuple(self.shape), axis=self.axis,
                                group_size=self.group_size, n_bits=self.n_bits, lut_dtype=self.lut_dtype,
                                scale=self.scale, lut_quant=lut_quant, dtype=self.dtype)

    def dequantize(self) -> torch.Tensor:
        """The dense weight ``LUT[indices] (* scale)``, a plain tensor of this weight's shape, dtype and device."""
        return self.record.to_dense()

    def _rebuilt(self, fn, dtype: Optional[torch.dtype] = None) -> "PalettizedWeight":
        """A new weight with ``fn`` applied to each inner tensor (and the dense dtype ``dtype``)."""
        tensors = {name: None if getattr(self, name) is None else fn(getattr(self, name)) for name in _INNER}
        return PalettizedWeight(tensors, tuple(self.shape), dtype or self.dtype, self.axis, self.group_size,
                                self.n_bits, self.lut_dtype)

    def __repr__(self, *, tensor_contents=None) -> str:
        return (f"PalettizedWeight(shape={tuple(self.shape)}, dtype={self.dtype}, n_bits={self.n_bits}, "
                f"groups={self.lut.shape[0]}, cluster_dim={self.lut.shape[-1]}, lut_dtype={self.lut_dtype!r}, "
                f"per_channel_scale={self.scale is not None}, device={self.device})")

    # ------------------------------------------------------------------------------------ tensor subclass protocol
    def __tensor_flatten__(self):
        names = [name for name in _INNER if getattr(self, name) is not None]
        return names, (tuple(self.shape), self.dtype, self.axis, self.group_size, self.n_bits, self.lut_dtype)

    @staticmethod
    def __tensor_unflatten__(inner_tensors, ctx, outer_size, outer_stride):
        shape, dtype, axis, group_size, n_bits, lut_dtype = ctx
        return PalettizedWeight(dict(inner_tensors), tuple(outer_size), dtype, axis, group_size, n_bits, lut_dtype)

    def __reduce_ex__(self, protocol):
        """Pickle as the inner (plain) tensors and the metadata, so ``torch.load`` restores it with any
        ``map_location`` (Lightning's callable one included) and under ``weights_only=True``."""
        names, ctx = self.__tensor_flatten__()
        return _rebuild, ({name: getattr(self, name) for name in names}, ctx, isinstance(self, nn.Parameter))

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.copy_ and len(args) == 2 and not kwargs:
            dest, src = args
            if isinstance(src, cls) != isinstance(dest, cls):  # a load_state_dict between the two kinds
                return _swap_in(dest, src)
        if func is torch.Tensor.module_load:  # load_state_dict under torch.__future__ swap_module_params_on_conversion
            dest, src = args
            return _loaded(dest, src)
        if func in _DENSE_FUNCTIONS:
            args, kwargs = _dense(args), _dense(kwargs)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = _HANDLERS.get(func)
        if handler is not None:
            return handler(*args, **kwargs)
        if func._schema.is_mutable:
            raise TypeError(f"{func}: a PalettizedWeight is read-only (a finalized weight stores LUT indices); "
                            "prepare the model again (DKMPalettizer.prepare) to train it, or use .dequantize().")
        if func.is_view:  # a view of a tensor made outside inference mode must not be an inference tensor
            with torch.inference_mode(False):
                return func(*_dense(args), **_dense(kwargs))
        return func(*_dense(args), **_dense(kwargs))


def _dense(tree):
    return tree_map_only(PalettizedWeight, PalettizedWeight.dequantize, tree)


def _detach(self: PalettizedWeight) -> PalettizedWeight:
    return self._rebuilt(lambda t: t)


def _clone(self: PalettizedWeight, memory_format=None) -> PalettizedWeight:
    return self._rebuilt(torch.clone)


def _to_copy(self: PalettizedWeight, dtype=None, device=None, layout=None, pin_memory=None, non_blocking=False,
             memory_format=None):
    if dtype is not None and not dtype.is_floating_point:  # an integer/bool view of the dense values
        return self.dequantize().to(dtype=dtype, device=device)
    move = (lambda t: t.to(device, non_blocking=non_blocking)) if device is not None else torch.clone
    return self._rebuilt(move, dtype)


def _copy(self: PalettizedWeight, src: torch.Tensor, non_blocking: bool = False) -> PalettizedWeight:
    """``self.copy_(src)`` between palettized weights of the same layout (``load_state_dict`` into a finalized
    module); other combinations are handled (swapped) in ``__torch_function__``."""
    same = (isinstance(src, PalettizedWeight) and src.shape == self.shape and
            src.__tensor_flatten__()[1][2:] == self.__tensor_flatten__()[1][2:] and
            all((getattr(src, n) is None) == (getattr(self, n) is None) and
                (getattr(src, n) is None or getattr(src, n).shape == getattr(self, n).shape) for n in _INNER))
    if not same:
        what = repr(src) if isinstance(src, PalettizedWeight) else f"a {type(src).__name__} of shape {tuple(src.shape)}"
        raise ValueError(f"cannot copy {what} into {self!r}: the palettized layouts differ (n_bits, LUT groups, "
                         "cluster_dim, LUT dtype or scale).")
    for name in _INNER:
        if getattr(self, name) is not None:
            getattr(self, name).copy_(getattr(src, name), non_blocking=non_blocking)
    return self


_HANDLERS = {
    aten.detach.default: _detach,
    aten.alias.default: _detach,
    aten.clone.default: _clone,
    aten._to_copy.default: _to_copy,
    aten.copy_.default: _copy,
}


def _loaded(dest: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """What ``load_state_dict`` puts in place of ``dest`` for the saved value ``src`` (a new object)."""
    if isinstance(src, PalettizedWeight):
        if isinstance(dest, PalettizedWeight):
            return dest.clone().copy_(src)
        return src.to(dest.device).clone()
    value = src.detach().to(dest.device, dest.dtype).clone()
    return nn.Parameter(value, requires_grad=True) if isinstance(dest, nn.Parameter) else value


def _swap_in(dest: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``dest.copy_(src)`` where one of them is palettized: ``dest`` becomes (in place, keeping its identity and so
    ties and module references) a palettized weight holding ``src``'s record, or a plain tensor of ``src``'s values."""
    if tuple(dest.shape) != tuple(src.shape):
        raise ValueError(f"copy_: shape {tuple(src.shape)} does not match {tuple(dest.shape)}.")
    new = _loaded(dest, src)
    if isinstance(new, PalettizedWeight) and isinstance(dest, nn.Parameter):
        new = nn.Parameter(new, requires_grad=False)
    try:
        torch.utils.swap_tensors(dest, new)
    except RuntimeError as err:
        raise RuntimeError(f"cannot turn this {type(dest).__name__} into {type(src).__name__} in place ({err}); "
                           "load with load_state_dict(..., assign=True), or into a module without autograd "
                           "history.") from err
    return dest


def _rebuild(tensors: dict, ctx: tuple, is_param: bool) -> torch.Tensor:
    shape, dtype, axis, group_size, n_bits, lut_dtype = ctx
    weight = PalettizedWeight(tensors, shape, dtype, axis, group_size, n_bits, lut_dtype)
    return nn.Parameter(weight, requires_grad=False) if is_param else weight


# torch.load(weights_only=True) of its state_dicts, in a process that imported dkm_palett (as torchao does)
torch.serialization.add_safe_globals([_rebuild])


# ----------------------------------------------------------------------------------------------- on modules


def attach(module: nn.Module, param_name: str, record: PalettizedTensor) -> None:
    """Make ``module.<param_name>`` the palettized weight of ``record``, frozen (``requires_grad=False``): the same
    parameter object where ``torch.utils.swap_tensors`` allows it (tied weights stay tied), else a new parameter
    (e.g. a weight still referenced by an autograd graph of DKM training)."""
    param = getattr(module, param_name)
    weight = nn.Parameter(PalettizedWeight.from_record(record, param.device), requires_grad=False)
    if weight.dtype != record.dtype:
        raise ValueError(f"{param_name}: record dtype {record.dtype} is not the weight's {weight.dtype}.")
    try:
        torch.utils.swap_tensors(param, weight)
    except RuntimeError:  # e.g. weak references to the old parameter: a new parameter object instead
        setattr(module, param_name, weight)


def make_dense(module: nn.Module, param_name: str) -> Optional[PalettizedTensor]:
    """Turn the palettized ``module.<param_name>`` back into a plain trainable parameter of the same values (in
    place); returns its record (None when the weight is not palettized)."""
    param = module._parameters.get(param_name)
    if not isinstance(param, PalettizedWeight):
        return None
    record = param.record
    dense = nn.Parameter(param.dequantize(), requires_grad=True)
    try:
        torch.utils.swap_tensors(param, dense)
    except RuntimeError:
        setattr(module, param_name, dense)
    return record


def records_of(module: nn.Module) -> dict[str, PalettizedTensor]:
    """``{param_name: record}`` of ``module``'s own palettized parameters."""
    return {name: p.record for name, p in module._parameters.items() if isinstance(p, PalettizedWeight)}


def palettized_tensors(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, PalettizedTensor]]:
    """Yield ``(qualified_name, module, param_name, record)`` for every palettized weight in ``model`` (a weight
    tied to several modules once, under its first name)."""
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        for param_name, param in module._parameters.items():
            if isinstance(param, PalettizedWeight) and id(param) not in seen:
                seen.add(id(param))
                full = f"{mod_name}.{param_name}" if mod_name else param_name
                yield full, module, param_name, param.record


@contextlib.contextmanager
def dense_weights(model: nn.Module) -> Iterator[None]:
    """Temporarily replace every palettized weight of ``model`` by a plain parameter of its dense values (for
    tracers that do not take tensor subclasses, e.g. ``torch.jit.trace``); tied weights stay tied."""
    saved: list[tuple[nn.Module, str, nn.Parameter]] = []
    dense: dict[int, nn.Parameter] = {}
    try:
        for module in model.modules():
            for name, param in list(module._parameters.items()):
                if isinstance(param, PalettizedWeight):
                    if id(param) not in dense:
                        dense[id(param)] = nn.Parameter(param.dequantize(), requires_grad=False)
                    saved.append((module, name, param))
                    module._parameters[name] = dense[id(param)]
        yield
    finally:
        for module, name, param in reversed(saved):
            module._parameters[name] = param
