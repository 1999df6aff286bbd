"""``palett_max_mem``: one DKM memory budget for a whole model, not for each layer in turn.

The budget is ``palett_max_mem x`` the memory available when no DKM layer holds anything (a step's start). A layer
spends it twice: the chunk working set of its forward (freed when the forward returns) and what it keeps from the
forward for its backward (the dense engine's attention cache, freed when that backward has run). The kept part of
every layer is *held* against the shared budget until the engine that keeps it is freed, so the layers' caches
together plus the running layer's working set stay within ``palett_max_mem`` of the memory.
"""

from __future__ import annotations

import weakref

import torch


def available_memory_bytes(device: torch.device) -> int:
    """Free memory on ``device``: CUDA's free memory, or MemAvailable from /proc/meminfo on CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2 ** 30


class MemoryBudget:
    """The DKM memory one model's layers share (``DKMPalettizer.prepare`` gives every layer the same one)."""

    def __init__(self):
        self.held = 0
        self._available = None

    def free(self, fraction: float, device: torch.device) -> float:
        """Bytes a layer may use now: ``fraction`` of the available memory minus what other layers hold."""
        if self.held == 0 or self._available is None:  # nothing held: a new step, read the memory again
            self._available = available_memory_bytes(device)
        return max(0.0, fraction * self._available - self.held)

    def hold(self, owner: object, nbytes: int) -> None:
        """Count ``nbytes`` as held until ``owner`` (what keeps them) is garbage-collected."""
        if nbytes <= 0:
            return
        self.held += nbytes
        weakref.finalize(owner, self._release, nbytes)

    def _release(self, nbytes: int) -> None:
        self.held -= nbytes
