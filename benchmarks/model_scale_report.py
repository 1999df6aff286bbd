"""The report of ``benchmarks/model_scale.py``: ``results/model_scale.md`` and ``model_scale.png``."""

from __future__ import annotations

import os

HERE = os.path.dirname(os.path.abspath(__file__))
MD = os.path.join(HERE, "results", "model_scale.md")
PNG = os.path.join(HERE, "model_scale.png")
CT_ITERS = 3  # coremltools' kmeans_max_iter
ORDER = ["7m", "20m", "125m", "350m", "1.1b", "resnet18", "resnet50"]


def _s(v) -> str:
    return "—" if v is None else (f"{v:.2f} s" if v >= 0.1 else f"{v * 1000:.0f} ms")


def _gib(mib) -> str:
    return "—" if mib is None else f"{mib / 1024:.2f} GiB"


def _ratio(a, b) -> str:
    return "—" if a is None or b is None or b <= 0 else f"{a / b:.2f}x"


def _tau(r) -> str:
    """The cell's ``palett_tau``: recorded since 2026-12-07; every earlier cell ran at 1e-4, then the default."""
    return f"{r.get('palett_tau', 1e-4):g}"


def _ok(r):
    return r is not None and "error" not in r


def _cells(results: dict):
    """Yield ``(model, tokens, bits, iters, plain, ours, coremltools)`` rows in a stable order: one per ours cell
    (``iters``: its ``kmeans_max_iter``; ``bits`` names a non-default ``dkm_impl``, e.g. "4 (dense)"), coremltools
    beside our exact (``dense``) cell at its own 3 iterations (or alone)."""
    keys = {(r["model"], r["tokens"], r["bits"], r.get("iters") or CT_ITERS, r.get("dkm_impl") or "")
            for r in results.values() if not r["impl"].startswith("plain")}
    for model, tokens, bits, iters, engine in sorted(
            keys, key=lambda k: (ORDER.index(k[0]) if k[0] in ORDER else 99, *k[1:])):
        exact = iters == CT_ITERS and engine == "dense"  # coremltools' DKM is exact: beside our exact cells
        ct = results.get(f"{model}/{tokens}/coremltools/{bits}bit") if exact else None
        ours = results.get(f"{model}/{tokens}/ours/{bits}bit/{iters}it" + (f"/{engine}" if engine else ""))
        # the plain cell measured beside it (the latest plain cell when it ran), else the latest now
        yield (model, tokens, f"{bits} ({engine})" if engine else bits, iters,
               (ours or ct or {}).get("plain") or results.get(f"{model}/{tokens}/plain"), ours, ct)


def _main_table(results: dict) -> list[str]:
    lines = ["| model | params | input | bits | DKM iterations | tau | plain step | DKM first step | init (first - plain) "
             "| init (first - DKM step) | DKM step | "
             "DKM/plain step | plain peak RSS | DKM peak RSS | DKM/plain peak | load at start (plain / DKM) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    done = {(m, t) for m, t, _, _, _, ours, _ in _cells(results) if ours is not None}
    for r in results.values():  # plain cells whose DKM cell was not run
        if r["impl"] == "plain" and (r["model"], r["tokens"]) not in done and _ok(r):
            lines.append(f"| {r['model']} | {_params(r)} | 1x{r['tokens']} | — | — | — | {_s(r['step_s'])} | not run | — "
                         f"| — | — | — | {_gib(r['peak_mib'])} | — | — | {_load(r)} |")
    for model, tokens, bits, iters, plain, ours, _ in _cells(results):
        if ours is None:
            continue
        ref = plain or {}
        size = _params(ours, plain)
        inp = f"32x3x32x32" if model.startswith("resnet") else f"1x{tokens}"
        if not _ok(ours):
            done = ours.get("partial_steps_s", [])
            later = f"{len(done) - 1} later steps: " + ", ".join(_s(t) for t in done[1:]) if len(done) > 1 else "—"
            lines.append(f"| {model} | {size} | {inp} | {bits} | {iters} | {_tau(ours)} | {_s(ref.get('step_s'))} "
                         f"| {ours['error']}"
                         f"{'; first step ' + _s(done[0]) if done else ''} | — | — | {later} | — "
                         f"| {_gib(ref.get('peak_mib'))} | {_gib(ours.get('peak_mib'))} "
                         f"| {_ratio(ours.get('peak_mib'), ref.get('peak_mib'))} | {_load(plain, ours)} |")
            continue
        init = None if not _ok(plain) else ours["first_s"] - plain["step_s"]
        lines.append(
            f"| {model} | {size} | {inp} | {bits} | {iters} | {_tau(ours)} | {_s(ref.get('step_s'))} "
            f"| {_s(ours['first_s'])} "
            f"| {_s(init)} "
            f"| {_s(ours['first_s'] - ours['step_s'])} "
            f"| {_s(ours['step_s'])} | {_ratio(ours['step_s'], ref.get('step_s'))} | {_gib(ref.get('peak_mib'))} "
            f"| {_gib(ours['peak_mib'])}{_untrimmed(ours)} | {_ratio(ours['peak_mib'], ref.get('peak_mib'))} "
            f"| {_load(plain, ours)} |")
    return lines


def _untrimmed(ours: dict) -> str:
    """A mark on DKM cells measured before dkm_palett trimmed the heap, or under its policy before 2026-12-07
    (glibc's mmap threshold, a trim before every module of 32 MiB or more) rather than the heap kept for reuse."""
    if "heap_trim" not in ours:
        return " (no trim)"
    return "" if "heap_reuse" in ours else " (older heap policy)"


def _trim_table(results: dict) -> list[str]:
    """DKM against plain training with and without the same heap policy (``plain-trim`` cells): step time with its
    system CPU time (mostly page faults) and peak memory."""
    lines = ["| model | input | bits | DKM iterations | plain step (system time) | plain step, heap as DKM keeps it "
             "| DKM step | DKM/plain step | DKM/same-heap plain step | plain peak RSS | plain peak RSS, heap as DKM "
             "keeps it | DKM peak RSS | DKM/plain peak | DKM/same-heap plain peak |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    found = False
    for model, tokens, bits, iters, plain, ours, _ in _cells(results):
        same = results.get(f"{model}/{tokens}/plain-trim")
        if not (_ok(ours) and _ok(same) and "heap_reuse" in ours and "heap_reuse" in same):
            continue
        found = True
        plain = plain or {}
        peak, base = ours["peak_mib"], plain.get("peak_mib")
        lines.append(f"| {model} | 1x{tokens} | {bits} | {iters} | {_with_sys(plain)} | {_with_sys(same)} "
                     f"| {_with_sys(ours)} | {_ratio(ours['step_s'], plain.get('step_s'))} "
                     f"| {_ratio(ours['step_s'], same['step_s'])} | {_gib(base)} | {_gib(same['peak_mib'])} "
                     f"| {_gib(peak)} | {_ratio(peak, base)} | {_ratio(peak, same['peak_mib'])} |")
    return lines if found else []


def _with_sys(cell: dict) -> str:
    """A cell's step time and, where recorded (since 2026-12-07), its system CPU time a step."""
    if cell.get("step_sys_s") is None:
        return _s(cell.get("step_s"))
    return f"{_s(cell.get('step_s'))} ({_s(cell['step_sys_s'])})"


def _load(*cells) -> str:
    """The 1-minute load average at each cell's start (``—``: no cell, or one from before it was recorded)."""
    return " / ".join("—" if not c or "load1_start" not in c else f"{c['load1_start']:.1f}" for c in cells)


def _params(*rows) -> str:
    for r in rows:
        if r and r.get("params"):
            return f"{r['params'] / 1e6:.1f}M"
    return "—"


def _ct_error(ct: dict) -> str:
    """A failed coremltools cell's result: out of memory under its cap (``run_cell`` marks it "OOM"; cells from
    before torch's allocator message counted carry only the message), or the error as recorded (a timeout)."""
    from model_scale import OOM_MARKERS

    err = ct["error"]
    if err.startswith("OOM") or any(m in err for m in OOM_MARKERS):
        return f"out of memory (address space capped at {ct.get('cap_gib', 0):g} GiB) after {ct['wall_s']:.0f} s"
    return err


def _ct_table(results: dict) -> list[str]:
    """coremltools beside our exact DKM (``dkm_impl="dense"``) at its 3 iterations (same settings) and at our default
    ``default_iters``."""
    from dkm_palett.config.training import ModuleDKMPalettizerConfig

    default_iters = ModuleDKMPalettizerConfig.kmeans_max_iter
    lines = [f"| model | bits | plain step | ours exact step ({CT_ITERS} iterations) | coremltools step | ct/ours step, "
             f"same settings | ours exact step ({default_iters} iteration) | ct/ours step, exact at our default "
             "iterations | ours extra peak | "
             "ct extra peak | ct/ours extra memory | ct first step |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    found = False
    for model, tokens, bits, _, plain, ours, ct in _cells(results):
        if ct is None:
            continue
        found = True
        bits = ct["bits"]  # the row's label names the engine ("4 (dense)")
        default = results.get(f"{model}/{tokens}/ours/{bits}bit/{default_iters}it/dense") or {}
        head = (f"| {model} ({_params(plain, ours)}, 1x{tokens}) | {bits} | {_s((plain or {}).get('step_s'))} "
                f"| {_s((ours or {}).get('step_s'))} ")
        if not _ok(ct):
            lines.append(head + f"| {_ct_error(ct)} | — | {_s(default.get('step_s'))} | — | — | — | — | — |")
            continue
        base = (plain or {}).get("peak_mib")
        extra_ours = None if not (_ok(ours) and base) else ours["peak_mib"] - base
        extra_ct = None if not base else ct["peak_mib"] - base
        lines.append(
            head + f"| {_s(ct['step_s'])} | {_ratio(ct['step_s'], (ours or {}).get('step_s'))} "
            f"| {_s(default.get('step_s'))} | {_ratio(ct['step_s'], default.get('step_s'))} "
            f"| {_gib(extra_ours)} | {_gib(extra_ct)} | {_ratio(extra_ct, extra_ours)} | {_s(ct['first_s'])} |")
    return lines if found else []


def _end_table(results: dict) -> list[str]:
    lines = ["| model | bits | DKM iterations | DKM training peak RSS | finalize() | save_compressed() "
             "| peak RSS after both | export_coreml |", "|---|---|---|---|---|---|---|---|"]
    found = False
    for model, tokens, bits, iters, _, ours, _ in _cells(results):
        if not _ok(ours) or "finalize_s" not in ours:
            continue
        found = True
        coreml = _s(ours.get("coreml_s")) if "coreml_s" in ours else "not run"
        lines.append(f"| {model} (1x{tokens}) | {bits} | {iters} | {_gib(ours['peak_mib'])} | {_s(ours['finalize_s'])} "
                     f"| {_s(ours['save_s'])} | {_gib(ours['save_peak_mib'])} | {coreml} |")
    return lines if found else []


def plot(results: dict) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    series: dict = {}
    for r in results.values():
        four_bit = r["impl"] == "plain" or (r.get("bits", 4) == 4 and not r.get("dkm_impl"))  # default engine
        if _ok(r) and not r["model"].startswith("resnet") and r["tokens"] == 128 and four_bit:
            name = {"plain": "plain", "coremltools": "coremltools DKM 4-bit"}.get(
                r["impl"], f"ours DKM 4-bit, {r.get('iters')} iteration(s)")
            series.setdefault(name, {})[r["params"]] = r["peak_mib"] / 1024
    fig, ax = plt.subplots(figsize=(6, 4))
    for (name, pts), style in zip(sorted(series.items()), ("^-", "o-", "s-", "d-", "v-")):
        pts = sorted(pts.items())
        ax.loglog([p for p, _ in pts], [m for _, m in pts], style, label=name)
    ax.set_xlabel("parameters")
    ax.set_ylabel("peak RSS (GiB)")
    ax.set_title("Peak memory of a training step (decoder, 1x128 tokens)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(PNG, dpi=110)
    plt.close(fig)
    return True


def write_report(results: dict) -> str:
    import sys

    sys.path.insert(0, os.path.dirname(HERE))
    from dkm_palett.io import atomic_write_text

    doc = ["Every cell is its own process (`python benchmarks/model_scale.py`); fp32 weights, SGD, default "
           "`DKMPalettizer` settings with `n_bits` as given (every Linear, Conv2d and the embedding above "
           "`weight_threshold=2048`) and `kmeans_max_iter` as in *DKM iterations* (the default is 1; coremltools' "
           "and our default before 2026-12-06 is 3) and *tau* (`palett_tau`; cells that do not record it ran at "
           "1e-4, coremltools' default and ours until 2026-12-07, now 3e-4: the exact kernels' cost does not depend "
           "on it, the binned grid is 3x coarser at 3e-4). *bits* \"4 (dense)\": `dkm_impl=\"dense\"`, the exact "
           "fused kernels, which were the default at 4 bits until 2026-12-07; the default (`auto`) now runs the "
           "bounded binned DKM at 3-4 bits on LUTs of at least 2^18 weights (every large layer here) and the exact "
           "kernels on smaller ones. *plain step* and *DKM step* are medians of 3 "
           "steps after the first; *DKM first "
           "step* includes k-means initialisation, so *first - plain* counts one DKM step too and *first - DKM "
           "step* is the initialisation itself; *peak RSS* is the process's `ru_maxrss` (model construction "
           "included). The machine (2 cores, 24 GiB) is shared with other developers' jobs, so timings depend on "
           "what else ran: *load at start* is the 1-minute load average when each cell started. Cells run back to "
           "back, so it includes the tail of the previous cell (up to about 2 on an otherwise idle 2-core machine); "
           "well above 2 means other jobs. Cells without it predate its recording and ran while the machine was "
           "heavily shared (plain steps several times slower than on an idle machine). Memory does not depend on "
           "the load.", "", *_main_table(results), ""]
    if plot(results):
        doc += ["![peak memory vs parameters](../model_scale.png)", ""]
    trim = _trim_table(results)
    if trim:
        doc += ["DKM training manages the C heap (`dkm_palett.heap`, glibc): from 1 GiB of DKM weights (the 350M and "
                "1.1B decoders) glibc serves every tensor from its heap and never trims the heap's top by itself, so "
                "what a step frees (last step's gradients, each layer's transients) is reused rather than unmapped "
                "and faulted back; the free heap at each step's first DKM forward is its baseline, and before a DKM "
                "module's backward `malloc_trim` runs once the free heap grew a sixteenth of the DKM weights "
                "(64-256 MiB) over it; under 1 GiB, glibc's defaults and also a trim before each module of 32 MiB or "
                "more. Cells marked *(older heap policy)* ran under the policy before 2026-12-07 (a trim before "
                "every module of 32 MiB or more, growth counted from the last trim), *(no trim)* before any. Page "
                "faults are slow on this machine (5-10 us of system time a page): plain training with glibc's defaults spends "
                "much of its step in the system CPU time shown in brackets (glibc maps and unmaps every tensor of "
                "32 MiB or more), so the like-for-like baseline is plain training under the same policy before the "
                "same modules (`--impls plain-trim`, its own process; today's policy only):", "", *trim, ""]
    ct = _ct_table(results)
    if ct:
        doc += ["coremltools' `DKMPalettizer` (same config, its own process, capped address space and a timeout; "
                "*extra* = peak RSS minus the plain step's peak). Both DKMs are exact (ours: `dkm_impl=\"dense\"`; "
                "our default now runs the bounded binned DKM on this model's embedding and head, in the main table). "
                "*same settings*: our step at coremltools' 3 k-means iterations; then our default 1 iteration "
                "against its 3:", "", *ct, ""]
    end = _end_table(results)
    if end:
        doc += ["End of the pipeline, in the DKM cell's process after its steps (gradients freed first):", "", *end, ""]
    text = "\n".join(doc)
    atomic_write_text(MD, text + "\n")
    print(text)
    return text
