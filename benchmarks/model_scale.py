"""DKM at model scale: whole-model training steps, plain vs dkm_palett vs coremltools' DKMPalettizer.

Models (``benchmarks/scale_models.py``): Llama-shaped decoders (125M, 350M, 1.1B = TinyLlama's shape; 7M for
coremltools) at 1x128 and 1x512 tokens, and ResNet-18/50-shaped CNNs (32x32 inputs, batch 32). fp32 weights, SGD
(lr 1e-3, no momentum), every supported layer at default settings (every Linear, Conv2d and the embedding above
``weight_threshold``), n_bits 2/4/8.

Each cell runs in its own fresh process: ``plain`` (one warm-up step, then the median of ``--steps`` steps) or a
DKM implementation (the first step, which includes k-means initialisation, then the median of ``--steps`` later
steps). Peak memory is the process's peak RSS (``ru_maxrss``), model construction included, so plain and DKM
cells compare directly. ``plain-trim`` is plain training with dkm_palett's heap trim (``dkm_palett.heap``) before
the same modules, the like-for-like baseline for DKM's peak. ``--end`` adds ``finalize()`` + ``save_compressed()``
after the DKM steps (their own peak RSS and time); ``--coreml`` adds ``export_coreml``. coremltools cells run under an address-space cap
(``--ct-cap-gib``) and a timeout; hitting either is recorded as the result.

Usage::

    python benchmarks/model_scale.py --models 125m --bits 4 --tokens 128 --impls plain ours   # run cells
    python benchmarks/model_scale.py --report     # rewrite results/model_scale.md and model_scale.png

Results accumulate in ``benchmarks/results/model_scale.json`` (one entry per cell, the latest run wins).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results", "model_scale.json")
OOM_MARKERS = ("MemoryError", "out of memory", "can't allocate memory")  # in a failed cell's stderr: out of memory


def peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _palettizer(impl: str, model, bits: int, iters=None, dkm_impl=None):
    if impl == "ours":
        from dkm_palett import DKMPalettizer, DKMPalettizerConfig, ModuleDKMPalettizerConfig
    else:
        from coremltools.optimize.torch.palettization import (
            DKMPalettizer,
            DKMPalettizerConfig,
            ModuleDKMPalettizerConfig,
        )
    extra = {} if iters is None else {"kmeans_max_iter": iters}
    if dkm_impl is not None:
        extra["dkm_impl"] = dkm_impl
    cfg = DKMPalettizerConfig(global_config=ModuleDKMPalettizerConfig(n_bits=bits, **extra))
    pal = DKMPalettizer(model, cfg)
    return pal, pal.prepare(inplace=True)


def _trim_like_dkm(model) -> None:
    """Plain training with the heap policy dkm_palett applies (``dkm_palett.heap.arm``: glibc tuned to reuse its
    heap, and before the backward of each module DKM would palettize, a weight above the default
    ``weight_threshold``, a trim once the free heap grew past ``heap.trim_limit()`` over the step's baseline). The
    like-for-like baseline for DKM's peak memory and step time."""
    import torch

    sys.path.insert(0, ROOT)
    from dkm_palett import heap
    from dkm_palett.config.training import ModuleDKMPalettizerConfig

    def arm(module, _args, output):
        if torch.is_grad_enabled() and output.requires_grad:
            heap.arm(output, module.weight.numel() * module.weight.element_size())

    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.numel() > ModuleDKMPalettizerConfig.weight_threshold:
            module.register_forward_hook(arm)


def _end_of_pipeline(pal, model, inputs, out: dict, coreml: bool) -> None:
    from dkm_palett import save_compressed

    before = peak_rss_mib()
    t0 = time.perf_counter()
    pal.finalize(inplace=True)
    out["finalize_s"] = time.perf_counter() - t0
    out["finalize_peak_mib"] = peak_rss_mib()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        save_compressed(model, os.path.join(tmp, "model.safetensors"))
        out["save_s"] = time.perf_counter() - t0
        out["save_peak_mib"] = peak_rss_mib()
        out["end_raised_peak_mib"] = peak_rss_mib() - before
        if coreml:
            from dkm_palett import export_coreml

            t0 = time.perf_counter()
            export_coreml(model.eval(), (inputs,), os.path.join(tmp, "model.mlpackage"))
            out["coreml_s"] = time.perf_counter() - t0
            out["coreml_peak_mib"] = peak_rss_mib()


def worker(spec: dict) -> dict:
    import logging
    import resource
    import statistics
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    sys.path.insert(0, HERE)
    import torch

    from scale_models import build, loss_of

    if spec["impl"] == "coremltools":
        cap = int(spec["cap_gib"] * 2 ** 30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    torch.manual_seed(0)
    model, inputs, targets = build(spec["model"], spec["tokens"])
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    out: dict = {"params": params, "threads": torch.get_num_threads(), "build_peak_mib": peak_rss_mib()}
    pal = None
    if spec["impl"] == "plain-trim":
        _trim_like_dkm(model)
        out["heap_reuse"] = True  # dkm_palett.heap's policy since 2026-12-07 (heap kept for reuse)
    elif spec["impl"] != "plain":
        pal, model = _palettizer(spec["impl"], model, spec["bits"], spec.get("iters"), spec.get("dkm_impl"))
        if spec["impl"] == "ours":
            from dkm_palett.config.training import ModuleDKMPalettizerConfig
            from dkm_palett.fake_palettize import FakePalettize

            out["heap_trim"] = FakePalettize.trim_heap  # cells from before dkm_palett.heap lack the key
            out["heap_reuse"] = True  # dkm_palett.heap keeps the heap for reuse (cells before 2026-12-07 lack it)
            out["palett_tau"] = ModuleDKMPalettizerConfig().palett_tau  # the default (cells before 2026-12-07: 1e-4)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    model.train()
    times, sys_s, faults = [], [], []
    for i in range(1 + spec["steps"]):
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_of(model, inputs, targets)
        loss.backward()
        opt.step()
        if pal is not None:
            pal.step()
        times.append(time.perf_counter() - t0)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        sys_s.append(r1.ru_stime - r0.ru_stime)  # system CPU: mostly page faults (zeroing pages glibc unmapped)
        faults.append((r1.ru_minflt - r0.ru_minflt) * resource.getpagesize() / 2 ** 30)
        if i == 0:
            out["first_peak_mib"] = peak_rss_mib()
        print(f"step {i}: {times[-1]:.2f} s, peak {peak_rss_mib():.0f} MiB", file=sys.stderr, flush=True)
    out.update(first_s=times[0], step_s=statistics.median(times[1:]), steps_s=times[1:],
               step_sys_s=statistics.median(sys_s[1:]), step_fault_gib=statistics.median(faults[1:]),
               peak_mib=peak_rss_mib(), loss=float(loss))
    opt.zero_grad(set_to_none=True)
    if spec["impl"] == "ours" and (spec.get("end") or spec.get("coreml")):
        _end_of_pipeline(pal, model, inputs, out, spec.get("coreml", False))
    return out


def cell_key(spec: dict) -> str:
    """``model/tokens/impl[/bits][/iterations][/dkm_impl]``: ours cells name their ``kmeans_max_iter`` (coremltools:
    its 3), and their ``dkm_impl`` when one was asked for."""
    bits = "" if spec["impl"].startswith("plain") else f"/{spec['bits']}bit"
    iters = f"/{spec['iters']}it" if spec["impl"] == "ours" else ""
    engine = f"/{spec['dkm_impl']}" if spec.get("dkm_impl") else ""
    return f"{spec['model']}/{spec['tokens']}/{spec['impl']}{bits}{iters}{engine}"


def _progress(stderr) -> dict:
    """The steps a timed-out worker finished (its ``step i: t s, peak m MiB`` lines)."""
    text = stderr.decode() if isinstance(stderr, bytes) else (stderr or "")
    steps = [ln.split() for ln in text.splitlines() if ln.startswith("step ")]
    if not steps:
        return {}
    times, peaks = [float(s[2]) for s in steps], [float(s[5]) for s in steps]
    return {"partial_steps_s": times, "first_s": times[0], "first_peak_mib": peaks[0], "peak_mib": peaks[-1]}


def run_cell(spec: dict, timeout: float) -> dict:
    # what else the machine was running: timings on a shared 2-core machine mean little without it
    load = {"load1_start": os.getloadavg()[0], "measured": time.strftime("%Y-%m-%d", time.gmtime())}
    t0 = time.perf_counter()
    env = {**os.environ, "TQDM_DISABLE": "1"}
    try:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
                              capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as exc:
        res = {"error": f"timeout >{timeout:.0f} s", **_progress(exc.stderr)}
    else:
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode == 0 and lines:
            res = json.loads(lines[-1][7:])
        else:
            tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
            oom = proc.returncode == -9 or any(m in proc.stderr for m in OOM_MARKERS)
            res = {"error": ("OOM: " if oom else "") + f"rc={proc.returncode}: {tail[:160]}"}
    res["wall_s"] = time.perf_counter() - t0
    res.update(load)
    print(f"{cell_key(spec)} -> {res}", file=sys.stderr, flush=True)
    return {**spec, **res}


def load_results(path: str = RESULTS) -> dict:
    if os.path.exists(path):
        with open(path) as handle:
            return json.load(handle)
    return {}


def save_results(results: dict, path: str = RESULTS) -> None:
    sys.path.insert(0, ROOT)
    from dkm_palett.io import atomic_write_text

    atomic_write_text(path, json.dumps(results, indent=1, sort_keys=True) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--models", nargs="+", default=["125m", "350m", "1.1b", "resnet18", "resnet50"])
    ap.add_argument("--bits", nargs="+", type=int, default=[4])
    ap.add_argument("--tokens", nargs="+", type=int, default=[128])
    ap.add_argument("--impls", nargs="+", default=["plain", "ours"],
                    choices=["plain", "plain-trim", "ours", "coremltools"],
                    help="plain-trim: plain training with dkm_palett's heap trim (the like-for-like memory baseline)")
    ap.add_argument("--kmeans-max-iter", type=int, default=None,
                    help="ours: DKM iterations per step (default: the package default; coremltools always runs its 3)")
    ap.add_argument("--dkm-impl", choices=["auto", "dense", "binned"], default=None,
                    help="ours: DKMPalettizer's dkm_impl (default: the package default, auto); a separate cell")
    ap.add_argument("--steps", type=int, default=3, help="later steps whose median is reported (>= 3)")
    ap.add_argument("--end", action="store_true", help="also finalize() + save_compressed() (ours)")
    ap.add_argument("--coreml", action="store_true", help="also export_coreml (ours)")
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--ct-timeout", type=float, default=1200.0)
    ap.add_argument("--ct-cap-gib", type=float, default=10.0)
    ap.add_argument("--report", action="store_true", help="only rewrite the report from the saved results")
    ap.add_argument("--results", default=RESULTS, help="where the cells' results accumulate (JSON)")
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    if not args.report:
        if args.steps < 3:
            raise ValueError(f"--steps must be >= 3 (the median of at least 3 later steps), got {args.steps}.")
        from dkm_palett.config.training import ModuleDKMPalettizerConfig

        default_iters = ModuleDKMPalettizerConfig.kmeans_max_iter
        specs = {}
        for model in args.models:
            for tokens in args.tokens if model not in ("resnet18", "resnet50") else [32]:
                for bits in args.bits:
                    for impl in args.impls:
                        spec = dict(model=model, tokens=tokens, bits=bits, impl=impl, steps=args.steps,
                                    end=args.end, coreml=args.coreml, cap_gib=args.ct_cap_gib,
                                    iters=(args.kmeans_max_iter or default_iters) if impl == "ours" else None,
                                    dkm_impl=args.dkm_impl if impl == "ours" else None)
                        specs.setdefault(cell_key(spec), spec)
        for key, spec in specs.items():
            res = run_cell(spec, args.ct_timeout if spec["impl"] == "coremltools" else args.timeout)
            results = load_results(args.results)
            if not spec["impl"].startswith("plain"):  # the plain cell this one's ratios use: the latest when it ran
                res["plain"] = results.get(cell_key({**spec, "impl": "plain"}))
            results[key] = res
            save_results(results, args.results)
        if args.results != RESULTS:
            return
    from model_scale_report import write_report

    write_report(load_results())


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    main()
