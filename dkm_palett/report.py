"""Per-weight palettization statistics, and a dict that prints as a table."""

from __future__ import annotations

from typing import Optional

import torch

from dkm_palett.lut import PalettizedTensor


def record_stats(record: PalettizedTensor, original: Optional[torch.Tensor]) -> dict:
    """Statistics of one palettized weight; the error is measured against ``original`` when given."""
    dense = record.to_dense().float()
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
        "lut_entries_used_max": int(max(record.indices[g].unique().numel() for g in range(record.n_groups))),
        "float_bytes": record.numel * 4,
        "compressed_bytes": (record.storage_bits() + 7) // 8,
    }
    if original is not None:
        ref = original.detach().float().cpu()
        err = dense.cpu() - ref
        rms = err.pow(2).mean().sqrt().item()
        stats["rms_error"] = rms
        stats["relative_rms_error"] = rms / max(ref.pow(2).mean().sqrt().item(), 1e-30)
    return stats


class Report(dict):
    """``{weight name: stats}``; ``str(report)`` is a readable table."""

    COLUMNS = (("n_bits", "bits"), ("cluster_dim", "dim"), ("n_groups", "luts"), ("n_params", "params"),
               ("lut_dtype", "lut"), ("rms_error", "rms err"), ("relative_rms_error", "rel err"),
               ("compressed_bytes", "bytes"))

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
            cells = []
            for key, _ in self.COLUMNS:
                value = row.get(key, "")
                cells.append(f"{value:>10.3e}" if isinstance(value, float) else f"{value!s:>10}")
            lines.append(f"{name:<{name_w}}  " + "  ".join(cells))
        return "\n".join(lines)

    __repr__ = __str__
