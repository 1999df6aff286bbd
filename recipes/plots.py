"""PNG plots (matplotlib, Agg): per-layer weight histograms with the learned centroids, and metric vs bits."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from dkm_palett.io import atomic_path  # noqa: E402
from dkm_palett.palettized_weight import palettized_tensors  # noqa: E402
from dkm_palett.plots import plot_weight_histograms, weight_histogram  # noqa: E402


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)
    return Path(path)


def weight_histograms(path: Path, float_weights: dict, model: torch.nn.Module, title: str = "") -> Path | None:
    """One panel per palettized weight (:func:`dkm_palett.plots.plot_weight_histograms`, as ``Report.plot()``):
    the histogram of its float (pre-palettization) values, the LUT entries and how many weights each serves."""
    records = {name: rec for name, _, _, rec in palettized_tensors(model)}
    if not records:
        return None
    histograms = {name: weight_histogram(float_weights[name], rec) for name, rec in records.items()
                  if float_weights.get(name) is not None}
    return _save(plot_weight_histograms(records, histograms, title), path)


def metric_vs_bits_figure(series: dict[str, list[tuple[int, float]]], metric: str, baseline: float | None = None,
                          title: str = "", ratios: dict[int, float] | None = None,
                          errors: dict[str, dict[int, float]] | None = None):
    """Lines of ``metric`` against bits, one per series (e.g. ``DKM``, ``post-training k-means``), with the float
    baseline as a dashed line, the compression ratio under each bit width and, from ``errors`` (series -> bits ->
    half-width), 95% error bars. Value labels go above the points of the first series and below those of the
    others, so two close series do not overlap. Returns the figure."""
    scale = 100.0 if metric == "accuracy" else 1.0
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    markers = iter("osD^v")
    all_bits: set[int] = set()
    for index, (label, points) in enumerate(series.items()):
        points = sorted(points)
        all_bits.update(b for b, _ in points)
        err = (errors or {}).get(label) or {}
        ax.errorbar([b for b, _ in points], [v * scale for _, v in points], marker=next(markers, "o"), label=label,
                    yerr=[err.get(b, 0.0) * scale for b, _ in points] if err else None, capsize=3)
        above = index == 0
        for b, v in points:
            ax.annotate(f"{v * scale:.1f}" if scale != 1 else f"{v:.3g}", (b, v * scale), textcoords="offset points",
                        xytext=(0, 7 if above else -7), ha="center", va="bottom" if above else "top", fontsize=7)
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
    ax.legend(fontsize=8, title="error bars: 95% interval" if errors else None, title_fontsize=7)
    ax.set_title(title or f"{metric} vs bits", fontsize=10)
    fig.tight_layout()
    return fig


def metric_vs_bits(path: Path, series: dict[str, list[tuple[int, float]]], metric: str,
                   baseline: float | None = None, title: str = "", ratios: dict[int, float] | None = None,
                   errors: dict[str, dict[int, float]] | None = None) -> Path:
    """:func:`metric_vs_bits_figure`, saved as a PNG."""
    return _save(metric_vs_bits_figure(series, metric, baseline, title, ratios, errors), path)


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
    ratios = {r["config"]["palettization"]["n_bits"]: r["compression"]["compression_ratio"] for r in reports
              if r.get("compression", {}).get("compression_ratio")}
    ptq = [(r["config"]["palettization"]["n_bits"], r["post_training"][metric]) for r in reports
           if metric in (r.get("post_training") or {})]
    errors = {label: {r["config"]["palettization"]["n_bits"]: r[key][f"{metric}_ci95"] for r in reports
                      if f"{metric}_ci95" in (r.get(key) or {})}
              for label, key in (("post-training k-means", "post_training"), ("DKM fine-tuning", "palettized"))}
    baselines = [r["baseline"][metric] for r in reports if metric in r.get("baseline", {})]
    baseline = sum(baselines) / len(baselines) if baselines else None
    lines = {"post-training k-means": ptq, "DKM fine-tuning": series} if ptq else {"DKM fine-tuning": series}
    return [metric_vs_bits(p, lines, metric, baseline, title, ratios, errors) for p in paths]
