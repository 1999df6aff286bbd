"""Post-training palettization: MSE and time of ``dkm_palett.palettize_weights`` vs coremltools'
``PostTrainingPalettizer`` on the same weights (per-tensor scalar k-means, fp32 LUT, CPU).

Usage: ``python benchmarks/post_training_mse.py [--sizes 65536 1048576 4194304] [--bits 2 3 4 6 8]``
Prints a markdown table. Weights are heavy-tailed (Student-t, 4 dof) like trained layers.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings

os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from dkm_palett.config.palettize_weights import OpPalettizerConfig, OptimizationConfig  # noqa: E402
from dkm_palett.post_training import palettize_weights  # noqa: E402


def make_layer(numel: int, seed: int) -> nn.Linear:
    cols = 1024 if numel >= 1024 * 64 else 64
    rows = numel // cols
    layer = nn.Linear(cols, rows, bias=False)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # Student-t (4 dof): normal / sqrt(chi2_4 / 4)
        normal = torch.randn(rows, cols, generator=gen)
        chi2 = torch.randn(rows, cols, 4, generator=gen).pow(2).sum(-1) / 4
        layer.weight.copy_(0.02 * normal / chi2.sqrt())
    return layer


def ours(layer: nn.Linear, n_bits: int) -> tuple[float, float]:
    config = OptimizationConfig(global_config=OpPalettizerConfig(mode="kmeans", nbits=n_bits, weight_threshold=0))
    start = time.perf_counter()
    out = palettize_weights(nn.Sequential(layer), config)
    elapsed = time.perf_counter() - start
    return float(((out[0].weight - layer.weight) ** 2).mean()), elapsed


def coremltools_ptp(layer: nn.Linear, n_bits: int) -> tuple[float, float]:
    from coremltools.optimize.torch.palettization import PostTrainingPalettizer, PostTrainingPalettizerConfig

    config = PostTrainingPalettizerConfig.from_dict({"global_config": {"n_bits": n_bits}})
    start = time.perf_counter()
    out = PostTrainingPalettizer(nn.Sequential(layer), config).compress()
    elapsed = time.perf_counter() - start
    return float(((out[0].weight - layer.weight) ** 2).mean()), elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[65536, 1048576, 4194304])
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 6, 8])
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    torch.set_grad_enabled(False)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| elements | bits | MSE ours | MSE coremltools | ours / coremltools | time ours (s) "
          "| time coremltools (s) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for size in args.sizes:
        layer = make_layer(size, seed=size)
        for bits in args.bits:
            mse_o, t_o = ours(layer, bits)
            mse_c, t_c = coremltools_ptp(layer, bits)
            print(f"| {size:,} | {bits} | {mse_o:.4e} | {mse_c:.4e} | {mse_o / mse_c:.6f} | {t_o:.2f} | {t_c:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
