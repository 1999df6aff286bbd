"""report.json (baseline vs palettized metrics, compression, per-layer stats, resolved config) and the summary table."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dkm_palett.io import atomic_write_text


def primary_metric(metrics: dict) -> tuple[str, bool]:
    """The headline metric name and whether higher is better: accuracy, else perplexity, else loss."""
    for name, higher in (("accuracy", True), ("perplexity", False), ("loss", False)):
        if name in metrics:
            return name, higher
    name = sorted(metrics)[0] if metrics else "loss"
    return name, False


def compression(model: nn.Module) -> dict:
    """Sizes of ``model`` (a finalized, palettized module): float bytes of every floating-point tensor in its
    state_dict, the bytes when palettized weights are stored as packed indices + LUTs (+ scales), and
    ``compression_ratio = float_bytes / compressed_bytes`` (how many times smaller)."""
    from dkm_palett.palettized_weight import palettized_tensors
    from dkm_palett.report import record_bytes

    state = model.state_dict()
    float_bytes = sum(t.numel() * t.element_size() for t in state.values() if torch.is_floating_point(t))
    pal_float = pal_compressed = count = 0
    for _, _, _, record in palettized_tensors(model):
        count += 1
        float_part, compressed_part = record_bytes(record)
        pal_float += float_part
        pal_compressed += compressed_part
    compressed_bytes = float_bytes - pal_float + pal_compressed
    return {
        "compression_ratio": float_bytes / compressed_bytes if compressed_bytes else math.nan,
        "float_bytes": int(float_bytes),
        "compressed_bytes": int(compressed_bytes),
        "palettized_float_bytes": int(pal_float),
        "palettized_compressed_bytes": int(pal_compressed),
        "n_palettized_weights": count,
    }


def _plain(value: Any) -> Any:
    """JSON-safe copy (tensors/numpy scalars to numbers, tuples to lists, NaN kept as null)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _plain(value.tolist())
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        return _plain(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def write_report(run_dir: Path, report: dict) -> Path:
    path = Path(run_dir) / "report.json"
    atomic_write_text(path, json.dumps(_plain(report), indent=2, sort_keys=False) + "\n")
    return path


def _fmt_metric(name: str, value: float | None, ci95: float | None = None) -> str:
    if value is None:
        return "-"
    if name != "accuracy":
        return f"{value:.4f}"
    return f"{100 * value:.2f}%" + (f" ±{100 * ci95:.2f}" if ci95 is not None else "")


def _cell(name: str, metrics: dict) -> str:
    return _fmt_metric(name, metrics.get(name), metrics.get(f"{name}_ci95"))


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def summary(report: dict, run_dir: Path) -> str:
    """A short human table: metrics before/after, size and ratio, where the artifacts are."""
    base, pal = report.get("baseline", {}), report.get("palettized", {})
    names = [n for n in ("accuracy", "perplexity", "loss") if n in base or n in pal] or sorted(set(base) | set(pal))
    bits = report.get("config", {}).get("palettization", {}).get("n_bits")
    rows = [("", *names), ("float baseline", *(_cell(n, base) for n in names))]
    if "post_training" in report:
        rows.append((f"post-training k-means {bits}-bit", *(_cell(n, report["post_training"]) for n in names)))
    rows.append((f"DKM {bits}-bit" if bits else "DKM palettized", *(_cell(n, pal) for n in names)))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = [f"== dkm-palett-train: {report.get('name', '')} =="]
    for r in rows:
        lines.append("  " + "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in
                                      enumerate(zip(r, widths))))
    if "accuracy_ci95" in base:
        lines.append(f"  (± = 95% interval over n={base['n']} validation samples; differences inside it are noise)")
    comp = report.get("compression") or {}
    if comp:
        lines.append(f"  size: {_fmt_bytes(comp['float_bytes'])} float -> {_fmt_bytes(comp['compressed_bytes'])} "
                     f"palettized ({comp['compression_ratio']:.2f}x smaller; {comp['n_palettized_weights']} weights palettized)")
    metric = report.get("metric", "accuracy")
    for row in report.get("compare", []):
        lines.append(f"  {row['n_bits']}-bit: post-training {_cell(metric, row['post_training'])}"
                     f"  DKM {_cell(metric, row['dkm'])}"
                     f"  ({row['compression']['compression_ratio']:.2f}x smaller)")
    source = report.get("baseline_source") or {}
    if source.get("reused"):
        lines.append(f"  {'baseline:':<10} reused {source['reused']} (saved {source['saved_s']:.0f} s of training)")
    lines.append(f"  {'run dir:':<10} {run_dir}")
    lines.append(f"  {'report:':<10} {Path(run_dir) / 'report.json'}")
    labels = {"coreml": "core ml", "compressed": "portable", "layer_report": "layers"}
    for kind, info in (report.get("artifacts") or {}).items():
        where = info.get("path") or f"skipped: {info.get('skipped')}"
        lines.append(f"  {labels.get(kind, kind) + ':':<10} {where}")
    for plot in report.get("plots", []):
        lines.append(f"  {'plot:':<10} {plot}")
    if report.get("timings", {}).get("total_s"):
        lines.append(f"  {'time:':<10} {report['timings']['total_s']:.0f} s")
    return "\n".join(lines)
