"""Does the binned DKM hurt task quality? charlm (2-layer char transformer on pydoc_data.topics), 2-bit DKM
fine-tuning with the exact dense DKM vs the binned DKM, from the same float baseline and seed.

Runs the ``charlm`` recipe (``python -m dkm_palett.recipes.train experiment=charlm``) once per mode: the first run trains
the float baseline and the second loads it (``baseline.checkpoint``), so both fine-tune the same model.
Prints a markdown table of validation loss; the issue's bar is ``|binned - exact| <= 0.01``.

Usage: ``python benchmarks/charlm_binned_vs_exact.py [--bits 2] [--seeds 0] [--out-dir DIR] [--out FILE]``
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


def run_recipe(run_dir: str, bits: int, impl: str, seed: int, checkpoint: str | None) -> dict:
    cmd = [sys.executable, "-m", "dkm_palett.recipes.train", "experiment=charlm", f"palettization.n_bits={bits}",
           f"palettization.dkm_impl={impl}", f"seed={seed}", f"hydra.run.dir={run_dir}", "plots=false",
           "reference_post_training=false"]
    if checkpoint:
        cmd.append(f"baseline.checkpoint={checkpoint}")
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    with open(os.path.join(run_dir, "report.json")) as handle:
        report = json.load(handle)
    report["_wall_s"] = time.perf_counter() - start
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out-dir", default=None, help="where the recipe runs write (default: a temp dir)")
    parser.add_argument("--out", default=None, help="also write the table here (atomically), e.g. "
                        "benchmarks/results/charlm_binned_vs_exact.md")
    args = parser.parse_args()
    base = args.out_dir or tempfile.mkdtemp(prefix="charlm_cmp_")
    rows = ["| seed | bits | float val loss | exact (dense) val loss | binned val loss | binned - exact "
            "| exact DKM + export time | binned DKM + export time |", "|---|---|---|---|---|---|---|---|"]
    for seed in args.seeds:
        exact_dir = os.path.join(base, f"seed{seed}_dense")
        exact = run_recipe(exact_dir, args.bits, "dense", seed, None)
        ckpt = os.path.join(exact_dir, "baseline.ckpt")
        binned = run_recipe(os.path.join(base, f"seed{seed}_binned"), args.bits, "binned", seed, ckpt)
        fl, ex, bi = exact["baseline"]["loss"], exact["palettized"]["loss"], binned["palettized"]["loss"]
        t_ex = exact.get("timings", {}).get("dkm_and_export_s")
        t_bi = binned.get("timings", {}).get("dkm_and_export_s")
        fmt = lambda v: "—" if v is None else f"{v:.0f} s"  # noqa: E731
        rows.append(f"| {seed} | {args.bits} | {fl:.4f} | {ex:.4f} | {bi:.4f} | {bi - ex:+.4f} | {fmt(t_ex)} "
                    f"| {fmt(t_bi)} |")
        print(rows[-1], file=sys.stderr, flush=True)
    text = "\n".join(rows)
    print(text)
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as handle:
            handle.write(text + "\n")
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
