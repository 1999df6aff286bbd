"""Keep the C heap's memory for reuse during DKM training, and give back only what piles up (glibc 2.33+ only).

Each layer's DKM backward allocates and frees full-size transients: the recomputed palettized weight, its gradient,
the binned DKM's per-grid-point tensors. By default glibc maps every allocation of 32 MiB or more on its own and
unmaps it on free, and the tensors under that live on the heap, where layers of different sizes leave holes. Both
cost: memory the OS gives back must be faulted in and zeroed again on the next use (on the 1.1B decoder at 4 bits,
16 GB of page faults and 19 s of system CPU time a 25 s step), and holes held on the heap add to the peak.

While a DKM layer trains on CPU (:func:`arm` on its forward) this module:

* once a step trains ``REUSE_MIN_BYTES`` of DKM weights, asks glibc (``mallopt``) to serve every allocation from
  the heap (``M_MMAP_MAX`` 0) and never to trim the heap's top by itself (``M_TRIM_THRESHOLD`` -1), so what a step
  frees (last step's gradients, each layer's transients) is reused by the next allocations instead of being
  unmapped and faulted back; ``finalize`` (:func:`release`) restores glibc's defaults;
* so tuned, takes the free heap at the first DKM forward of each step as the baseline: what ``zero_grad`` and the
  previous step freed, which this step's gradients and transients reuse;
* before each DKM module's backward, ``malloc_trim(0)`` (the whole free pages of every arena back to the OS) once the
  free heap grew by more than :func:`trim_limit` over that baseline or the last trim (a sixteenth of the step's DKM
  weights, 64 to 256 MiB), so the memory held free stays under about twice the limit (the free heap, ``mallinfo2``,
  is read once a quarter of the limit in DKM weights went through backward since the last read: ``CHECK_FRACTION``);
  untuned, also always before a module of ``MMAP_THRESHOLD_MAX`` or more, whose tensors glibc maps anyway (the
  embedding and the head of a 125M decoder, its last and first backward).

Measured on the decoders of ``benchmarks/model_scale.py`` (1x128 tokens; ``REUSE_MIN_BYTES`` has the numbers)
against the previous policy (glibc's maps, a trim before every module of 32 MiB or more, which at 1.1B unmapped and
faulted back about 16 GB a step). The trim before each big module also returned what ``zero_grad`` had just freed,
so every new gradient faulted its pages in again: the baseline keeps that for reuse.

Elsewhere (macOS, Windows, musl, glibc before 2.33) it does nothing. ``FakePalettize.trim_heap = False`` turns it
off.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Callable, Optional

import torch
from torch import nn

#: Trim once the C heap's free memory grew over the step's baseline (or the last trim) by more than
#: ``trim_limit()``: a FREE_HEAP_FRACTION of the DKM weight bytes the step's forward armed, within
#: [FREE_HEAP_MIN, FREE_HEAP_LIMIT]. Relative, so what is held free stays a small part of the model's peak.
FREE_HEAP_LIMIT = 256 << 20
FREE_HEAP_MIN = 64 << 20  # over a few 16 MB layers' transients: small models do not trim every step
FREE_HEAP_FRACTION = 16
#: Read the free heap (``mallinfo2``, which walks every arena's free lists: 1-2 ms a call on a 350M decoder's heap,
#: 0.4 s of a 5.9 s step when read before each of its 170 modules) only once the DKM weights whose backward ran since
#: the last read reach ``trim_limit() // CHECK_FRACTION``. A module's backward frees a few times its weight bytes
#: (its recomputed output, the output's gradient), so what piles up unseen stays under about the limit.
CHECK_FRACTION = 4
#: glibc ``mallopt`` parameters (``malloc.h``) and the values set while DKM trains, then glibc's defaults.
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
#: -1: glibc never trims the top of the heap on free (mallopt(3)), so the trims below are the only ones. With a 1 GiB
#: threshold instead, ``zero_grad`` freeing a 1.1B model's 4.4 GB of gradients into the top made glibc return them,
#: and the next backward faulted them back: 3-4 GiB of page faults and 8-12 s of system CPU time in a 18 s step
#: (this machine's faults cost 5-10 us of system time a page), 1-1.3 GiB and 0.5 s in a 350M decoder's 5.1-5.4 s
#: step. At -1, back to back: 1.1B 12.3 s a step with no faults after the second, peak 10.3 GiB (10.5 at 1 GiB; the
#: benchmark cells read 10.5-11.0); 350M 4.9 s.
TOP_TRIM_THRESHOLD = -1
GLIBC_DEFAULTS = {M_TRIM_THRESHOLD: 128 * 1024, M_MMAP_MAX: 65536}
#: glibc's largest automatic mmap threshold on 64-bit systems (``DEFAULT_MMAP_THRESHOLD_MAX``): with glibc's
#: defaults, an allocation at least this big is always mapped, never served from the heap.
MMAP_THRESHOLD_MAX = 32 << 20
#: Serve every tensor from the heap once a step's forward armed this many bytes of DKM weights (about 250M fp32
#: parameters). Measured back to back at 4 bits, 1x128 tokens (with a 1 GiB top trim threshold): 1.1B (4.4 GB) 25.6
#: -> 17.7-18.8 s a step, peak 1.05-1.12x plain's instead of 0.98x; 350M (1.5 GB) 6.9 -> 5.9 s, 1.05-1.15x instead
#: of 1.01-1.03x; 125M (0.5 GB) 2.12 -> 1.9 s but 1.22-1.32x instead of 1.10x (over #10's 1.25x; its embedding's
#: and head's 98 MB transients are a large part of its peak), so smaller models keep glibc's maps. With the top
#: never trimmed, 125M: 2.1 -> 1.7 s, peak 1.71 GiB against plain's 1.40 (1.22x), still too close to the bound.
REUSE_MIN_BYTES = 1 << 30
#: free_after_trim: the free heap (mallinfo2().fordblks) at the baseline or the last trim; backward: a DKM backward
#: check ran since the last baseline; tuned: mallopt applied; step_bytes: the DKM weight bytes armed since the baseline;
#: unchecked: the DKM weight bytes whose backward ran since the free heap was last read
_state = {"free_after_trim": 0, "backward": True, "tuned": False, "step_bytes": 0, "unchecked": 0}


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


@functools.lru_cache(maxsize=1)
def _glibc() -> Optional[tuple[Callable[[int], int], Callable[[], _MallInfo2], Callable[[int, int], int]]]:
    """glibc's ``malloc_trim``, ``mallinfo2`` and ``mallopt``, or None where the C library lacks any of them."""
    try:
        libc = ctypes.CDLL(None)  # the symbols the process has loaded, the C library's among them
    except (OSError, TypeError):  # TypeError: Windows wants a name
        return None
    trim, info, opt = (getattr(libc, f, None) for f in ("malloc_trim", "mallinfo2", "mallopt"))
    if trim is None or info is None or opt is None:
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    info.argtypes, info.restype = [], _MallInfo2
    opt.argtypes, opt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return trim, info, opt


def free_heap_bytes() -> Optional[int]:
    """Free bytes the C heap holds (``mallinfo2().fordblks``, every arena), or None without glibc 2.33+."""
    funcs = _glibc()
    return None if funcs is None else funcs[1]().fordblks


def release_free_heap() -> None:
    """``malloc_trim(0)``: return every free page of the C heap to the OS (glibc; otherwise nothing)."""
    funcs = _glibc()
    if funcs is not None:
        funcs[0](0)


def _mallopt(values: dict) -> None:
    funcs = _glibc()
    if funcs is not None:
        for param, value in values.items():
            funcs[2](param, value)


def trim_limit() -> int:
    """Bytes of free-heap growth that trigger a trim this step (see ``FREE_HEAP_LIMIT``)."""
    return min(FREE_HEAP_LIMIT, max(FREE_HEAP_MIN, _state["step_bytes"] // FREE_HEAP_FRACTION))


def trim_if_large(_grad: Optional[torch.Tensor] = None, always: bool = False, nbytes: int = 0) -> None:
    """Before the backward of a module with ``nbytes`` of DKM weights: trim when the free heap grew by more than
    :func:`trim_limit` over the baseline or the last trim (a trim leaves the chunks free, only their pages go back,
    so the free total itself does not fall), or ``always``. The free heap is read only once the unread modules'
    weights reach ``trim_limit() // CHECK_FRACTION`` (or ``always``). Also a tensor gradient hook: it leaves the
    gradient as it is."""
    _state["backward"] = True
    _state["unchecked"] += nbytes
    if not always and _state["unchecked"] < trim_limit() // CHECK_FRACTION:
        return
    _state["unchecked"] = 0
    free = free_heap_bytes()
    if free is None:
        return
    if always or free - _state["free_after_trim"] > trim_limit():
        release_free_heap()
        _state["free_after_trim"] = free
    elif free < _state["free_after_trim"]:  # trimmed chunks in use again: resident again
        _state["free_after_trim"] = free


def arm(output: torch.Tensor, nbytes: int) -> None:
    """For a module whose DKM trains on CPU (``nbytes`` of weights), in its training forward: the heap tuned for
    reuse (once, from ``REUSE_MIN_BYTES`` a step), then the step's baseline taken at its first such forward, and the
    trim check hooked on ``output``, whose gradient arrives just before the module's own backward."""
    if _glibc() is None:
        return
    new_step = _state["backward"]  # the first DKM forward since a backward
    if new_step:
        _state.update(backward=False, step_bytes=0, unchecked=0)
    _state["step_bytes"] += nbytes
    if not _state["tuned"] and _state["step_bytes"] >= REUSE_MIN_BYTES:
        _mallopt({M_MMAP_MAX: 0, M_TRIM_THRESHOLD: TOP_TRIM_THRESHOLD})
        _state["tuned"] = True
    if new_step and _state["tuned"]:  # the heap is kept for reuse: what the last step freed is this step's
        _state["free_after_trim"] = free_heap_bytes()
    mapped = not _state["tuned"] and nbytes >= MMAP_THRESHOLD_MAX  # glibc maps its tensors: held free is waste
    output.register_hook(functools.partial(trim_if_large, always=mapped, nbytes=nbytes))


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
    if not (torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad):
        return
    nbytes = dkm_bytes(module)
    if nbytes > 0:
        arm(output, nbytes)


def install(module: nn.Module) -> None:
    """Check the free heap before ``module``'s backward (once per module)."""
    if _arm not in module._forward_hooks.values():
        module.register_forward_hook(_arm)


def release() -> None:
    """glibc's defaults again and the free heap back to the OS (before ``finalize``: its per-layer work then runs
    under glibc's maps, not on a heap that keeps what it frees). The next DKM training step tunes it again."""
    if _state["tuned"]:
        _mallopt(GLIBC_DEFAULTS)
        _state["tuned"] = False
        release_free_heap()


def uninstall(module: nn.Module) -> None:
    """Remove what :func:`install` added (finalize, once the module holds no DKM layer)."""
    for key in [k for k, fn in module._forward_hooks.items() if fn is _arm]:
        del module._forward_hooks[key]
