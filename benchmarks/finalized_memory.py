"""In-memory size and CPU forward time of a finalized model (PalettizedWeight: uint8 indices + LUT) against the float
model it came from.

Model: ``--layers`` Linear(``--width``, ``--width``) layers with ReLU between them, every weight palettized by
``palettize_weights`` (uniform LUT, ``--bits`` bits, per_tensor) so the timing does not depend on k-means. Size: the
bytes of the parameters as held in memory (a PalettizedWeight counts its inner tensors: LUT, uint8 indices).
Forward: median wall time of ``--repeats`` eval forwards of a ``(--batch, --width)`` float32 input under
``torch.no_grad()``, after 3 warm-up calls, with ``--threads`` torch threads; for the finalized model once as it is
(each palettized weight dequantized per call) and once with its dense weights materialized
(``palettized_weight.dense_weights``, the float model's cost).

Usage: ``python benchmarks/finalized_memory.py [--no-timing] [--out benchmarks/results/finalized_memory.md]``.
Run the timing on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from dkm_palett import OpPalettizerConfig, OptimizationConfig, palettize_weights
from dkm_palett.io import atomic_write_text
from dkm_palett.palettized_weight import PalettizedWeight, dense_weights


def model_bytes(model: nn.Module) -> int:
    total = 0
    for p in model.parameters():
        if isinstance(p, PalettizedWeight):
            total += sum(getattr(p, n).numel() * getattr(p, n).element_size() for n in p.__tensor_flatten__()[0])
        else:
            total += p.numel() * p.element_size()
    return total


def forward_ms(model: nn.Module, x: torch.Tensor, repeats: int) -> float:
    with torch.no_grad():
        for _ in range(3):
            model(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-timing", action="store_true", help="sizes only")
    parser.add_argument("--out", default=None, help="write the markdown table here as well")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    layers = []
    for _ in range(args.layers):
        layers += [nn.Linear(args.width, args.width), nn.ReLU()]
    dense = nn.Sequential(*layers).eval()
    config = OptimizationConfig(global_config=OpPalettizerConfig(mode="uniform", nbits=args.bits, weight_threshold=0))
    final = palettize_weights(dense, config).eval()
    x = torch.randn(args.batch, args.width)
    rows = [("float model", model_bytes(dense), None), ("finalized (PalettizedWeight)", model_bytes(final), None)]
    if not args.no_timing:
        t_dense = forward_ms(dense, x, args.repeats)
        t_final = forward_ms(final, x, args.repeats)
        with dense_weights(final):
            t_materialized = forward_ms(final, x, args.repeats)
        rows = [("float model", model_bytes(dense), t_dense),
                ("finalized (PalettizedWeight)", model_bytes(final), t_final),
                ("finalized, dense weights materialized", None, t_materialized)]
    float_bytes = rows[0][1]
    lines = [f"{args.layers} x Linear({args.width}, {args.width}), {args.bits}-bit uniform LUT per tensor, batch "
             f"{args.batch}, {args.threads} thread(s), median of {args.repeats} forwards; torch {torch.__version__}.",
             "", "| model | parameter bytes | vs float | forward ms |", "|---|---:|---:|---:|"]
    for name, size, ms in rows:
        size_s = "" if size is None else f"{size:,}"
        ratio = "" if size is None else f"{size / float_bytes:.3f}"
        lines.append(f"| {name} | {size_s} | {ratio} | {'not timed' if ms is None else f'{ms:.2f}'} |")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        atomic_write_text(args.out, text)


if __name__ == "__main__":
    main()
