"""Give the C heap's free memory back to the operating system during a DKM backward (glibc 2.33+ only).

glibc's ``malloc`` keeps freed memory for reuse, and tensors under its mmap threshold (which grows with use, up to
32 MiB) live on that heap. Each layer's DKM backward allocates and frees full-size transients: the recomputed
palettized weight, its gradient, the binned DKM's per-grid-point tensors. Their sizes differ from layer to layer, so
the freed chunks do not fit the next layer's tensors and the heap grows: on the 350M decoder at 8 bits about 500 MB
of freed memory was still resident when the backward reached the embedding, on top of what was live.
``malloc_trim(0)`` returns it (the whole free pages of every arena), so the peak holds what is live.

:func:`install` puts a forward hook on a palettized module. In a training forward with grad enabled it hooks the
module's output, whose gradient arrives just before the module's own backward. That hook trims:

* always before a module whose DKM weights take at least ``MMAP_THRESHOLD_MAX`` bytes: its full-size tensors are
  never served from the heap, so whatever the heap holds free then only adds to the peak (the embedding and the
  head of a 125M decoder, its last and first backward);
* before any other DKM module once the free heap grew by more than ``FREE_HEAP_LIMIT`` since the last trim
  (``mallinfo2``: a fraction of a millisecond). So the retained memory stays under that limit plus one layer's
  transients, and each trim returns at least the limit.

The cost is a few trims a step and faulting the returned pages back in when later layers reuse them (measured in
benchmarks/results/model_scale.md). Trimming on every free instead (``MALLOC_TRIM_THRESHOLD_=0``) made the 125M model's 8-bit step 1.85x slower.

Elsewhere (macOS, Windows, musl, glibc before 2.33) it does nothing. ``FakePalettize.trim_heap = False`` turns it
off.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Callable, Optional

import torch
from torch import nn

#: Trim once the C heap's free memory grew by more than this since the last trim.
FREE_HEAP_LIMIT = 256 << 20
#: glibc's largest automatic mmap threshold on 64-bit systems (``DEFAULT_MMAP_THRESHOLD_MAX``): an allocation at least
#: this big is always mapped, never served from the heap.
MMAP_THRESHOLD_MAX = 32 << 20
_state = {"free_after_trim": 0}  # the free heap (mallinfo2().fordblks) right after the last trim


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


@functools.lru_cache(maxsize=1)
def _glibc() -> Optional[tuple[Callable[[int], int], Callable[[], _MallInfo2]]]:
    """glibc's ``malloc_trim`` and ``mallinfo2``, or None where the C library lacks either."""
    try:
        libc = ctypes.CDLL(None)  # the symbols the process has loaded, the C library's among them
    except (OSError, TypeError):  # TypeError: Windows wants a name
        return None
    trim, info = (getattr(libc, f, None) for f in ("malloc_trim", "mallinfo2"))
    if trim is None or info is None:
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    info.argtypes, info.restype = [], _MallInfo2
    return trim, info


def free_heap_bytes() -> Optional[int]:
    """Free bytes the C heap holds (``mallinfo2().fordblks``, every arena), or None without glibc 2.33+."""
    funcs = _glibc()
    return None if funcs is None else funcs[1]().fordblks


def release_free_heap() -> None:
    """``malloc_trim(0)``: return every free page of the C heap to the OS (glibc; otherwise nothing)."""
    funcs = _glibc()
    if funcs is not None:
        funcs[0](0)


def trim_if_large(_grad: Optional[torch.Tensor] = None, always: bool = False) -> None:
    """Trim when the free heap grew by more than ``FREE_HEAP_LIMIT`` since the last trim (a trim leaves the chunks
    free, only their pages go back, so the free total itself does not fall), or ``always``. Also a tensor gradient
    hook: it leaves the gradient as it is."""
    free = free_heap_bytes()
    if free is None:
        return
    if always or free - _state["free_after_trim"] > FREE_HEAP_LIMIT:
        release_free_heap()
        _state["free_after_trim"] = free
    elif free < _state["free_after_trim"]:  # trimmed chunks in use again: resident again
        _state["free_after_trim"] = free


def dkm_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s CPU weights whose DKM parametrization is training and asks to trim (``trim_heap``)."""
    total = 0
    for plist in getattr(module, "parametrizations", {}).values():
        original = plist.original
        if original.device.type == "cpu" and any(
                getattr(fp, "trim_heap", False) and fp.training and bool(getattr(fp, "enabled", False)) for fp in plist):
            total += original.numel() * original.element_size()
    return total


def _arm(module: nn.Module, _args, output) -> None:
    if not (torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad
            and _glibc() is not None):
        return
    size = dkm_bytes(module)
    if size > 0:
        output.register_hook(backward_hook(size))  # the output's gradient arrives just before the module's backward


def backward_hook(nbytes: int) -> Callable[[torch.Tensor], None]:
    """The gradient hook for the output of a module whose weights take ``nbytes``: it always trims when the module's
    tensors never come from the heap (whatever the heap holds free is waste then), otherwise past the limit."""
    return _trim_always if nbytes >= MMAP_THRESHOLD_MAX else trim_if_large


def _trim_always(_grad: torch.Tensor) -> None:
    trim_if_large(always=True)


def install(module: nn.Module) -> None:
    """Check the free heap before ``module``'s backward (once per module)."""
    if _arm not in module._forward_hooks.values():
        module.register_forward_hook(_arm)


def uninstall(module: nn.Module) -> None:
    """Remove what :func:`install` added (finalize, once the module holds no DKM layer)."""
    for key in [k for k, fn in module._forward_hooks.items() if fn is _arm]:
        del module._forward_hooks[key]
