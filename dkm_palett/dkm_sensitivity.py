"""``sensitivity_weighted``: DKM's centroid update weighted by each weight's sensitivity (a factored Fisher diagonal).

Plain DKM moves centroid ``k`` to ``sum_i a_ik x_i / sum_i a_ik``: every weight counts the same. The loss does
not: to second order, snapping weight ``i`` by ``d_i`` costs about ``F_i d_i^2 / 2``, with ``F_i`` the Fisher
diagonal ``E[(dL/dW_i)^2]``. Weighting the update by ``om_i = F_i + floor`` makes each centroid the
``om``-weighted mean of its soft cluster, the minimiser of ``sum_i a_ik om_i (x_i - c_k)^2``: the centroids sit
where the loss cares (post-training sensitive k-means does the same once, from calibration gradients). The
finalize LUT is then the ``om``-weighted mean of each hard cluster, the best LUT for that assignment under the
same weighting.

``F`` is estimated from the training itself: each DKM backward already holds ``dL/dW_p`` (the gradient of the
palettized weight), so the engines add its square into ``pending``. **Factored**, as Adafactor (Shazeer and Stern,
2018) keeps its second moments: a weight seen as a matrix ``P (rows x cols)`` (rows: the points of one channel
position, ``group_size / cluster_dim`` per LUT group; cols: everything else) keeps only its row sums ``r`` and
column sums ``c``, and stands for ``P_ij ~ r_i c_j / sum(c)``, the rank-1 matrix with the same row and column sums
(the closest one to ``P`` in I-divergence). That is ``rows + cols`` numbers a weight matrix instead of one a weight:
about nothing, where the full diagonal took 8 bytes a weight (a 1.1B model: 8.8 GB). Measured in
``benchmarks/quality.py`` on charlm at 2 bits and ``palett_tau=1e-4`` (3 seeds): -0.024 nats against coremltools
factored (row ``ours-tau-1e-4``), -0.029 with the full diagonal (its row before 2026-12-07); the spread over seeds
is 0.02 for both.

Once per training step the layer folds ``pending`` into the running estimate: ``r`` scaled to mean 1 within each
LUT group and ``c`` to mean 1 (so the estimate ``rho_i gamma_j`` has mean 1 in every group whatever the gradients'
scale: float32 stays far from underflow and each step counts the same), then each factor
``<- BETA factor + (1 - BETA) new`` (the first fold copies). Means stay 1, so the floor is ``FLOOR`` everywhere.
The estimate is fixed within a step, so every forward and its backward use the same weights and the gradients stay
exact. The fused kernels make each point's weight from the factors as they go; the other engines build ``om`` when
they ask for it (4 bytes a weight of the one layer running, freed after it).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

BETA = 0.9  # running-mean decay per step: about the last 10 steps
RECORD_CHUNK = 1 << 20  # elements of the squared gradient made at a time by Sensitivity.record
FLOOR = 0.01  # om = estimate + FLOOR (the estimate's mean is 1 in every group): every weight keeps a little say


class Sensitivity:
    """``sensitivity_weighted``: per-point weights of the centroid update, ``om = rows_gi * cols_j + FLOOR`` for
    the point ``(g, i, j)`` of the grouped weights ``(G, rows * cols, 1)`` (point ``n = i * cols + j``, the order of
    :func:`dkm_palett.lut.to_grouped_vectors`). ``rows (G, R)`` and ``cols (C,)`` are running means over steps of
    the row and column sums of each weight's squared output gradient ``(dL/dW_p)^2`` (the Fisher diagonal, as
    post-training sensitive k-means uses, factored), each with mean 1. The update is then
    ``C' = sum_i a_i om_i x_i / sum_i a_i om_i``: the centroids move towards the weights the loss is most sensitive
    to.

    The layer owns the tensors (buffers, so checkpoints carry them). Engines read :meth:`weights`, fixed within a
    training step, so a forward and its backward use the same weights (exact gradients); each DKM backward adds the
    row and column sums of ``(dL/dout)^2`` into ``pending_rows``/``pending_cols`` (:meth:`record`) and the layer
    folds them into ``rows``/``cols`` once a step. Before the first fold ``active`` is False and the update is
    unweighted."""

    def __init__(self, rows: torch.Tensor, cols: torch.Tensor, pending_rows: torch.Tensor,
                 pending_cols: torch.Tensor, active: bool):
        self.rows, self.cols, self.active = rows, cols, active
        self.pending_rows, self.pending_cols = pending_rows, pending_cols

    def estimate(self) -> torch.Tensor:
        """The factored estimate ``(G, R * C, 1)`` (a new tensor, mean 1 per group once folded)."""
        return (self.rows.unsqueeze(-1) * self.cols).reshape(self.rows.shape[0], -1, 1)

    def weights(self) -> torch.Tensor:
        """``om (G, N, 1)`` (a new tensor)."""
        return self.estimate().add_(FLOOR)

    def record(self, g_out: torch.Tensor) -> None:
        """Add one backward's squared output gradient ``(G, N, D)``, summed over the vector, into the pending row and
        column sums, a slab of rows at a time (``RECORD_CHUNK`` elements: a temporary that stays in cache, where a
        whole-weight square cost a weight-sized allocation and torch's strided norms 2 ns a weight)."""
        g = g_out.detach().view(self.pending_rows.numel(), self.pending_cols.shape[0], g_out.shape[-1])
        rows = self.pending_rows.view(-1)  # every group's rows in a row: slabs may span groups
        rows_per_slab = max(1, RECORD_CHUNK // (g.shape[1] * g.shape[2]))
        for start in range(0, g.shape[0], rows_per_slab):
            square = g[start:start + rows_per_slab].to(rows.dtype).square()
            rows[start:start + rows_per_slab] += square.sum((1, 2))
            self.pending_cols.add_(square.sum((0, 2)))

    @staticmethod
    def fold(rows: torch.Tensor, cols: torch.Tensor, pending_rows: torch.Tensor, pending_cols: torch.Tensor,
             folds: torch.Tensor) -> None:
        """End of a training step: the pending sums scaled to mean 1 (rows within each group), then
        ``factor <- BETA factor + (1 - BETA) pending`` (the first fold copies), pending zeroed. No-op when no
        backward added anything (a disabled layer, or the hard phase).

        Under ``torch.distributed`` (initialised, more than one rank) the pending sums are first averaged over the
        ranks (one all-reduce of ``R + C`` numbers a layer), so the estimate counts every rank's batches and every
        rank folds the same one: the ranks' centroids stay identical (each rank alone would weight its own batches,
        and DDP's buffer broadcast would keep rank 0's). Every rank calls this for every sensitivity-weighted layer
        at every step (``DKMPalettizer.step()``), before anything here can raise, so the collective cannot hang."""
        _average_over_ranks(pending_rows, pending_cols)
        if not bool(pending_cols.any()):
            return
        tiny = torch.finfo(pending_rows.dtype).tiny
        pending_rows.div_(pending_rows.mean(dim=1, keepdim=True).clamp_min(tiny))
        pending_cols.div_(pending_cols.mean().clamp_min(tiny))
        for factor, new in ((rows, pending_rows), (cols, pending_cols)):
            if int(folds) == 0:
                factor.copy_(new)
            else:
                factor.mul_(BETA).add_(new, alpha=1 - BETA)
            new.zero_()
        folds.add_(1)


def factor_shapes(n_groups: int, points_per_group: int, group_size: int, cluster_dim: int) -> tuple[tuple, tuple]:
    """The shapes of the row factor ``(G, R)`` and column factor ``(C,)`` of a layer whose grouped weights are
    ``(n_groups, points_per_group, cluster_dim)``: ``R = group_size / cluster_dim`` point rows per group (the
    channels along the LUT axis), ``C`` = everything else."""
    rows = group_size // cluster_dim
    return (n_groups, rows), (points_per_group // rows,)


def _average_over_ranks(*tensors: torch.Tensor) -> None:
    """Each tensor <- its mean over the ranks of the default process group (in place, one collective); nothing
    without one."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(dist.get_world_size())
        for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
            t.copy_(part.view_as(t))


def active_weights(sens: Optional[Sensitivity]) -> Optional[torch.Tensor]:
    """``om (G, N, 1)`` of an active estimate (a new tensor), else None: the unweighted update."""
    return sens.weights() if sens is not None and sens.active else None


def kernel_weights(sens: Optional[Sensitivity], xs: np.ndarray):
    """The fused kernels' ``(om_rows, om_cols, om_floor, weighted)`` for the weights ``xs (G, N)``: the factors and
    floor, from which the kernels make each point's weight as they go (nothing the size of the weights), or
    placeholders the kernels do not read."""
    if sens is None or not sens.active:
        return np.zeros((xs.shape[0], 1), np.float32), np.ones(1, np.float32), np.float32(0.0), False
    return sens.rows.numpy(), sens.cols.numpy(), np.float32(FLOOR), True
