"""Input checks and small array helpers shared by the k-means solvers."""

from __future__ import annotations

import numpy as np
import torch

def check_k(k: int) -> int:
    if isinstance(k, bool) or int(k) != k or int(k) < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return int(k)


def as_numpy_1d(values: torch.Tensor | np.ndarray, name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        arr = values.detach().to(device="cpu", dtype=torch.float64).reshape(-1).numpy()
    else:
        arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite (found NaN or inf)")
    return arr


def weights_numpy(weights, n: int) -> np.ndarray:
    if weights is None:
        return np.ones(n, dtype=np.float64)
    w = as_numpy_1d(weights, "weights")
    if w.shape[0] != n:
        raise ValueError(f"weights has {w.shape[0]} entries but there are {n} points")
    if np.any(w < 0):
        raise ValueError("weights must be >= 0")
    return w


def merge_duplicates(x: np.ndarray, w: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct values among the points with positive weight (``w=None``: all weights 1), with
    summed weights."""
    if w is None:
        xs = np.sort(x)
    else:
        keep = w > 0
        if not np.all(keep):
            x, w = x[keep], w[keep]
        order = np.argsort(x)
        xs, w = x[order], w[order]
    if xs.size == 0:
        raise ValueError("need at least one point with positive weight")
    first = np.empty(xs.shape[0], dtype=bool)
    first[0] = True
    np.not_equal(xs[1:], xs[:-1], out=first[1:])
    starts = np.flatnonzero(first)
    if w is None:
        return xs[starts], np.diff(starts, append=xs.shape[0]).astype(np.float64)
    return xs[starts], np.add.reduceat(w, starts)


def pad_centroids(c, k: int):
    """The first k centroids, or all of them repeated cyclically up to k (numpy array or torch tensor);
    1-D centroids stay sorted."""
    if c.shape[0] >= k:
        return c[:k]
    reps = np.resize(np.arange(c.shape[0]), k)
    out = c[reps] if isinstance(c, np.ndarray) else c[torch.from_numpy(reps).to(c.device)]
    if out.ndim == 1:
        out = np.sort(out) if isinstance(out, np.ndarray) else torch.sort(out).values
    return out


def as_2d(x: torch.Tensor, name: str = "x") -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x)
    if x.dim() == 1:
        x = x.unsqueeze(1)
    if x.dim() != 2:
        raise ValueError(f"{name} must have shape (N, D), got {tuple(x.shape)}")
    return x

