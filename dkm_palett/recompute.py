"""Recompute the palettized weight in backward instead of keeping it (4 bytes a weight for every layer).

A DKM layer's output ``W_p`` is what the module's matmul/conv saves for its backward (``dL/dinput = g @ W_p``).
Kept for every layer, that is one more full copy of the model's weights until the backward reaches the layer.
Instead, while a palettized module runs its forward, a saved-tensor hook swaps any saved view of a registered
``W_p`` for a small :class:`Replay` (the previous centroids, the DKM knobs, the view's geometry) and rebuilds the
view from the weight when the backward needs it. The rebuild runs the same operations on the same inputs, so outputs
and gradients are bit-identical to the stored path (tests/test_recompute.py).
"""

from __future__ import annotations

import threading
import weakref
from typing import Callable

import torch
from torch import nn

_local = threading.local()


def _pending() -> dict:
    """``storage data_ptr -> (weakref to W_p, rebuild)`` of this thread's live palettized weights."""
    if not hasattr(_local, "pending"):
        _local.pending = {}
    return _local.pending


class Replay:
    """A saved view of a palettized weight, rebuilt on unpack by ``rebuild()`` (which returns ``W_p``)."""

    __slots__ = ("rebuild", "size", "stride", "offset", "param", "version")

    def __init__(self, rebuild: Callable[[], torch.Tensor], view: torch.Tensor, param: torch.Tensor):
        self.rebuild = rebuild
        self.size, self.stride, self.offset = view.size(), view.stride(), view.storage_offset()
        self.param, self.version = param, param._version

    def unpack(self) -> torch.Tensor:
        if self.param._version != self.version:
            raise RuntimeError("a palettized weight was modified in place between forward and backward (e.g. an "
                               "optimizer step before backward), so its DKM output cannot be recomputed; call "
                               "backward before changing the weights, or set FakePalettize.recompute = False.")
        with torch.no_grad():
            full = self.rebuild()
        return full.as_strided(self.size, self.stride, self.offset)


def register_output(output: torch.Tensor, param: torch.Tensor, rebuild: Callable[[], torch.Tensor]) -> None:
    """Mark ``output`` (a palettized weight computed from ``param``) as recomputable by ``rebuild``."""
    pending = _pending()
    for key in [k for k, (ref, _, _) in pending.items() if ref() is None]:
        del pending[key]
    pending[output.untyped_storage().data_ptr()] = (weakref.ref(output), param, rebuild)


def _pack(t: torch.Tensor):
    entry = _pending().get(t.untyped_storage().data_ptr()) if t.layout == torch.strided else None
    if entry is None:
        return t
    ref, param, rebuild = entry
    out = ref()
    if out is None or out.untyped_storage().data_ptr() != t.untyped_storage().data_ptr() or out.dtype != t.dtype:
        return t
    return Replay(rebuild, t, param)


def _unpack(saved):
    return saved.unpack() if isinstance(saved, Replay) else saved


def _enter(module: nn.Module, _args) -> None:
    hooks = torch.autograd.graph.saved_tensors_hooks(_pack, _unpack)
    hooks.__enter__()
    module.__dict__.setdefault("_dkm_recompute_stack", []).append(hooks)


def _exit(module: nn.Module, _args, _output) -> None:
    stack = module.__dict__.get("_dkm_recompute_stack")
    if stack:
        stack.pop().__exit__(None, None, None)


def install(module: nn.Module) -> None:
    """Run ``module``'s forward under the recompute hooks (once per module; a deepcopy keeps them)."""
    if _enter in module._forward_pre_hooks.values():
        return
    module.register_forward_pre_hook(_enter)
    module.register_forward_hook(_exit, always_call=True)


def uninstall(module: nn.Module) -> None:
    """Remove what :func:`install` added (finalize, once the module holds no DKM layer)."""
    for hooks in (module._forward_pre_hooks, module._forward_hooks):
        for key in [k for k, fn in hooks.items() if fn is _enter or fn is _exit]:
            del hooks[key]
            module._forward_hooks_always_called.pop(key, None)
