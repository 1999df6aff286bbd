"""The cells of ``benchmarks/run.py``: one training measurement per subprocess, and what the report needs about
the machine.

A cell is a spec (``impl``: plain, ours or coremltools; ``d``; ``bits``; ...) run by :func:`worker` in a fresh
process (``python benchmarks/run_cells.py --worker SPEC``), so its peak RSS belongs to one implementation. Per
cell: the FIRST training step (includes k-means init) and the median of the next ``N_STEPS`` (forward + backward +
optimizer step + palettizer.step()).
"""

from __future__ import annotations

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
N_STEPS = 9  # a median over 9: one slow step in a noisy stretch of the shared machine does not move it
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


def median_cell(cells: list) -> dict:
    """Repeats of one cell (separate processes) -> their medians; the first error if any run failed."""
    bad = [c for c in cells if "error" in c]
    if bad or len(cells) == 1:
        return bad[0] if bad else cells[0]
    keys = ("step_s", "step_cpu_s", "first_s", "extra_mib")
    return {**cells[0], **{k: statistics.median(c[k] for c in cells) for k in keys}, "runs": len(cells)}


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


def warm_kernels():
    """Compile the numba kernels of the fused and the binned DKM (cached on disk) before the timed cells: the first
    use after installing compiles them once, about 16 s of CPU for the fused ones; later processes load them from
    the cache."""
    code = ("import torch; from dkm_palett.dkm_fused import FusedDKM; from dkm_palett.dkm_binned import BinnedDKM; "
            "from dkm_palett.dkm_math import DKMParams; "
            "x = torch.randn(1, 300, 1).requires_grad_(); "
            "FusedDKM.apply(x, torch.randn(1, 4, 1), DKMParams(lam=0.1))[0].sum().backward(); "
            "BinnedDKM.apply(x, torch.randn(1, 4, 1), DKMParams(), 64)[0].sum().backward()")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "--worker":
        sys.exit("usage: run_cells.py --worker SPEC_JSON (run.py starts these)")
    print("RESULT " + json.dumps(worker(json.loads(sys.argv[2]))), flush=True)
