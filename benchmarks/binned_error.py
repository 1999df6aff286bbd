"""Error of the fp32 binned DKM (the grid chosen by ``grid_points`` from tau and the centroid spacing) against the
float64 plain-autograd reference, on weights of different scales and shapes.

For each distribution and bit width: ``N`` weights, centroids at evenly spaced quantiles, default tau (1e-4),
2 k-means iterations; the grid the binned DKM uses (points per LUT); forward relative error
``max|out - ref| / max|ref|``; weight-gradient relative error ``max|g - ref| / max|ref|`` for a random upstream
gradient. The bound the grid is chosen for: forward <= 1e-6, gradient <= 1e-3.

Usage: ``python benchmarks/binned_error.py [--n 100000]`` -> a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from dkm_palett.dkm_binned import BinnedDKM, grid_points
from dkm_palett.dkm_math import DenseDKM, DKMParams
from dkm_palett.lut import channel_scale

KINDS = {
    "N(0, 0.02)": lambda n: torch.randn(1, n) * 0.02,
    "U(-1, 1)": lambda n: torch.rand(1, n) * 2 - 1,
    "Student-t(3) x 0.02": lambda n: torch.distributions.StudentT(3.0).sample((1, n)) * 0.02,
    "per-channel scaled (3 decades, enable_per_channel_scale)": lambda n: _per_channel(n),
}


def _per_channel(n: int) -> torch.Tensor:
    w = torch.randn(256, n // 256) * torch.logspace(-3, 0, 256).unsqueeze(1)
    return (w / channel_scale(w, 0).unsqueeze(1)).reshape(1, -1)


def measure(x: torch.Tensor, bits: int) -> tuple[int, float, float]:
    k = 2 ** bits
    x = x.unsqueeze(-1)
    c0 = torch.quantile(x[0, :, 0].double(), torch.linspace(0.01, 0.99, k, dtype=torch.float64)).float()
    c0 = c0.reshape(1, k, 1)
    p = DKMParams(tau=1e-4, max_iter=2, epsilon=0.0)
    g = torch.randn_like(x)
    xr = x.double().requires_grad_()
    ref, _ = DenseDKM.apply(xr, c0.double(), p, 4096, 0.0)  # exact, float64
    (g_ref,) = torch.autograd.grad(ref, xr, g.double())
    bins = grid_points(x[..., 0], c0, p.tau)
    xb = x.clone().requires_grad_()
    out, _ = BinnedDKM.apply(xb, c0, p, bins, None)
    (g_b,) = torch.autograd.grad(out, xb, g)
    fwd = ((out.double() - ref).abs().max() / ref.abs().max()).item()
    grad = ((g_b.double() - g_ref).abs().max() / g_ref.abs().max()).item()
    return bins, fwd, grad


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 6, 8])
    args = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    lines = ["| weights | bits | grid points | grid / weights | forward rel. error | gradient rel. error |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, make in KINDS.items():
        x = make(args.n)
        for bits in args.bits:
            bins, fwd, grad = measure(x, bits)
            lines.append(f"| {name} | {bits} | {bins:,} | {bins / x.numel():.2f} | {fwd:.1e} | {grad:.1e} |")
            print(lines[-1], file=sys.stderr, flush=True)
    print(f"{args.n:,} fp32 weights per case, tau=1e-4, 2 iterations; {time.perf_counter() - t0:.0f} s.\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
