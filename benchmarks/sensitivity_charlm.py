"""Sensitivity-weighted vs plain k-means palettization of the ``charlm`` model: validation loss after post-training
palettization.

For each training seed: train the recipe's float ``CharTransformer`` on the recipe's ``CharLMDataModule`` (plain
PyTorch, AdamW + cosine decay), then palettize the same trained model with (a) ``KMeansPalettizer`` and
(b) ``SensitiveKMeansPalettizer`` (Fisher diagonal from calibration batches of the TRAIN split) and report the mean
cross-entropy per character on the VAL split. Every ``weight``/``in_proj_weight`` except the LayerNorms' is
palettized (the recipe's ``weight_threshold=2048`` leaves exactly the LayerNorms float).

Granularities: ``per_tensor`` (one LUT per weight, the recipe's default), ``per_tensor_scale`` (same, with
per-output-channel scales), ``per_channel`` (one LUT per output row, ``group_size=1``: the SqueezeLLM setting).

Usage: ``OMP_NUM_THREADS=1 python benchmarks/sensitivity_charlm.py [--seeds 0 1 2] [--bits 2 3 4]
[--granularity per_tensor per_tensor_scale per_channel] [--out results.md]``. Prints a markdown table to stdout.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
import warnings

os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from dkm_palett.config.kmeans_palettizer import KMeansPalettizerConfig, ModuleKMeansPalettizerConfig  # noqa: E402
from dkm_palett.io import atomic_write_text  # noqa: E402
from dkm_palett.post_training import KMeansPalettizer, SensitiveKMeansPalettizer  # noqa: E402
from dkm_palett.spec import PalettizationSpec, PerGroupedChannelGranularity  # noqa: E402
from dkm_palett.recipes.data.charlm import VOCAB_SIZE, CharLMDataModule  # noqa: E402
from dkm_palett.recipes.models.char_transformer import CharTransformer  # noqa: E402

GRANULARITIES = ("per_tensor", "per_tensor_scale", "per_channel")
# conf/model/char_transformer.yaml and conf/data/charlm.yaml
MODEL = dict(d_model=64, nhead=4, num_layers=2, dim_feedforward=128, max_len=64, dropout=0.0)
SEQ_LEN, BATCH, LR, WEIGHT_DECAY, WARMUP = 64, 32, 3e-3, 0.01, 100


def lm_loss(model: nn.Module, batch) -> torch.Tensor:
    """Mean next-character cross-entropy of ``batch = (ids, targets)``."""
    ids, target = batch
    logits = model(ids)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


@torch.no_grad()
def val_loss(model: nn.Module, loader: DataLoader) -> float:
    """Mean cross-entropy per character over the whole validation split."""
    model.eval()
    total, count = 0.0, 0
    for ids, target in loader:
        logits = model(ids)
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"))
        count += target.numel()
    return total / count


def train(seed: int, epochs: int) -> tuple[nn.Module, CharLMDataModule, float]:
    """The float model for ``seed`` (init and data order), trained ``epochs`` epochs; also returns the train time."""
    data = CharLMDataModule(seq_len=SEQ_LEN, batch_size=BATCH, seed=seed)
    data.setup()
    torch.manual_seed(seed)
    model = CharTransformer(VOCAB_SIZE, **MODEL)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    total = epochs * len(data.train_dataloader())
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / WARMUP) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    start = time.perf_counter()
    model.train()
    for _ in range(epochs):
        for batch in data.train_dataloader():
            opt.zero_grad(set_to_none=True)
            lm_loss(model, batch).backward()
            opt.step()
            sched.step()
    model.zero_grad(set_to_none=True)
    model.eval()
    return model, data, time.perf_counter() - start


def config(n_bits: int, granularity: str) -> KMeansPalettizerConfig:
    if granularity == "per_channel":
        spec = PalettizationSpec(n_bits=n_bits, granularity=PerGroupedChannelGranularity(axis=0, group_size=1))
    else:
        spec = PalettizationSpec(n_bits=n_bits, enable_per_channel_scale=granularity == "per_tensor_scale")
    module = ModuleKMeansPalettizerConfig(op_state_spec={"weight": spec, "in_proj_weight": spec})
    return KMeansPalettizerConfig(global_config=module, module_type_configs={nn.LayerNorm: None})


def bits_per_weight(report: dict) -> float:
    rows = [r for r in report.values() if r["palettized"]]
    return 8 * sum(r["compressed_bytes"] for r in rows) / sum(r["n_params"] for r in rows)


def calibration(data: CharLMDataModule, seed: int, batches: int) -> list:
    """``batches`` shuffled batches of the TRAIN split (their own generator, so every method sees the same)."""
    loader = DataLoader(data.train_set, batch_size=BATCH, shuffle=True,
                        generator=torch.Generator().manual_seed(10_000 + seed))
    out = []
    for batch in loader:
        if len(out) == batches:
            break
        out.append(batch)
    return out


def run_seed(seed: int, args) -> list[dict]:
    model, data, train_s = train(seed, args.epochs)
    val = data.val_dataloader()
    float_loss = val_loss(model, val)
    calib = calibration(data, seed, args.calib_batches)
    print(f"[seed {seed}] trained in {train_s:.0f} s, float val loss {float_loss:.4f}", file=sys.stderr, flush=True)
    before = copy.deepcopy(model.state_dict())
    rows = []
    for granularity in args.granularity:
        for n_bits in args.bits:
            cfg = config(n_bits, granularity)
            plain_p = KMeansPalettizer(model, cfg)
            plain = val_loss(plain_p.prepare(), val)
            start = time.perf_counter()
            sens_p = SensitiveKMeansPalettizer(model, cfg, damping=args.damping)
            sensitive = val_loss(sens_p.compress(calib, lm_loss), val)
            sens_s = time.perf_counter() - start
            if any(not torch.equal(before[k], v) for k, v in model.state_dict().items()):
                raise RuntimeError("the float model changed during palettization")
            rows.append(dict(seed=seed, granularity=granularity, bits=n_bits, float=float_loss, plain=plain,
                             sensitive=sensitive, bpw=bits_per_weight(plain_p.report()), sens_s=sens_s,
                             train_s=train_s))
            print(f"[seed {seed}] {granularity} {n_bits}-bit: plain {plain:.4f} sensitive {sensitive:.4f} "
                  f"({sens_s:.1f} s)", file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict], args, elapsed: float) -> str:
    lines = [
        f"charlm `CharTransformer` ({sum(p.numel() for p in CharTransformer(VOCAB_SIZE, **MODEL).parameters()):,} "
        f"parameters), {args.epochs} epochs; Fisher from {args.calib_batches} train batches "
        f"({args.calib_batches * BATCH * SEQ_LEN:,} characters), damping={args.damping}; "
        f"val loss = mean cross-entropy per character (nats) on the val split. "
        f"delta = sensitive - plain (negative: sensitivity wins). torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), {elapsed:.0f} s in all.",
        "",
        "| seed | granularity | bits | float val loss | plain val loss | sensitive val loss | delta |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['seed']} | {r['granularity']} | {r['bits']} | {r['float']:.4f} | {r['plain']:.4f} "
                     f"| {r['sensitive']:.4f} | {r['sensitive'] - r['plain']:+.4f} |")
    lines += ["", "| granularity | bits | bits/weight (LUT incl.) | mean float | mean plain | mean sensitive "
              "| mean delta | sensitive wins |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for granularity in args.granularity:
        for n_bits in args.bits:
            group = [r for r in rows if r["granularity"] == granularity and r["bits"] == n_bits]
            mean = lambda key: sum(r[key] for r in group) / len(group)  # noqa: E731
            wins = sum(r["sensitive"] < r["plain"] for r in group)
            lines.append(f"| {granularity} | {n_bits} | {mean('bpw'):.2f} | {mean('float'):.4f} | {mean('plain'):.4f} "
                         f"| {mean('sensitive'):.4f} | {mean('sensitive') - mean('plain'):+.4f} "
                         f"| {wins}/{len(group)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--granularity", nargs="+", default=list(GRANULARITIES), choices=GRANULARITIES)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--calib-batches", type=int, default=64)
    parser.add_argument("--damping", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="also write the markdown here (atomically)")
    args = parser.parse_args()
    for name in ("epochs", "calib_batches", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    start = time.perf_counter()
    rows = [row for seed in args.seeds for row in run_seed(seed, args)]
    text = table(rows, args, time.perf_counter() - start)
    print(text, end="")
    if args.out:
        atomic_write_text(args.out, text)


if __name__ == "__main__":
    main()
