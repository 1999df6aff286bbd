"""``sensitivity_weighted``: DKM's centroid update weighted by each weight's sensitivity (a Fisher diagonal).

Plain DKM moves centroid ``k`` to ``sum_i a_ik x_i / sum_i a_ik``: every weight counts the same. The loss does
not: to second order, snapping weight ``i`` by ``d_i`` costs about ``F_i d_i^2 / 2``, with ``F_i`` the Fisher
diagonal ``E[(dL/dW_i)^2]``. Weighting the update by ``om_i = F_i + floor`` makes each centroid the
``om``-weighted mean of its soft cluster, the minimiser of ``sum_i a_ik om_i (x_i - c_k)^2``: the centroids sit
where the loss cares (post-training sensitive k-means does the same once, from calibration gradients). The
finalize LUT is then the ``om``-weighted mean of each hard cluster, the best LUT for that assignment under the
same weighting.

``F`` is estimated from the training itself: each DKM backward already holds ``dL/dW_p`` (the gradient of the
palettized weight), so the engines add its square into ``pending``; once per training step the layer folds it,
scaled to mean 1 per LUT group, into a running mean ``estimate = BETA estimate + (1 - BETA) pending`` (the first
fold copies it). The estimate is fixed within a step, so every forward and its backward use the same weights and
the gradients stay exact. Cost: two float32 tensors the size of the weight (8 bytes a weight) and a few
elementwise passes a step (the square into ``pending``, the fold); the fused kernels read the weights in the
passes they already make.
"""

from __future__ import annotations

import numpy as np
import torch

BETA = 0.9  # running-mean decay per step: about the last 10 steps
FLOOR = 0.01  # om = estimate + FLOOR * (the group's mean estimate): every weight keeps a little say


class Sensitivity:
    """``sensitivity_weighted``: per-point weights of the centroid update, ``om = estimate + floor``, where
    ``estimate (G, N, 1)`` is a running mean over steps of each weight's squared output gradient ``(dL/dW_p)^2``
    (the Fisher diagonal, as post-training sensitive k-means uses) and ``floor (G,)`` a small share of its group
    mean, so no weight drops out. The update is then ``C' = sum_i a_i om_i x_i / sum_i a_i om_i``: the centroids
    move towards the weights the loss is most sensitive to.

    The layer owns the tensors (buffers, so checkpoints carry them). Engines read ``estimate`` and ``floor``,
    which stay fixed within a training step, so a forward and its backward use the same weights (exact gradients);
    each DKM backward adds ``(dL/dout)^2`` into ``pending`` and the layer folds it into ``estimate`` once a step.
    Before the first fold ``active`` is False and the update is unweighted."""

    def __init__(self, estimate: torch.Tensor, floor: torch.Tensor, pending: torch.Tensor, active: bool):
        self.estimate, self.floor, self.pending, self.active = estimate, floor, pending, active

    def weights(self) -> torch.Tensor:
        """``om (G, N, 1)`` (a new tensor)."""
        return self.estimate + self.floor.view(-1, 1, 1)

    def record(self, g_out: torch.Tensor) -> None:
        """Add one backward's squared output gradient ``(G, N, D)``, summed over the vector, into ``pending``."""
        g = g_out.detach().to(self.pending.dtype)
        self.pending.add_(g.square().sum(-1, keepdim=True))

    @staticmethod
    def fold(estimate: torch.Tensor, pending: torch.Tensor, floor: torch.Tensor, folds: torch.Tensor) -> None:
        """End of a training step: ``pending`` scaled to mean 1 per group (so the weights are about 1 whatever the
        gradients' scale: float32 sums stay far from underflow, and each step counts the same), then
        ``estimate <- BETA estimate + (1 - BETA) pending`` (the first fold copies it), ``floor <- FLOOR x`` each
        group's mean estimate, ``pending <- 0``. No-op when no backward added anything (a disabled layer, or the
        hard phase).

        Under ``torch.distributed`` (initialised, more than one rank) ``pending`` is first averaged over the ranks
        (one all-reduce of 4 bytes a weight), so the estimate counts every rank's batches and every rank folds the
        same one: the ranks' centroids stay identical (each rank alone would weight its own batches, and DDP's
        buffer broadcast would keep rank 0's). Every rank calls this for every sensitivity-weighted layer at every
        step (``DKMPalettizer.step()``), before anything here can raise, so the collective cannot hang."""
        _average_over_ranks(pending)
        if not bool(pending.any()):
            return
        pending.div_(pending.mean(dim=(1, 2), keepdim=True).clamp_min(torch.finfo(pending.dtype).tiny))
        if int(folds) == 0:
            estimate.copy_(pending)
        else:
            estimate.mul_(BETA).add_(pending, alpha=1 - BETA)
        floor.copy_(estimate.mean(dim=(1, 2)) * FLOOR)
        pending.zero_()
        folds.add_(1)


def _average_over_ranks(t: torch.Tensor) -> None:
    """``t`` <- its mean over the ranks of the default process group (in place); nothing without one."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(dist.get_world_size())


def active_weights(sens: "Sensitivity | None") -> "torch.Tensor | None":
    """``om (G, N, 1)`` of an active estimate (a new tensor), else None: the unweighted update."""
    return sens.weights() if sens is not None and sens.active else None


def kernel_weights(sens: "Sensitivity | None", xs: np.ndarray):
    """The fused kernels' ``(om, om_floor, weighted)`` for the weights ``xs (G, N)``: the estimate and floor, or
    placeholders the kernels do not read."""
    if sens is None or not sens.active:
        return xs, np.zeros(xs.shape[0], np.float32), False
    return sens.estimate[..., 0].numpy(), sens.floor.numpy(), True
