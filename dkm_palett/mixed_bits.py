"""``plan_bits``: mixed bit widths under a size budget, ranked by sensitivity, as a ``DKMPalettizerConfig``.

For every module the DKM config palettizes and every candidate bit width, the weight is clustered as DKM's
initialisation would (exact 1-D k-means per LUT) and its cost is the second-order estimate of the loss increase,
``sum_i F_i (w_i - q_i)^2``, with ``F`` the Fisher diagonal (summed squared gradients over the data). Its size is
the record's storage (packed indices, LUTs, scales: ``PalettizedTensor.storage_bits``). Starting from the lowest
width everywhere, the greedy allocator repeatedly takes the upgrade with the largest cost decrease per added bit
that still fits ``average_bits`` times the palettized elements.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dkm_palett.config.training import DKMPalettizerConfig, ModuleDKMPalettizerConfig, load_dkm_config
from dkm_palett.post_training.clustering import cluster_weight
from dkm_palett.post_training.sensitivity import fisher_diagonal
from dkm_palett.spec import ALLOWED_N_BITS
from dkm_palett.validation import check_number

DEFAULT_BITS = (2, 3, 4, 6, 8)


def cross_entropy_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """The default ``loss_fn``: ``batch = (inputs, targets)``, cross-entropy of ``model(inputs)`` over the last
    dimension (classifiers ``(B, C)``, language models ``(B, T, V)``)."""
    inputs, targets = batch[0], batch[1]
    logits = model(inputs)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def plan_bits(model: nn.Module, data: Iterable, average_bits: float, config: Any = None,
              loss_fn: Callable[[nn.Module, Any], torch.Tensor] = cross_entropy_loss,
              bits: Sequence[int] = DEFAULT_BITS, num_batches: Optional[int] = None,
              progress: Optional[bool] = None) -> DKMPalettizerConfig:
    """A ``DKMPalettizerConfig`` whose ``module_name_configs`` give each palettized module a bit width from
    ``bits`` so that the compressed size (indices, LUTs and scales) is at most ``average_bits`` per palettized
    element, spending bits where the Fisher-weighted clustering error drops most.

    ``config``: the base config (default: ``DKMPalettizerConfig()``); it selects the modules and gives every other
    field, the plan only sets ``n_bits``. ``data``: batches for ``loss_fn(model, batch)`` (default: cross-entropy
    of ``model(batch[0])`` against ``batch[1]``); ``num_batches`` caps them. Raises ValueError when even the lowest
    width everywhere exceeds the budget."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    check_number("average_bits", average_bits, minimum=0.0, strict_min=True)
    bits = sorted(set(bits))
    bad = [b for b in bits if b not in ALLOWED_N_BITS]
    if not bits or bad:
        raise ValueError(f"bits={list(bits)}: each must be one of {ALLOWED_N_BITS}.")
    base = load_dkm_config(config)
    targets = _targets(model, base)
    if not targets:
        raise ValueError("the config palettizes no weight of the model; nothing to plan.")
    names = [f"{m}.{p}" if m else p for m, (_, params) in targets.items() for p in params]
    fisher = fisher_diagonal(model, names, data, loss_fn, num_batches, progress)
    costs, sizes = {}, {}
    for mod_name, (cfg, params) in targets.items():
        module = model.get_submodule(mod_name)
        costs[mod_name], sizes[mod_name] = _module_costs(module, mod_name, cfg, params, bits, fisher)
    elements = sum(getattr(model.get_submodule(m), p).numel() for m, (_, params) in targets.items() for p in params)
    choice = _allocate(costs, sizes, bits, average_bits, elements)
    plan = DKMPalettizerConfig.from_dict(base.as_dict())
    for mod_name, (cfg, _) in targets.items():
        plan.module_name_configs[mod_name] = dataclasses.replace(cfg, n_bits=choice[mod_name])
    return plan


def _targets(model: nn.Module, config: DKMPalettizerConfig) -> dict[str, tuple[ModuleDKMPalettizerConfig, list]]:
    """``{module name: (its config, the parameter names DKM palettizes)}``, from the config's plan (what ``prepare``
    consumes)."""
    out: dict[str, tuple[ModuleDKMPalettizerConfig, list]] = {}
    for planned in config.plan(model):
        if planned.selected:
            out.setdefault(planned.module_name, (planned.config, []))[1].append(planned.param_name)
    return out


def _module_costs(module: nn.Module, mod_name: str, cfg: ModuleDKMPalettizerConfig, params: list, bits: list,
                  fisher: dict) -> tuple[dict, dict]:
    """``({bits: Fisher-weighted squared error}, {bits: storage bits})`` of one module's palettized weights."""
    costs, sizes = {}, {}
    for b in bits:
        cfg_b = dataclasses.replace(cfg, n_bits=b)
        costs[b] = sizes[b] = 0
        for p in params:
            full = f"{mod_name}.{p}" if mod_name else p
            weight = getattr(module, p).detach()
            record, _ = cluster_weight(weight, cfg_b.to_spec(module, weight, full), name=full)
            error = (record.to_dense().float() - weight.float()).square()
            costs[b] += float((fisher[full] * error).sum())
            sizes[b] += record.storage_bits()
    return costs, sizes


def _allocate(costs: dict, sizes: dict, bits: list, average_bits: float, elements: int) -> dict:
    """Greedy: lowest width everywhere, then the upgrade with the largest cost decrease per added storage bit that
    fits ``average_bits * elements``, until none does."""
    budget = average_bits * elements
    choice = {m: bits[0] for m in costs}
    used = sum(sizes[m][bits[0]] for m in costs)
    if used > budget:
        raise ValueError(f"average_bits={average_bits:g} is below what {bits[0]}-bit LUTs everywhere take "
                         f"({used / elements:.4g} bits per palettized element, LUTs included).")
    while True:
        best, best_rate = None, 0.0
        for m, current in choice.items():
            for b in bits:
                extra = sizes[m][b] - sizes[m][current]
                gain = costs[m][current] - costs[m][b]
                if b <= current or used + extra > budget or gain <= 0:
                    continue
                rate = gain / max(extra, 1)
                if rate > best_rate:
                    best, best_rate = (m, b, extra), rate
        if best is None:
            return choice
        m, b, extra = best
        choice[m], used = b, used + extra

