"""Formatting helpers of ``benchmarks/run.py``: cell values, ratios, the comparison table and the scaling plot."""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def fs(v):
    return "—" if v is None else (f"{v * 1000:.1f} ms" if v < 1 else f"{v:.2f} s")


def fm(v):
    return "—" if v is None else f"{v:.1f} MiB"


def fr(a, b):
    if a is None or b is None or a <= 0 or b <= 0:
        return "—"
    return f"{b / a:.1f}x"


def cell(r, key, fmt):
    if r is None:
        return "not run"
    if "error" in r:
        return r["error"]
    return fmt(r.get(key))


def val(r, key):
    return None if (r is None or "error" in r) else r.get(key)


def cmp_table(rows, label):
    """rows: list of (case label, ours result, coremltools result or None, plain result or None)."""
    out = [
        f"| {label} | plain step | ours first step | ours step | ct first step | ct step | ct/ours step "
        "| ours extra peak | ct extra peak | ct/ours extra mem |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, o, c, pl in rows:
        out.append(
            f"| {name} | {cell(pl, 'step_s', fs)} | {cell(o, 'first_s', fs)} | {cell(o, 'step_s', fs)} "
            f"| {cell(c, 'first_s', fs)} | {cell(c, 'step_s', fs)} | {fr(val(o, 'step_s'), val(c, 'step_s'))} "
            f"| {cell(o, 'extra_mib', fm)} | {cell(c, 'extra_mib', fm)} "
            f"| {fr(val(o, 'extra_mib'), val(c, 'extra_mib'))} |"
        )
    return "\n".join(out)


def plot_scaling(scaling):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        pts = [s for s in scaling if s[1] is not None]
        n = [s[0] for s in pts]
        fig, ax = plt.subplots(1, 2, figsize=(10, 4))
        ax[0].loglog(n, [s[1] for s in pts], "o-", label="ours: DKM training step")
        ax[0].loglog(n, [s[3] for s in pts], "s--", label="plain training step")
        ax[0].loglog(n, [pts[0][1] * v / n[0] for v in n], ":", color="gray", label="linear in N")
        ax[0].set_xlabel("palettized weights N")
        ax[0].set_ylabel("seconds / training step")
        ax[0].legend()
        ax[1].loglog(n, [max(s[2], 0.1) for s in pts], "o-", label="ours: extra peak RSS")
        ax[1].loglog(n, [max(pts[0][2], 0.1) * v / n[0] for v in n], ":", color="gray", label="linear in N")
        ax[1].set_xlabel("palettized weights N")
        ax[1].set_ylabel("MiB")
        ax[1].legend()
        for a in ax:
            a.grid(True, which="both", alpha=0.3)
        fig.suptitle("dkm_palett DKM, 4-bit, Linear(d,d), batch 64, CPU")
        fig.tight_layout()
        tmp = os.path.join(HERE, "scaling.tmp.png")
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, os.path.join(HERE, "scaling.png"))
    except Exception as e:  # pragma: no cover
        print(f"plot failed: {e}", file=sys.stderr)
