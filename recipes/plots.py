"""PNG plots (matplotlib, Agg): per-layer weight histograms with the learned centroids, and metric vs bits."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from dkm_palett.io import atomic_path  # noqa: E402


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)
    return Path(path)


def weight_histograms(path: Path, float_weights: dict, model: torch.nn.Module, title: str = "") -> Path | None:
    """One panel per palettized weight: histogram of its float (pre-palettization) values, the LUT entries as
    vertical lines, and how many weights each entry serves. Per-channel-scaled weights are shown divided by their
    scale, where the LUT lives."""
    from dkm_palett.lut import broadcast_scale, palettized_tensors

    rows = [(name, rec) for name, _, _, rec in palettized_tensors(model)]
    if not rows:
        return None
    cols = min(3, len(rows))
    nrows = math.ceil(len(rows) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.2 * nrows), squeeze=False)
    for ax, (name, rec) in zip(axes.flat, rows):
        weight = float_weights.get(name)
        if weight is None:
            weight = rec.to_dense()
        w = weight.detach().float().cpu()
        if rec.scale is not None:
            w = w / broadcast_scale(rec.scale, tuple(w.shape), rec.axis)
        ax.hist(w.reshape(-1).numpy(), bins=120, color="0.65", label="float weights")
        luts = rec.lut.float()
        shown = luts[: min(luts.shape[0], 8)]
        alpha = 0.9 if luts.shape[0] == 1 else 0.35
        for value in shown.reshape(-1).unique().tolist():
            ax.axvline(value, color="tab:red", lw=0.9, alpha=alpha)
        if luts.shape[0] == 1 and rec.cluster_dim == 1:
            counts = torch.bincount(rec.indices[0], minlength=luts.shape[1]).float()
            twin = ax.twinx()
            twin.plot(luts[0, :, 0].numpy(), counts.numpy(), "o", color="tab:red", ms=3.5)
            twin.set_ylim(bottom=0)
            twin.set_ylabel("weights per centroid", fontsize=7, color="tab:red")
            twin.tick_params(labelsize=7, colors="tab:red")
        groups = f", {rec.n_groups} LUTs" if rec.n_groups > 1 else ""
        dim = f", dim {rec.cluster_dim}" if rec.cluster_dim > 1 else ""
        ax.set_title(f"{name}\n{rec.n_bits}-bit, {rec.numel} weights{groups}{dim}", fontsize=8)
        ax.set_xlabel("weight / channel scale" if rec.scale is not None else "weight", fontsize=7)
        ax.set_ylabel("count", fontsize=7)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    fig.suptitle(title or "weights (gray) and learned centroids (red)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def metric_vs_bits(path: Path, series: dict[str, list[tuple[int, float]]], metric: str,
                   baseline: float | None = None, title: str = "", ratios: dict[int, float] | None = None) -> Path:
    """Lines of ``metric`` against bits, one per series (e.g. ``DKM``, ``post-training k-means``), with the float
    baseline as a dashed line and the compression ratio under each bit width."""
    scale = 100.0 if metric == "accuracy" else 1.0
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    markers = iter("osD^v")
    all_bits: set[int] = set()
    for label, points in series.items():
        points = sorted(points)
        all_bits.update(b for b, _ in points)
        ax.plot([b for b, _ in points], [v * scale for _, v in points], marker=next(markers, "o"), label=label)
        for b, v in points:
            ax.annotate(f"{v * scale:.1f}" if scale != 1 else f"{v:.3g}", (b, v * scale), textcoords="offset points",
                        xytext=(0, 6), ha="center", fontsize=7)
    if baseline is not None:
        ax.axhline(baseline * scale, color="0.3", ls="--", lw=1, label=f"float baseline ({baseline * scale:.4g})")
    bits = sorted(all_bits)
    ax.set_xticks(bits)
    if ratios:
        ax.set_xticklabels([f"{b}\n({ratios[b]:.1f}x)" if b in ratios else str(b) for b in bits])
        ax.set_xlabel("bits per weight (model compression ratio)")
    else:
        ax.set_xlabel("bits per weight")
    ax.set_ylabel(f"{metric} (%)" if metric == "accuracy" else metric)
    if metric == "perplexity":
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or f"{metric} vs bits", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def _comparable(cfg: dict) -> dict:
    cfg = json.loads(json.dumps(cfg))
    cfg.get("palettization", {}).pop("n_bits", None)
    return cfg


def sibling_reports(folder: Path, report: dict) -> list[dict]:
    """report.json files in ``folder``'s subfolders whose config differs from ``report``'s only in
    ``palettization.n_bits`` (e.g. the jobs of ``-m palettization.n_bits=2,3,4``); the newest per bit width."""
    want = _comparable(report.get("config", {}))
    newest: dict[int, tuple[float, dict]] = {}
    for path in Path(folder).glob("*/report.json"):
        try:
            other = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        bits = other.get("config", {}).get("palettization", {}).get("n_bits")
        if bits is None or other.get("mode", "train") != "train" or _comparable(other.get("config", {})) != want:
            continue
        mtime = path.stat().st_mtime
        if bits not in newest or mtime > newest[bits][0]:
            newest[bits] = (mtime, other)
    return [newest[b][1] for b in sorted(newest)]


def bits_plot_from_reports(paths: Iterable[Path], reports: list[dict], metric: str, title: str) -> list[Path]:
    """Write the metric-vs-bits plot of sibling runs to each of ``paths``."""
    series = [(r["config"]["palettization"]["n_bits"], r["palettized"][metric]) for r in reports
              if metric in r.get("palettized", {})]
    ratios = {r["config"]["palettization"]["n_bits"]: r["compression"]["ratio"] for r in reports
              if r.get("compression", {}).get("ratio")}
    ptq = [(r["config"]["palettization"]["n_bits"], r["post_training"][metric]) for r in reports
           if metric in (r.get("post_training") or {})]
    baselines = [r["baseline"][metric] for r in reports if metric in r.get("baseline", {})]
    baseline = sum(baselines) / len(baselines) if baselines else None
    lines = {"post-training k-means": ptq, "DKM fine-tuning": series} if ptq else {"DKM fine-tuning": series}
    return [metric_vs_bits(p, lines, metric, baseline, title, ratios) for p in paths]
