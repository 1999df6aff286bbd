"""Training-time DKM benchmark: dkm_palett vs coremltools' DKMPalettizer, side by side on CPU, in one run.

Workload: ``Linear(d, d) -> ReLU -> Linear(d, 10)``, batch 64, SGD; only the first Linear is palettized
(``weight_threshold = d*d - 1`` skips the d x 10 head). Each measurement runs in its own subprocess so the
peak RSS belongs to one implementation. Per run: the FIRST training step (includes k-means init) and the median
of the next steps (forward + backward + optimizer step + palettizer.step()). "Extra peak memory" is the growth
of ``ru_maxrss`` from just before ``prepare()`` to the end: the memory DKM costs on top of plain training.

Usage: ``python benchmarks/run.py [--quick] [--all-ct]`` -> writes ``benchmarks/README.md`` and
``benchmarks/scaling.png``; the saved outputs of the task-level scripts in ``benchmarks/results/`` are included.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TIMEOUT_S = 300
CT_TIMEOUT_S = 1200
N_STEPS = 5
CT_MAX_ITER = 3  # coremltools' default kmeans_max_iter (ours: 1)
CT_HEADLINE = "1024x2,1024x3,1024x4,2048x2,2048x3,2048x4"  # coremltools headline cells (d x bits) run by default
BATCH = 64


def maxrss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def worker(spec: dict) -> dict:
    import logging
    import statistics
    import warnings

    os.environ.setdefault("TQDM_DISABLE", "1")
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    sys.path.insert(0, ROOT)
    import torch
    from torch import nn

    d, impl = spec["d"], spec["impl"]
    # import the implementation before the baseline RSS, so library imports are not counted as DKM memory
    if impl == "ours":
        import numba  # noqa: F401  (dkm_palett's exact 1-D k-means imports it lazily)

        from dkm_palett import DKMPalettizer, DKMPalettizerConfig, ModuleDKMPalettizerConfig
    elif impl == "coremltools":
        from coremltools.optimize.torch.palettization import (
            DKMPalettizer,
            DKMPalettizerConfig,
            ModuleDKMPalettizerConfig,
        )
    torch.manual_seed(0)
    dtype = getattr(torch, spec.get("dtype", "float32"))
    model = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, 10)).to(dtype)
    x = torch.randn(BATCH, d, dtype=dtype)
    y = torch.randint(0, 10, (BATCH,))
    loss_fn = nn.CrossEntropyLoss()

    def make_opt(m):
        return torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)

    opt = make_opt(model)

    def train_step(m, o, p=None):
        o.zero_grad(set_to_none=True)
        loss = loss_fn(m(x).float(), y)
        loss.backward()
        o.step()
        if p is not None:
            p.step()
        return float(loss)

    train_step(model, opt)  # warm-up plain step: allocates grads/momentum buffers
    rss0 = maxrss_mib()
    p = None
    if impl != "plain":
        kw = dict(n_bits=spec["bits"], weight_threshold=d * d - 1, cluster_dim=spec.get("cd", 1))
        kw.update(spec.get("extra", {}))
        cfg = DKMPalettizerConfig(global_config=ModuleDKMPalettizerConfig(**kw))
        p = DKMPalettizer(model, cfg)
        model = p.prepare(inplace=True)
        opt = make_opt(model)
    model.train()
    times, cpu = [], []
    rss_first = None
    for _ in range(1 + N_STEPS):
        t0, c0 = time.perf_counter(), time.process_time()
        loss = train_step(model, opt, p)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        rss_first = rss_first or maxrss_mib()
    rss1 = maxrss_mib()
    return {
        "first_s": times[0],
        "step_s": statistics.median(times[1:]),
        "steps_s": times[1:],
        "step_cpu_s": statistics.median(cpu[1:]),
        "extra_mib": rss1 - rss0,
        "first_extra_mib": rss_first - rss0,
        "base_mib": rss0,
        "loss": loss,
        "threads": torch.get_num_threads(),
    }


def load_cells(path) -> dict:
    """Cells measured by an earlier (interrupted) invocation, keyed by their spec."""
    if not path or not os.path.exists(path):
        return {}
    with open(path) as f:
        return {row["cell"]: row["result"] for row in map(json.loads, f) if row}


BUSY_LOOP = "while True:\n    pass"  # the busy-machine cells: another process keeping one core busy


def run_case(spec: dict) -> dict:
    t0 = time.perf_counter()
    busy = subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) if spec.get("busy") else None
    try:
        try:
            out = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
                capture_output=True,
                text=True,
                timeout=spec.get("timeout", TIMEOUT_S),
                env={**os.environ, "TQDM_DISABLE": "1"},
            )
        except subprocess.TimeoutExpired:
            res = {"error": f"timeout >{spec.get('timeout', TIMEOUT_S)} s"}
        else:
            lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            if out.returncode == 0 and lines:
                res = json.loads(lines[-1][7:])
            else:
                tail = (out.stderr.strip().splitlines() or ["?"])[-1]
                res = {"error": f"rc={out.returncode}: {tail[:150]}"}
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    res["wall_s"] = time.perf_counter() - t0
    print(f"  {spec} -> {res}", file=sys.stderr, flush=True)
    return {**spec, **res}


# ---------------------------------------------------------------------------------------------- formatting


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


def median_cell(cells: list) -> dict:
    """Repeats of one cell (separate processes) -> their medians; the first error if any run failed."""
    bad = [c for c in cells if "error" in c]
    if bad or len(cells) == 1:
        return bad[0] if bad else cells[0]
    keys = ("step_s", "step_cpu_s", "first_s", "extra_mib")
    return {**cells[0], **{k: statistics.median(c[k] for c in cells) for k in keys}, "runs": len(cells)}


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


def machine_info():
    import torch

    try:
        import coremltools

        ct_ver = coremltools.__version__
    except Exception as e:  # pragma: no cover
        ct_ver = f"unavailable ({e})"
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            for ln in f:
                if ln.startswith("model name"):
                    cpu = ln.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = "?"
    try:
        with open("/proc/meminfo") as f:
            mem = f"{int(f.readline().split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    return [
        f"- CPU: {cpu}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}, RAM {mem}",
        f"- OS: {platform.platform()}",
        f"- Python {platform.python_version()}, torch {torch.__version__}, coremltools {ct_ver}",
        "- Device: CPU only, fp32",
    ]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="only the d=1024 4-bit headline, both implementations")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
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
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return

    t_start = time.perf_counter()
    warm_kernels()
    R = {}

    saved_cells = load_cells(args.cells)

    def get(key, **spec):
        if key not in R:
            name = json.dumps({k: v for k, v in spec.items() if k != "timeout"}, sort_keys=True)
            R[key] = saved_cells.get(name) or run_case(spec)
            if args.cells and name not in saved_cells:
                with open(args.cells, "a") as f:
                    f.write(json.dumps({"cell": name, "result": R[key]}) + "\n")
        return R[key]

    def ct_init(d):
        # coremltools' default init (opt1d above 1024 channels, else 10 k-means++ restarts) takes tens of minutes
        # from 4M weights on this machine; a single k-means++ run changes its first step only
        return {"kmeans_init": "kmeans++", "kmeans_opt1d_threshold": 10 ** 6, "kmeans_n_init": 1} if d >= 2048 else {}

    def again(rep):  # repeats of a headline cell: rep 0 is the cell every section shares
        return {"rep": rep} if rep else {}

    def plain(d, dtype="float32", rep=0):
        return get(("plain", d, dtype, rep), impl="plain", d=d, dtype=dtype, **again(rep))

    def ours(d, bits=4, cd=1, dtype="float32", rep=0, **extra):
        k = ("ours", d, bits, cd, dtype, tuple(sorted(extra.items())), rep)
        return get(k, impl="ours", d=d, bits=bits, cd=cd, dtype=dtype, extra=extra, **again(rep))

    def ct(d, bits=4, cd=1, rep=0):
        if args.no_ct:
            return {"error": "not run (--no-ct)"}
        return get(("ct", d, bits, cd, rep), impl="coremltools", d=d, bits=bits, cd=cd, extra=ct_init(d),
                   timeout=CT_TIMEOUT_S, **again(rep))

    sections = []
    head_ds = [1024] if args.quick else [1024, 2048]
    head_bits = [4] if args.quick else [2, 3, 4]

    def headline_cells(d, b, rep):
        """(ours, binned, plain, ours at 3 iterations, ct) of one headline row, one repeat."""
        return (ours(d, bits=b, rep=rep), ours(d, bits=b, dkm_impl="binned", rep=rep), plain(d, rep=rep),
                ours(d, bits=b, kmeans_max_iter=CT_MAX_ITER, rep=rep),
                ct(d, bits=b, rep=rep) if (d, b) in args.ct_cells or args.all_ct else {"error": "not run (time)"})

    runs = {}
    for rep in range(args.repeats):  # repeats outermost: each side's cells spread over the whole run
        for d in head_ds:
            for b in head_bits:
                runs.setdefault((d, b), []).append(headline_cells(d, b, rep))
    rows = []
    for d in head_ds:
        for b in head_bits:
            o, bn, pl, o3, c = (median_cell(list(side)) for side in zip(*runs[(d, b)]))
            rows.append(
                f"| {d * d / 2**20:.0f}M | {b} | {cell(pl, 'step_s', fs)} | {cell(o, 'step_s', fs)} "
                f"| {cell(bn, 'step_s', fs)} | {fr(val(bn, 'step_s'), val(o, 'step_s'))} | {cell(o3, 'step_s', fs)} "
                f"| {cell(c, 'step_s', fs)} | **{fr(val(o3, 'step_s'), val(c, 'step_s'))}** "
                f"| {fr(val(o, 'step_s'), val(c, 'step_s'))} | {cell(o3, 'step_cpu_s', fs)} "
                f"| {cell(c, 'step_cpu_s', fs)} | {fr(val(o3, 'step_cpu_s'), val(c, 'step_cpu_s'))} "
                f"| {cell(o, 'first_s', fs)} | {cell(c, 'first_s', fs)} "
                f"| {cell(o, 'extra_mib', fm)} | {cell(c, 'extra_mib', fm)} |")
    sections.append(
        "## Headline: exact DKM against exact DKM (d x d Linear, cluster_dim=1)\n\n"
        "Up to 4 bits the default (`dkm_impl=\"auto\"`) is exact: the fused CPU kernels, which match the "
        "plain-autograd reference (tests/test_dkm_engines.py). coremltools' DKM is exact too. Our default is "
        f"`kmeans_max_iter=1` (one k-means iteration a training step), coremltools' is {CT_MAX_ITER}, so the table "
        "has both ratios, labelled: **ct / ours, same settings** (exact vs exact, both at "
        f"`kmeans_max_iter={CT_MAX_ITER}`: the same math step for step) and *ct / ours, defaults* (default vs "
        "default: our exact DKM at 1 iteration, theirs at 3). *binned* is the bounded approximation "
        "(`dkm_impl=\"binned\"`, grid from tau and the centroid spacing) at our defaults, for comparison; "
        "*exact / binned* > 1 means exact is slower. Both DKMs stop iterating once no centroid moves more than "
        "`palett_epsilon` (1e-4), so a step at 3 iterations runs 1 to 3 of them: all 3 in the first steps after "
        "initialisation, fewer as the centroids settle. "
        f"Every cell of this table ran {args.repeats} times, each in a fresh process, the repeats interleaved (every "
        "cell of the table, then again); each entry is the median over the runs of each run's median step.\n\n"
        "*CPU* columns: CPU time of the step (process time, all threads) at the same settings, less sensitive than "
        "wall time to other jobs on the machine. *first step* and *extra peak*: our defaults.\n\n"
        "| weights | bits | plain step | ours exact (default, 1 iteration) step | ours binned step | exact / binned "
        f"| ours exact, {CT_MAX_ITER} iterations | ct step (exact, {CT_MAX_ITER} iterations) "
        "| ct / ours, same settings | ct / ours, defaults | ours CPU, same settings | ct CPU "
        "| ct / ours CPU, same settings | ours first step | ct first step | ours extra peak | ct extra peak |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows))

    def busy_cells(rep):
        """(plain idle, ours idle, plain busy, ours busy), one repeat; the idle cells are the headline's."""
        return (plain(1024, rep=rep), ours(1024, rep=rep),
                get(("plain-busy", 1024, rep), impl="plain", d=1024, dtype="float32", busy=True, **again(rep)),
                get(("ours-busy", 1024, rep), impl="ours", d=1024, bits=4, cd=1, dtype="float32", extra={}, busy=True,
                    **again(rep)))

    busy = [median_cell(list(side)) for side in zip(*(busy_cells(rep) for rep in range(args.repeats)))]
    idle_ratio, busy_ratio = (fr(val(p, "step_s"), val(o, "step_s")) for p, o in (busy[:2], busy[2:]))
    both = [val(c, "step_s") for c in busy]
    growth = (f"{(both[3] / both[2]) / (both[1] / both[0]):.2f}x" if all(v is not None for v in both) else "—")
    sections.append(
        "## A busy machine (d=1024, 1M weights, 4-bit)\n\n"
        "The same cells while another process keeps one core busy (`python -c 'while True: pass'`, started before "
        "the cell's process and killed after it), each run as often as the headline cells, medians. Target (#10): the "
        "DKM / plain ratio busy is at most 2x the idle one.\n\n"
        "| | plain step | ours step | ours / plain |\n|---|---|---|---|\n"
        f"| idle | {cell(busy[0], 'step_s', fs)} | {cell(busy[1], 'step_s', fs)} | {idle_ratio} |\n"
        f"| one core busy | {cell(busy[2], 'step_s', fs)} | {cell(busy[3], 'step_s', fs)} | {busy_ratio} |\n\n"
        f"Busy ratio / idle ratio: **{growth}**.")

    scaling = []
    if not args.quick:
        rows = []
        for b in (6, 8):
            o, ex, pl = ours(1024, bits=b), ours(1024, bits=b, dkm_impl="dense"), plain(1024)
            c = ct(1024, bits=b) if args.all_ct else {"error": "not run (time; --all-ct)"}
            rows.append(
                f"| {b} | {cell(pl, 'step_s', fs)} | {cell(o, 'step_s', fs)} | {cell(ex, 'step_s', fs)} "
                f"| {fr(val(o, 'step_s'), val(ex, 'step_s'))} | {cell(o, 'step_cpu_s', fs)} "
                f"| {cell(ex, 'step_cpu_s', fs)} | {fr(val(o, 'step_cpu_s'), val(ex, 'step_cpu_s'))} "
                f"| {cell(c, 'step_s', fs)} | {fr(val(o, 'step_s'), val(c, 'step_s'))} "
                f"| {fr(val(ex, 'step_s'), val(c, 'step_s'))} | {cell(o, 'extra_mib', fm)} "
                f"| {cell(ex, 'extra_mib', fm)} | {cell(c, 'extra_mib', fm)} |")
        sections.append(
            "## 6 and 8 bits (d=1024, 1M weights, cluster_dim=1)\n\n"
            "The default here is the binned DKM with the grid chosen for the error bound (forward <= 1e-6, gradient "
            "<= 1e-3 relative; table below), when that grid is smaller than the weights; *exact* is "
            "`dkm_impl=\"dense\"` (the fused kernels). *ct / default* compares defaults, *ct / exact* exact with "
            "exact.\n\n"
            "| bits | plain step | ours default (binned) step | ours exact step | exact / default | ours default CPU "
            "| ours exact CPU | exact / default CPU | ct step (exact) | ct / default | ct / exact "
            "| ours default extra peak | ours exact extra peak | ct extra peak |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows))

    if not args.quick and not args.skip_extra:
        rows = [(f"cluster_dim={cd}", ours(1024, cd=cd), ct(1024, cd=cd) if args.all_ct else None, plain(1024))
                for cd in (2, 4)]
        sections.append("## Vector palettization (d=1024, 4-bit; exact chunked torch DKM)\n\n"
                        + cmp_table(rows, "cluster_dim"))

        lines = [
            "| d | weights | plain step | ours first step | ours step | step / plain | ours extra peak "
            "| ours step per M weights | extra peak per M weights |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for d in (512, 1024, 2048):
            o, pl = ours(d), plain(d)
            m = d * d / 2 ** 20
            scaling.append((d * d, val(o, "step_s"), val(o, "extra_mib"), val(pl, "step_s")))
            per_t = fs(val(o, "step_s") / m) if val(o, "step_s") else "—"
            per_m = fm(val(o, "extra_mib") / m) if val(o, "extra_mib") else "—"
            lines.append(
                f"| {d} | {m:.2f}M | {cell(pl, 'step_s', fs)} | {cell(o, 'first_s', fs)} "
                f"| {cell(o, 'step_s', fs)} | {fr(val(pl, 'step_s'), val(o, 'step_s'))} | {cell(o, 'extra_mib', fm)} "
                f"| {per_t} | {per_m} |"
            )
        sections.append("## Scaling, ours (4-bit, default settings: exact)\n\n![scaling](scaling.png)\n\n"
                        + "\n".join(lines))

        lines = ["| palett_max_mem | ours first step | ours step | ours extra peak |", "|---|---|---|---|"]
        for pm in (1e-4, 1.0):
            o = ours(1024, cd=2, palett_max_mem=pm)
            lines.append(f"| {pm:g} | {cell(o, 'first_s', fs)} | {cell(o, 'step_s', fs)} | {cell(o, 'extra_mib', fm)} |")
        sections.append(
            "## `palett_max_mem`, ours, vectors (d=1024, 4-bit, cluster_dim=2)\n\n"
            "The budget is `palett_max_mem x` available memory (MemAvailable on CPU, free memory on CUDA). Half of "
            "it bounds the chunk working set of the torch DKM (rows x K distance/attention blocks), the other half "
            "the attention kept from forward for backward (recomputed chunk by chunk when it does not fit). The "
            "fused scalar kernels work in fixed 512-point blocks and keep nothing for backward, so the budget does "
            "not apply to them.\n\n" + "\n".join(lines))

    if len(scaling) > 1:
        plot_scaling(scaling)

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
    for name in ("charlm_binned_vs_exact", "sensitivity_charlm", "model_scale"):
        path = os.path.join(HERE, "results", name + ".md")
        if os.path.exists(path):
            with open(path) as f:
                saved[name] = f.read().strip()

    total = time.perf_counter() - t_start
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
        "stated (`dkm_impl=\"auto\"`: exact fused kernels for scalar LUTs up to 4 bits, the bounded binned DKM "
        "above where its grid is small enough, exact otherwise; `kmeans_max_iter=1`); ct = "
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
                "`python benchmarks/binned_error.py`: the grid `dkm_impl=\"binned\"` (and `auto` at 6-8 bits) uses, "
                "from tau and the largest gap between centroids, against the float64 reference. Where the grid "
                "would not be smaller than the weights (grid / weights >= 0.25), `auto` runs the exact DKM "
                "instead.", "", binned_error, ""]
    if not args.quick:
        doc += ["## Post-training palettization", "", "`python benchmarks/post_training_mse.py` (default args):", ""]
        doc += [ptq if ptq else "Not run; run it directly.", ""]
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
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(doc))
    os.replace(tmp, args.out)
    print("\n".join(doc))


def warm_kernels():
    """Compile the fused numba kernels (cached on disk) before the timed cells: the first use after installing
    compiles them once, about 16 s of CPU; later processes load them from the cache."""
    code = ("import torch; from dkm_palett.dkm_fused import FusedDKM; from dkm_palett.dkm_math import DKMParams; "
            "x = torch.randn(1, 300, 1).requires_grad_(); "
            "FusedDKM.apply(x, torch.randn(1, 4, 1), DKMParams(lam=0.1))[0].sum().backward()")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


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


if __name__ == "__main__":
    main()
