"""Weight histograms with the LUT entries marked: ``Report.plot()`` and the recipes' ``weights.png``.

matplotlib is imported only when drawing (``pip install matplotlib``; the ``train`` extra has it).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from dkm_palett.lut import PalettizedTensor, broadcast_scale

HIST_BINS = 120
Histogram = tuple[torch.Tensor, torch.Tensor]  # (counts, bin edges)


def weight_histogram(weight: torch.Tensor, record: PalettizedTensor, bins: int = HIST_BINS) -> Histogram:
    """Counts and bin edges of ``weight``'s values where its LUT lives: divided by the per-channel scale, if any.
    Small (``bins`` numbers), so a report can keep it after the float weight is gone."""
    w = weight.detach().float().cpu()
    if record.scale is not None:
        w = w / broadcast_scale(record.scale, tuple(w.shape), record.axis)
    lo, hi = w.min().item(), w.max().item()
    hi = hi if hi > lo else lo + max(abs(lo), 1.0) * 1e-6
    return torch.histc(w.reshape(-1), bins=bins, min=lo, max=hi), torch.linspace(lo, hi, bins + 1)


def _pyplot():
    try:
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("plotting needs matplotlib: pip install matplotlib (or 'dkm_palett[train]').") from err
    return plt


def _panel(ax, name: str, record: PalettizedTensor, histogram: Histogram) -> None:
    counts, edges = histogram
    ax.stairs(counts.numpy(), edges.numpy(), fill=True, color="0.65", label="float weights")
    luts = record.lut.float()
    alpha = 0.9 if luts.shape[0] == 1 else 0.35
    for value in luts[: min(luts.shape[0], 8)].reshape(-1).unique().tolist():
        ax.axvline(value, color="tab:red", lw=0.9, alpha=alpha)
    if luts.shape[0] == 1 and record.cluster_dim == 1:
        served = torch.bincount(record.indices[0], minlength=luts.shape[1]).float()
        twin = ax.twinx()
        twin.plot(luts[0, :, 0].numpy(), served.numpy(), "o", color="tab:red", ms=3.5)
        twin.set_ylim(bottom=0)
        twin.set_ylabel("weights per centroid", fontsize=7, color="tab:red")
        twin.tick_params(labelsize=7, colors="tab:red")
    groups = f", {record.n_groups} LUTs" if record.n_groups > 1 else ""
    dim = f", dim {record.cluster_dim}" if record.cluster_dim > 1 else ""
    ax.set_title(f"{name}\n{record.n_bits}-bit, {record.numel} weights{groups}{dim}", fontsize=8)
    ax.set_xlabel("weight / channel scale" if record.scale is not None else "weight", fontsize=7)
    ax.set_ylabel("count", fontsize=7)
    ax.tick_params(labelsize=7)


def plot_weight_histograms(records: dict[str, PalettizedTensor], histograms: Optional[dict[str, Histogram]] = None,
                           title: str = ""):
    """One panel per palettized weight: the histogram of its float values (``histograms[name]``, else of the
    palettized values), its LUT entries as red lines and how many weights each entry serves. Returns the figure."""
    if not records:
        raise ValueError("nothing to plot: no palettized weights (finalize first, or check the config selects some).")
    plt = _pyplot()
    histograms = histograms or {}
    cols = min(3, len(records))
    rows = math.ceil(len(records) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.2 * rows), squeeze=False)
    for ax, (name, record) in zip(axes.flat, records.items()):
        histogram = histograms.get(name) or weight_histogram(record.to_dense(), record)
        _panel(ax, name, record, histogram)
    for ax in list(axes.flat)[len(records):]:
        ax.axis("off")
    fig.suptitle(title or "weights (gray) and learned centroids (red)", fontsize=10)
    fig.tight_layout()
    return fig
