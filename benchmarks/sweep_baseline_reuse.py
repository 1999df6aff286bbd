"""Wall time of a ``-m`` sweep of the default recipe with and without reusing the float baseline across its jobs.

Usage: ``python benchmarks/sweep_baseline_reuse.py [--reps 2] [--bits 2,3,4] [--out benchmarks/results/...md]``.
Each sweep is a fresh ``python -m dkm_palett.recipes.train -m palettization.n_bits=<bits>`` process (Core ML export
and plots off, so the time is training and evaluation); the two sides alternate, and the table gives the median.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def sweep(bits: str, reuse: bool, folder: Path) -> tuple[float, list[dict]]:
    args = [sys.executable, "-m", "dkm_palett.recipes.train", "-m", f"palettization.n_bits={bits}",
            "export.coreml=false", "plots=false", "reference_post_training=false",
            f"baseline.reuse_in_sweep={str(reuse).lower()}", f"hydra.sweep.dir={folder}"]
    started = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, cwd=folder.parent)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"sweep failed:\n{proc.stderr[-3000:]}")
    reports = [json.loads(p.read_text()) for p in sorted(folder.glob("*/report.json"))]
    return wall, reports


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--bits", default="2,3,4")
    ap.add_argument("--out", default=str(HERE / "results" / "sweep_baseline_reuse.md"))
    args = ap.parse_args()
    times: dict[bool, list[float]] = {True: [], False: []}
    trained: dict[bool, int] = {}
    same_baseline = True
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            for reuse in ((False, True) if rep % 2 == 0 else (True, False)):
                wall, reports = sweep(args.bits, reuse, Path(tmp) / f"r{rep}-{reuse}")
                times[reuse].append(wall)
                trained[reuse] = sum("trained" in r["baseline_source"] for r in reports)
                same_baseline &= len({json.dumps(r["baseline"], sort_keys=True) for r in reports}) == 1
                print(f"rep {rep} reuse={reuse}: {wall:.1f} s", flush=True)
    jobs = len(args.bits.split(","))
    med = {k: statistics.median(v) for k, v in times.items()}
    lines = [
        f"`-m palettization.n_bits={args.bits}` ({jobs} jobs) of the default recipe, Core ML export and plots off, "
        f"{args.reps} sweeps per side, alternating; shared 2-core machine (other jobs running), so times are noisy.",
        "",
        "| baseline | baselines trained | sweep wall time (median) | each sweep |",
        "|---|---|---|---|",
    ]
    for reuse, label in ((False, "trained in every job"), (True, "reused (`baseline.reuse_in_sweep=true`)")):
        each = ", ".join(f"{t:.0f} s" for t in times[reuse])
        lines.append(f"| {label} | {trained[reuse]} of {jobs} | {med[reuse]:.0f} s | {each} |")
    lines += ["", f"Saved: {med[False] - med[True]:.0f} s per sweep ({1 - med[True] / med[False]:.0%}). "
              f"Baseline metrics identical across the jobs of each sweep: {same_baseline}."]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    main()
