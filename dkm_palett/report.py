"""Per-weight palettization statistics, and a dict that prints as a table."""

from __future__ import annotations

import html
from typing import Optional

import torch

from dkm_palett.lut import PalettizedTensor


def record_bytes(record: PalettizedTensor) -> tuple[int, int]:
    """``(float_bytes, compressed_bytes)`` of one palettized weight: its dense size in its own dtype, and its
    packed indices + LUT (+ scales) rounded up to whole bytes. The one byte accounting of the package."""
    float_bytes = record.numel * torch.empty((), dtype=record.dtype).element_size()
    return float_bytes, (record.storage_bits() + 7) // 8


def record_stats(record: PalettizedTensor, original: Optional[torch.Tensor]) -> dict:
    """The statistics row of one palettized weight (the one row schema of every report in the package);
    the error is measured against ``original`` when given. ``compression_ratio`` is ``float_bytes /
    compressed_bytes`` (how many times smaller)."""
    dense = record.to_dense().float()
    float_bytes, compressed_bytes = record_bytes(record)
    stats = {
        "palettized": True,
        "n_bits": record.n_bits,
        "n_clusters": 2 ** record.n_bits,
        "cluster_dim": record.cluster_dim,
        "n_groups": record.n_groups,
        "n_params": record.numel,
        "shape": list(record.shape),
        "lut_dtype": record.lut_dtype,
        "per_channel_scale": record.scale is not None,
        # a count per entry (one pass over the indices) rather than unique (a sort of them)
        "lut_entries_used_max": max(int((torch.bincount(record.indices[g].reshape(-1)) > 0).sum())
                                    for g in range(record.n_groups)),
        "float_bytes": float_bytes,
        "compressed_bytes": compressed_bytes,
        "compression_ratio": float_bytes / compressed_bytes,
    }
    if original is not None:
        ref = original.detach().float().cpu()
        err = dense.cpu() - ref
        rms = err.pow(2).mean().sqrt().item()
        stats["rms_error"] = rms
        stats["relative_rms_error"] = rms / max(ref.pow(2).mean().sqrt().item(), 1e-30)
    return stats


def _cell(value) -> str:
    return f"{value:.3e}" if isinstance(value, float) else str(value)


def skipped_stats(reason: str, **extra) -> dict:
    """The row of a weight that was left as is, and why."""
    return {"palettized": False, "reason": reason, **extra}


class Report(dict):
    """``{weight name: stats}``; ``str(report)`` is a readable table, Jupyter renders it as an HTML table, and
    ``plot()`` draws the weight histograms with the LUT entries. ``records`` (the palettized weights) and
    ``histograms`` (of their float values, see :func:`dkm_palett.plots.weight_histogram`) feed ``plot()`` only."""

    COLUMNS = (("n_bits", "bits"), ("cluster_dim", "dim"), ("n_groups", "luts"), ("n_params", "params"),
               ("lut_dtype", "lut"), ("rms_error", "rms err"), ("relative_rms_error", "rel err"),
               ("compressed_bytes", "bytes"))

    def __init__(self, rows: Optional[dict] = None, records: Optional[dict] = None,
                 histograms: Optional[dict] = None):
        super().__init__(rows or {})
        self.records = dict(records or {})
        self.histograms = dict(histograms or {})

    def __str__(self) -> str:
        if not self:
            return "(nothing palettized)"
        name_w = max(len("weight"), *(len(k) for k in self))
        header = f"{'weight':<{name_w}}  " + "  ".join(f"{title:>10}" for _, title in self.COLUMNS)
        lines = [header, "-" * len(header)]
        for name, row in self.items():
            if not row.get("palettized", False):
                lines.append(f"{name:<{name_w}}  skipped: {row.get('reason', '')}")
                continue
            cells = "  ".join(f"{_cell(row.get(key, '')):>10}" for key, _ in self.COLUMNS)
            lines.append(f"{name:<{name_w}}  {cells}")
        return "\n".join(lines)

    __repr__ = __str__

    def _repr_html_(self) -> str:
        if not self:
            return "<p>(nothing palettized)</p>"
        head = "".join(f"<th>{html.escape(title)}</th>" for _, title in self.COLUMNS)
        body = []
        for name, row in self.items():
            if row.get("palettized", False):
                cells = "".join(f"<td>{html.escape(_cell(row.get(key, '')))}</td>" for key, _ in self.COLUMNS)
            else:
                cells = f'<td colspan="{len(self.COLUMNS)}">skipped: {html.escape(str(row.get("reason", "")))}</td>'
            body.append(f"<tr><th>{html.escape(name)}</th>{cells}</tr>")
        return (f"<table><thead><tr><th>weight</th>{head}</tr></thead>"
                f"<tbody>{''.join(body)}</tbody></table>")

    def plot(self, title: str = ""):
        """The weight histograms with the LUT entries marked (matplotlib figure); see
        :func:`dkm_palett.plots.plot_weight_histograms`."""
        from dkm_palett.plots import plot_weight_histograms

        return plot_weight_histograms(self.records, self.histograms, title)
