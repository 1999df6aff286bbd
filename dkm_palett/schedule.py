"""The end of DKM training, keyed on ``DKMPalettizer.step()``: closing the gap between the soft-assigned weights DKM
trains with and the hard ``LUT[indices]`` weights ``finalize`` ships.

* The hard phase (the last ``hard_fraction`` of ``total_steps``): those steps train the finalized function itself,
  each weight snapped to its nearest LUT entry with a straight-through gradient (each weight gets its own gradient,
  not its cluster's share), the LUT refitted from the weights every step as ``finalize_lut="mean"`` does at
  finalize, so that the last training forward is exactly what ``finalize`` ships.
* The LUT refit at finalize (``finalize_lut``): ``"mean"`` replaces each LUT entry by the mean of the weights
  nearest to it, the closed-form best LUT (in squared error) for the assignment DKM's centroids make, then
  finalize assigns each weight to its nearest entry of that LUT, which can only lower the squared error further
  (one Lloyd step). ``"dkm"`` keeps DKM's last centroids.
"""

from __future__ import annotations

from typing import Optional

import torch

from dkm_palett.lut import nearest_entry, round_lut


def hard_phase(config, step: int, total_steps: Optional[int]) -> bool:
    """Whether step ``step`` (the count of ``DKMPalettizer.step()`` calls so far) trains with the hard forward: in
    the last ``hard_fraction`` of ``total_steps`` (``hard_fraction=1``: every step, the total may be unknown)."""
    fraction = config.hard_fraction
    if fraction >= 1.0:
        return True
    if fraction <= 0 or total_steps is None:
        return False
    return step >= total_steps - max(1, round(fraction * total_steps))


@torch.no_grad()
def cluster_means(x: torch.Tensor, centroids: torch.Tensor, zero_index: Optional[int], lut_dtype: str,
                  quant_min: int = -128, quant_max: int = 127, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One Lloyd step: assign ``x (G, N, D)`` to the nearest stored-dtype entry of ``centroids (G, K, D)``, return
    each cluster's mean (an empty cluster and the pinned zero entry keep their value); with ``weights (G, N, 1)``
    (``sensitivity_weighted``) the weighted mean. One step, not Lloyd to convergence: on a smooth 1-D weight
    distribution that drifts the LUT far from what the model was trained with."""
    lut = round_lut(centroids, lut_dtype, quant_min, quant_max).to(x.device, torch.float32)
    return _means(x, nearest_entry(x.float(), lut), centroids, zero_index, weights)


def _means(x: torch.Tensor, idx: torch.Tensor, centroids: torch.Tensor, zero_index: Optional[int],
           weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Each cluster's (weighted) mean in float64 (``idx (G, N)``: the assignment), as ``centroids``' dtype and
    device."""
    groups, k, dim = centroids.shape
    w = None if weights is None else weights.to(x.device, torch.float64)
    sums = torch.zeros(groups, k, dim, dtype=torch.float64, device=x.device)
    sums.scatter_add_(1, idx.unsqueeze(-1).expand(-1, -1, dim), x.double() if w is None else x.double() * w)
    counts = torch.zeros(groups, k, dtype=torch.float64, device=x.device)
    counts.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float64) if w is None else w[..., 0])
    out = torch.where(counts.unsqueeze(-1) > 0, sums / counts.clamp_min(torch.finfo(torch.float64).tiny).unsqueeze(-1),
                      centroids.to(x.device, torch.float64))
    if zero_index is not None:
        out[:, zero_index] = 0
    return out.to(centroids.dtype).to(centroids.device)
