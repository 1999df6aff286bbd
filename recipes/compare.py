"""Compare mode: post-training k-means vs DKM fine-tuning at each bit width, from one float baseline."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

from dkm_palett.callbacks import export_target
from dkm_palett.recipes import phases
from dkm_palett.recipes.config import build_dkm_config
from dkm_palett.recipes.report import compression, primary_metric


def fresh_copy(cfg: DictConfig, state: dict) -> L.LightningModule:
    """A new LightningModule from the config holding ``state`` (avoids deep-copying a trainer-bound module)."""
    lit = instantiate(cfg.model)
    lit.load_state_dict(state)
    return lit


def post_training(cfg: DictConfig, lit: L.LightningModule, n_bits: int) -> L.LightningModule:
    """Palettize ``lit`` in place with data-free k-means, mirroring the DKM settings (granularity, threshold...)."""
    from dkm_palett.config.palettize_weights import OpPalettizerConfig
    from dkm_palett.post_training import palettize_weights

    p = cfg.palettization
    op = OpPalettizerConfig(
        mode="kmeans", nbits=n_bits, weight_threshold=int(p.weight_threshold), granularity=p.granularity,
        group_size=int(p.group_size or 16), cluster_dim=int(p.cluster_dim or 1),
        enable_per_channel_scale=bool(p.enable_per_channel_scale), lut_dtype=p.lut_dtype,
    )
    palettize_weights(lit, op, inplace=True)
    return lit


def run_compare(cfg: DictConfig, datamodule, run_dir: Path, baseline_state: dict, baseline_metrics: dict,
                example=None) -> dict:
    """Loop over ``compare.bits``; return the report parts (``compare`` rows, the chosen model and its layers).
    The DKM model at ``palettization.n_bits`` (else the last bit width) is the one exported and reported."""
    metric, _ = primary_metric(baseline_metrics)
    bits_list = [int(b) for b in cfg.compare.bits]
    chosen_bits = cfg.palettization.n_bits if cfg.palettization.n_bits in bits_list else bits_list[-1]
    rows, chosen = [], {}
    for n_bits in bits_list:
        ptq = post_training(cfg, fresh_copy(cfg, baseline_state), n_bits)
        ptq_metrics = phases.evaluate(cfg, ptq, datamodule, run_dir, label=f"post-training {n_bits}-bit")
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        dkm = fresh_copy(cfg, baseline_state)
        chosen_now = n_bits == chosen_bits
        callback, layers = phases.dkm_finetune(cfg, dkm, datamodule, run_dir,
                                               build_dkm_config(cfg.palettization, n_bits), phase=f"dkm_{n_bits}bit",
                                               export=chosen_now, example=example)
        dkm_metrics = phases.evaluate(cfg, dkm, datamodule, run_dir, label=f"dkm {n_bits}-bit")
        comp = compression(export_target(dkm, cfg.export.get("submodule"), "export.submodule"))
        rows.append({"n_bits": n_bits, "post_training": ptq_metrics, "dkm": dkm_metrics, "compression": comp})
        print(f"[compare] {n_bits}-bit: post-training {metric}={ptq_metrics.get(metric):.4f}  "
              f"DKM {metric}={dkm_metrics.get(metric):.4f}", flush=True)
        if chosen_now:
            chosen = {"lit": dkm, "callback": callback, "layers": layers, "palettized": dkm_metrics, "post_training": ptq_metrics,
                      "compression": comp, "n_bits": n_bits}
    return {"rows": rows, "metric": metric, "chosen": chosen}
