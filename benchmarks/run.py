"""Training-time DKM benchmark: dkm_palett vs coremltools' DKMPalettizer, side by side on CPU, in one run.

Workload: ``Linear(d, d) -> ReLU -> Linear(d, 10)``, batch 64, SGD; only the first Linear is palettized
(``weight_threshold = d*d - 1`` skips the d x 10 head). Each measurement runs in its own subprocess so the
peak RSS belongs to one implementation (:mod:`run_cells`). Per run: the FIRST training step (includes k-means
init) and the median of the next steps (forward + backward + optimizer step + palettizer.step()). "Extra peak
memory" is the growth of ``ru_maxrss`` from just before ``prepare()`` to the end: the memory DKM costs on top of
plain training.

Usage: ``python benchmarks/run.py [--quick] [--all-ct]`` -> writes ``benchmarks/README.md`` and
``benchmarks/scaling.png``; the saved outputs of the task-level scripts in ``benchmarks/results/`` are included.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from run_cells import HERE, N_STEPS, ROOT, load_cells, machine_info, median_cell, run_case, warm_kernels
from run_format import cell, cmp_table, fm, fr, fs, plot_scaling, val

CT_TIMEOUT_S = 1200
CT_MAX_ITER = 3  # coremltools' default kmeans_max_iter (ours: 1)
#: our fields at coremltools' defaults, for the same-settings cells: 3 k-means iterations a step, its temperature,
#: no sensitivity weighting and exact DKM (ours: 1, 3e-4, on at 2 bits, and the bounded binned DKM at 3-4 bits on
#: LUTs of 2^18 weights or more)
SAME_AS_CT = {"kmeans_max_iter": CT_MAX_ITER, "palett_tau": 1e-4, "sensitivity_weighted": False, "dkm_impl": "dense"}
CT_HEADLINE = "1024x2,1024x3,1024x4,2048x2,2048x3,2048x4"  # coremltools headline cells (d x bits) run by default


class Cells:
    """The cells of one invocation, measured once each (or reused from ``--cells``) and keyed by their spec."""

    def __init__(self, args):
        self.args, self.results, self.saved = args, {}, load_cells(args.cells)

    def get(self, key, **spec):
        if key not in self.results:
            name = json.dumps({k: v for k, v in spec.items() if k != "timeout"}, sort_keys=True)
            self.results[key] = self.saved.get(name) or run_case(spec)
            if self.args.cells and name not in self.saved:
                with open(self.args.cells, "a") as f:
                    f.write(json.dumps({"cell": name, "result": self.results[key]}) + "\n")
        return self.results[key]

    @staticmethod
    def ct_init(d):
        # coremltools' default init (opt1d above 1024 channels, else 10 k-means++ restarts) takes tens of minutes
        # from 4M weights on this machine; a single k-means++ run changes its first step only
        return {"kmeans_init": "kmeans++", "kmeans_opt1d_threshold": 10 ** 6, "kmeans_n_init": 1} if d >= 2048 else {}

    @staticmethod
    def again(rep):  # repeats of a headline cell: rep 0 is the cell every section shares
        return {"rep": rep} if rep else {}

    def plain(self, d, dtype="float32", rep=0):
        return self.get(("plain", d, dtype, rep), impl="plain", d=d, dtype=dtype, **self.again(rep))

    def ours(self, d, bits=4, cd=1, dtype="float32", rep=0, **extra):
        k = ("ours", d, bits, cd, dtype, tuple(sorted(extra.items())), rep)
        return self.get(k, impl="ours", d=d, bits=bits, cd=cd, dtype=dtype, extra=extra, **self.again(rep))

    def ct(self, d, bits=4, cd=1, rep=0):
        if self.args.no_ct:
            return {"error": "not run (--no-ct)"}
        return self.get(("ct", d, bits, cd, rep), impl="coremltools", d=d, bits=bits, cd=cd, extra=self.ct_init(d),
                        timeout=CT_TIMEOUT_S, **self.again(rep))


def parse_args(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="only the d=1024 4-bit headline, both implementations")
    ap.add_argument("--out", default=os.path.join(HERE, "README.md"))
    ap.add_argument("--all-ct", action="store_true",
                    help="also run coremltools at 4M weights and 2/3 bits, 6/8 bits and vectors (hours)")
    ap.add_argument("--no-ct", action="store_true", help="skip coremltools entirely (ours only)")
    ap.add_argument("--ptq-from", help="include this saved post_training_mse.py output instead of re-running it")
    ap.add_argument("--no-ptq", action="store_true", help="skip running post_training_mse.py")
    ap.add_argument("--ct-cells", default=CT_HEADLINE, type=lambda v: {tuple(map(int, c.split("x"))) for c in v.split(",")},
                    help="coremltools headline cells, d x bits (default %(default)s)")
    ap.add_argument("--skip-extra", action="store_true", help="skip the vector, scaling and palett_max_mem sections")
    ap.add_argument("--repeats", type=int, default=3,
                    help="headline cells: run each this many times (fresh processes, interleaved), report medians")
    ap.add_argument("--cells", help="JSON-lines file: reuse the cells measured there, append new ones (resume a run)")
    ap.add_argument("--binned-error-from", help="include this saved binned_error.py output instead of re-running it")
    return ap.parse_args(argv)


def headline_section(C: Cells, args) -> str:
    """Exact DKM against exact DKM: every headline cell ``args.repeats`` times, interleaved, medians."""
    head_ds = [1024] if args.quick else [1024, 2048]
    head_bits = [4] if args.quick else [2, 3, 4]

    def headline_cells(d, b, rep):
        """(ours default, ours exact, ours binned, plain, ours at 3 iterations, ct) of one headline row, one repeat."""
        return (C.ours(d, bits=b, rep=rep), C.ours(d, bits=b, dkm_impl="dense", rep=rep),
                C.ours(d, bits=b, dkm_impl="binned", rep=rep), C.plain(d, rep=rep),
                C.ours(d, bits=b, rep=rep, **SAME_AS_CT),
                C.ct(d, bits=b, rep=rep) if (d, b) in args.ct_cells or args.all_ct else {"error": "not run (time)"})

    runs = {}
    for rep in range(args.repeats):  # repeats outermost: each side's cells spread over the whole run
        for d in head_ds:
            for b in head_bits:
                runs.setdefault((d, b), []).append(headline_cells(d, b, rep))
    rows = []
    for d in head_ds:
        for b in head_bits:
            o, ex, bn, pl, o3, c = (median_cell(list(side)) for side in zip(*runs[(d, b)]))
            rows.append(
                f"| {d * d / 2**20:.0f}M | {b} | {cell(pl, 'step_s', fs)} | {cell(o, 'step_s', fs)} "
                f"| {cell(ex, 'step_s', fs)} | {cell(bn, 'step_s', fs)} | {fr(val(bn, 'step_s'), val(ex, 'step_s'))} "
                f"| {cell(o3, 'step_s', fs)} "
                f"| {cell(c, 'step_s', fs)} | **{fr(val(o3, 'step_s'), val(c, 'step_s'))}** "
                f"| {fr(val(o, 'step_s'), val(c, 'step_s'))} | {cell(o3, 'step_cpu_s', fs)} "
                f"| {cell(c, 'step_cpu_s', fs)} | {fr(val(o3, 'step_cpu_s'), val(c, 'step_cpu_s'))} "
                f"| {cell(o, 'first_s', fs)} | {cell(c, 'first_s', fs)} "
                f"| {cell(o, 'extra_mib', fm)} | {cell(c, 'extra_mib', fm)} |")
    return (
        "## Headline: exact DKM against exact DKM (d x d Linear, cluster_dim=1)\n\n"
        "*ours exact* is `dkm_impl=\"dense\"`: the fused CPU kernels, which match the plain-autograd reference "
        "(tests/test_dkm_engines.py). coremltools' DKM is exact too. *ours default* (`dkm_impl=\"auto\"`) runs "
        "the exact kernels at 2 bits and, at 3-4 bits, the bounded binned DKM on LUTs of 2^18 weights or more "
        "(every cell here), so at 3-4 bits the *defaults* ratio compares our bounded approximation with their "
        "exact DKM. Our default is "
        f"`kmeans_max_iter=1` (one k-means iteration a training step), coremltools' is {CT_MAX_ITER}, so the table "
        "has both ratios, labelled: **ct / ours, same settings** (exact vs exact, both at "
        f"`kmeans_max_iter={CT_MAX_ITER}` and `palett_tau=1e-4`, ours without the sensitivity weighting our default "
        "adds at 2 bits: the same math step for step) and *ct / ours, defaults* (default vs default: ours at "
        "1 iteration and tau 3e-4, exact and sensitivity-weighted at 2 bits, binned at 3-4 bits; theirs exact at 3 "
        "and 1e-4). *binned* is `dkm_impl=\"binned\"` (grid from tau and the centroid spacing, error table "
        "below) at our defaults; *exact / binned* > 1 means exact is slower. Both DKMs stop iterating once no "
        "centroid moves more than "
        "`palett_epsilon` (1e-4), so a step at 3 iterations runs 1 to 3 of them: all 3 in the first steps after "
        "initialisation, fewer as the centroids settle. "
        f"Every cell of this table ran {args.repeats} times, each in a fresh process, the repeats interleaved (every "
        "cell of the table, then again); each entry is the median over the runs of each run's median step.\n\n"
        "*CPU* columns: CPU time of the step (process time, all threads) at the same settings, less sensitive than "
        "wall time to other jobs on the machine. *first step* and *extra peak*: our defaults.\n\n"
        "| weights | bits | plain step | ours default step | ours exact (1 iteration) step | ours binned step "
        "| exact / binned "
        f"| ours exact, {CT_MAX_ITER} iterations | ct step (exact, {CT_MAX_ITER} iterations) "
        "| ct / ours, same settings | ct / ours, defaults | ours CPU, same settings | ct CPU "
        "| ct / ours CPU, same settings | ours first step | ct first step | ours extra peak | ct extra peak |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows))


def busy_section(C: Cells, args) -> str:
    """The 1M-weight 4-bit cells while another process keeps one core busy."""

    def busy_cells(rep):
        """(plain idle, ours idle, plain busy, ours busy), one repeat; the idle cells are the headline's."""
        return (C.plain(1024, rep=rep), C.ours(1024, rep=rep),
                C.get(("plain-busy", 1024, rep), impl="plain", d=1024, dtype="float32", busy=True, **C.again(rep)),
                C.get(("ours-busy", 1024, rep), impl="ours", d=1024, bits=4, cd=1, dtype="float32", extra={},
                      busy=True, **C.again(rep)))

    busy = [median_cell(list(side)) for side in zip(*(busy_cells(rep) for rep in range(args.repeats)))]
    idle_ratio, busy_ratio = (fr(val(p, "step_s"), val(o, "step_s")) for p, o in (busy[:2], busy[2:]))
    both = [val(c, "step_s") for c in busy]
    growth = (f"{(both[3] / both[2]) / (both[1] / both[0]):.2f}x" if all(v is not None for v in both) else "—")
    return (
        "## A busy machine (d=1024, 1M weights, 4-bit)\n\n"
        "The same cells while another process keeps one core busy (`python -c 'while True: pass'`, started before "
        "the cell's process and killed after it), each run as often as the headline cells, medians. *ours*: our "
        "default, which at this size and 4 bits is the bounded binned DKM. Target (#10): the DKM / plain ratio busy "
        "is at most 2x the idle one.\n\n"
        "| | plain step | ours step | ours / plain |\n|---|---|---|---|\n"
        f"| idle | {cell(busy[0], 'step_s', fs)} | {cell(busy[1], 'step_s', fs)} | {idle_ratio} |\n"
        f"| one core busy | {cell(busy[2], 'step_s', fs)} | {cell(busy[3], 'step_s', fs)} | {busy_ratio} |\n\n"
        f"Busy ratio / idle ratio: **{growth}**.")


def wide_bits_section(C: Cells, args) -> list:
    """6 and 8 bits: the bounded binned default against exact."""
    if not args.quick:
        rows = []
        for b in (6, 8):
            o, ex, pl = C.ours(1024, bits=b), C.ours(1024, bits=b, dkm_impl="dense"), C.plain(1024)
            c = C.ct(1024, bits=b) if args.all_ct else {"error": "not run (time; --all-ct)"}
            rows.append(
                f"| {b} | {cell(pl, 'step_s', fs)} | {cell(o, 'step_s', fs)} | {cell(ex, 'step_s', fs)} "
                f"| {fr(val(o, 'step_s'), val(ex, 'step_s'))} | {cell(o, 'step_cpu_s', fs)} "
                f"| {cell(ex, 'step_cpu_s', fs)} | {fr(val(o, 'step_cpu_s'), val(ex, 'step_cpu_s'))} "
                f"| {cell(c, 'step_s', fs)} | {fr(val(o, 'step_s'), val(c, 'step_s'))} "
                f"| {fr(val(ex, 'step_s'), val(c, 'step_s'))} | {cell(o, 'extra_mib', fm)} "
                f"| {cell(ex, 'extra_mib', fm)} | {cell(c, 'extra_mib', fm)} |")
        return [(
            "## 6 and 8 bits (d=1024, 1M weights, cluster_dim=1)\n\n"
            "The default here is the binned DKM with the grid chosen for the error bound (forward <= 1e-6, gradient "
            "<= 1e-3 relative; table below), when that grid is smaller than the weights; *exact* is "
            "`dkm_impl=\"dense\"` (the fused kernels). *ct / default* compares defaults, *ct / exact* exact with "
            "exact.\n\n"
            "| bits | plain step | ours default (binned) step | ours exact step | exact / default | ours default CPU "
            "| ours exact CPU | exact / default CPU | ct step (exact) | ct / default | ct / exact "
            "| ours default extra peak | ours exact extra peak | ct extra peak |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows))]
    return []


def extra_sections(C: Cells, args, scaling: list) -> list:
    """Vector LUTs, scaling with d (points appended to ``scaling`` for the plot) and ``palett_max_mem``."""
    sections = []
    if not args.quick and not args.skip_extra:
        rows = [(f"cluster_dim={cd}", C.ours(1024, cd=cd), C.ct(1024, cd=cd) if args.all_ct else None, C.plain(1024))
                for cd in (2, 4)]
        sections.append("## Vector palettization (d=1024, 4-bit; exact chunked torch DKM)\n\n"
                        + cmp_table(rows, "cluster_dim"))

        lines = [
            "| d | weights | plain step | ours first step | ours step | step / plain | ours extra peak "
            "| ours step per M weights | extra peak per M weights |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for d in (512, 1024, 2048):
            o, pl = C.ours(d), C.plain(d)
            m = d * d / 2 ** 20
            scaling.append((d * d, val(o, "step_s"), val(o, "extra_mib"), val(pl, "step_s")))
            per_t = fs(val(o, "step_s") / m) if val(o, "step_s") else "—"
            per_m = fm(val(o, "extra_mib") / m) if val(o, "extra_mib") else "—"
            lines.append(
                f"| {d} | {m:.2f}M | {cell(pl, 'step_s', fs)} | {cell(o, 'first_s', fs)} "
                f"| {cell(o, 'step_s', fs)} | {fr(val(pl, 'step_s'), val(o, 'step_s'))} | {cell(o, 'extra_mib', fm)} "
                f"| {per_t} | {per_m} |"
            )
        sections.append("## Scaling, ours (4-bit, default settings: the bounded binned DKM at these sizes)\n\n"
                        "![scaling](scaling.png)\n\n" + "\n".join(lines))

        lines = ["| palett_max_mem | ours first step | ours step | ours extra peak |", "|---|---|---|---|"]
        for pm in (1e-4, 1.0):
            o = C.ours(1024, cd=2, palett_max_mem=pm)
            lines.append(f"| {pm:g} | {cell(o, 'first_s', fs)} | {cell(o, 'step_s', fs)} | {cell(o, 'extra_mib', fm)} |")
        sections.append(
            "## `palett_max_mem`, ours, vectors (d=1024, 4-bit, cluster_dim=2)\n\n"
            "The budget is `palett_max_mem x` available memory (MemAvailable on CPU, free memory on CUDA). Half of "
            "it bounds the chunk working set of the torch DKM (rows x K distance/attention blocks), the other half "
            "the attention kept from forward for backward (recomputed chunk by chunk when it does not fit). The "
            "fused scalar kernels work in fixed 512-point blocks and keep nothing for backward, so the budget does "
            "not apply to them.\n\n" + "\n".join(lines))

    return sections


def saved_outputs(args) -> tuple:
    """``(post_training_mse output, binned_error output, {name: saved results/*.md})``."""
    ptq = None
    if args.ptq_from:
        with open(args.ptq_from) as f:
            ptq = f.read().strip()
    elif not args.quick and not args.no_ptq:
        try:
            out = subprocess.run([sys.executable, os.path.join(HERE, "post_training_mse.py")], capture_output=True,
                                 text=True, timeout=600)
            ptq = out.stdout.strip() if out.returncode == 0 else f"failed rc={out.returncode}"
        except subprocess.TimeoutExpired:
            ptq = None
    binned_error = None
    if args.binned_error_from:
        with open(args.binned_error_from) as f:
            binned_error = f.read().strip()
    elif not args.quick:
        out = subprocess.run([sys.executable, os.path.join(HERE, "binned_error.py")], capture_output=True, text=True,
                             timeout=1800)
        binned_error = out.stdout.strip() if out.returncode == 0 else f"failed rc={out.returncode}"
    saved = {}
    for name in ("quality", "charlm_binned_vs_exact", "sensitivity_charlm", "model_scale"):
        path = os.path.join(HERE, "results", name + ".md")
        if os.path.exists(path):
            with open(path) as f:
                saved[name] = f.read().strip()

    return ptq, binned_error, saved


def document(args, sections: list, seconds: float) -> list:
    """The lines of ``benchmarks/README.md``."""
    ptq, binned_error, saved = saved_outputs(args)
    total = seconds
    doc = [
        "# Benchmarks",
        "",
        "Generated by `python benchmarks/run.py " + " ".join(sys.argv[1:]) + f"` in {total:.0f} s"
        + (f" (cells measured earlier in the same session reused from `{os.path.relpath(args.cells, ROOT)}`, which "
           "holds every cell's raw result)." if args.cells else "."),
        "",
        "## Machine",
        "",
        *machine_info(),
        "",
        "## Method",
        "",
        "Model `Linear(d,d) -> ReLU -> Linear(d,10)`, batch 64, SGD(momentum 0.9); only the first Linear is "
        "palettized (`weight_threshold=d*d-1`). ours = `dkm_palett.DKMPalettizer` with default settings unless "
        "stated (`dkm_impl=\"auto\"`: exact fused kernels for scalar LUTs at 2 bits, and at 3-4 bits on LUTs "
        "under 2^18 weights; elsewhere the bounded binned DKM where its grid is small enough, exact otherwise; "
        "`kmeans_max_iter=1`); ct = "
        "`coremltools.optimize.torch.palettization.DKMPalettizer` (its default `kmeans_max_iter` is 3); both get "
        "the same config arguments. Every cell "
        "is its own subprocess, run one after another in the same invocation (ours, ours binned, plain and ct of a "
        "row back to back), on a machine shared with other "
        "developers' jobs (timings are noisy; compare ratios within one run). *first step* includes k-means "
        f"initialisation; *step* is the median of the next {N_STEPS} full training steps (forward, backward, "
        "optimizer step, `palettizer.step()`). *extra peak* = growth of peak RSS (`ru_maxrss`) from just before "
        "`prepare()` (libraries imported: coremltools, or dkm_palett and numba; one plain warm-up step done) to the end, so it includes initialisation. "
        "Ratios are ct / ours (>1: ours is faster / smaller). From d=2048 coremltools gets `kmeans_init=\"kmeans++\", "
        "kmeans_n_init=1, kmeans_opt1d_threshold=10**6`: its default initialisation (opt1d, or 10 k-means++ "
        "restarts) takes tens of minutes there. That changes its first step only. The fused numba kernels are "
        "compiled (and cached on disk) before the timed cells; the first use after an install compiles them once "
        "(about 16 s of CPU).",
        "",
        *[s + "\n" for s in sections],
    ]
    if binned_error:
        doc += ["## Error of the binned DKM (fp32)", "",
                "`python benchmarks/binned_error.py`: the grid `dkm_impl=\"binned\"` (and `auto` at 6-8 bits, and at 3-4 bits on LUTs of 2^18 weights or more) uses, "
                "from tau and the largest gap between centroids, against the float64 reference. Where the grid "
                "would not be smaller than the weights (grid / weights >= 0.25), `auto` runs the exact DKM "
                "instead.", "", binned_error, ""]
    if not args.quick:
        doc += ["## Post-training palettization", "", "`python benchmarks/post_training_mse.py` (default args):", ""]
        doc += [ptq if ptq else "Not run; run it directly.", ""]
    if "quality" in saved:
        doc += ["## Finalized-model quality against coremltools (charlm, MNIST)", "",
                "The saved `benchmarks/results/quality.md` (its script trains hundreds of models, so `run.py` includes "
                "its last output rather than re-running it):", "", saved["quality"], ""]
    if "charlm_binned_vs_exact" in saved:
        doc += ["## Binned vs exact DKM on a real task (charlm, 2-bit)", "",
                "`python benchmarks/charlm_binned_vs_exact.py` (saved in `benchmarks/results/`; it trains models, so "
                "`run.py` includes its last output rather than re-running it). Bar: |binned - exact| <= 0.01.", "",
                saved["charlm_binned_vs_exact"], ""]
    if "sensitivity_charlm" in saved:
        doc += ["## Sensitivity-weighted vs plain post-training k-means (charlm)", "",
                "`python benchmarks/sensitivity_charlm.py --granularity per_tensor per_tensor_scale per_channel "
                "--out benchmarks/results/sensitivity_charlm.md` (saved output):", "", saved["sensitivity_charlm"], ""]
    if "model_scale" in saved:
        doc += ["## Whole models: DKM at 7M-1.1B parameters", "",
                "`python benchmarks/model_scale.py` (its cells take hours on this machine, so `run.py` includes the "
                "saved `benchmarks/results/model_scale.md`):", "", saved["model_scale"].replace("../model_scale.png",
                                                                                             "model_scale.png"), ""]
    return doc


def main(argv=None):
    args = parse_args(argv)
    t_start = time.perf_counter()
    warm_kernels()
    C = Cells(args)
    sections = [headline_section(C, args), busy_section(C, args), *wide_bits_section(C, args)]
    scaling = []
    sections += extra_sections(C, args, scaling)
    if len(scaling) > 1:
        plot_scaling(scaling)
    doc = document(args, sections, time.perf_counter() - t_start)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(doc))
    os.replace(tmp, args.out)
    print("\n".join(doc))


if __name__ == "__main__":
    main()
