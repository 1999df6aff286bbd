"""Sensitivity-weighted (data-aware) post-training palettization: k-means weighted by a Fisher diagonal."""

from __future__ import annotations

import copy
import itertools
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from dkm_palett.config.palettize_weights import OpPalettizerConfig, OptimizationConfig
from dkm_palett.post_training.api import KMeansPalettizer, as_optimization_config
from dkm_palett.progress import progress_bar, show_progress
from dkm_palett.validation import check_int, check_number


class SensitiveKMeansPalettizer(KMeansPalettizer):
    """k-means weighted by each weight's sensitivity: the Fisher diagonal, i.e. squared gradients of the loss summed
    over calibration batches. Minimises ``sum_i F_i (w_i - c_{a(i)})^2``, a second-order estimate of the loss
    increase, instead of the plain squared error.

    Importance used by k-means: ``F / mean(F) + damping`` per tensor (``damping=0``: pure Fisher).
    ``config`` is a spec-style ``KMeansPalettizerConfig`` (default: 4-bit per-tensor) or a coremltools-style
    ``OptimizationConfig`` (its ``weight_threshold`` is honoured; ``uniform``/``unique`` modes ignore sensitivities).
    """

    def __init__(self, model: nn.Module, config: Any = None, damping: float = 1.0):
        check_number("damping", damping, minimum=0.0)
        self.damping = float(damping)
        super().__init__(model, config)
        self.sensitivities: dict[str, torch.Tensor] = {}

    @staticmethod
    def _coerce_config(config: Any) -> Any:
        """A coremltools-style config as an ``OptimizationConfig``; anything else as for ``KMeansPalettizer``."""
        if isinstance(config, (OptimizationConfig, OpPalettizerConfig)):
            return as_optimization_config(config)
        return KMeansPalettizer._coerce_config(config)

    def compute_sensitivity(self, dataloader: Iterable, loss_fn: Callable[[nn.Module, Any], torch.Tensor],
                            num_batches: Optional[int] = None, progress: Optional[bool] = None
                            ) -> dict[str, torch.Tensor]:
        """Fisher diagonal (raw sums of squared gradients) for every weight to palettize.
        ``loss_fn(model, batch)`` returns a scalar loss.
        Runs in eval mode with ``torch.autograd.grad``: the model's weights, ``.grad``, ``requires_grad`` and
        train/eval modes are as before afterwards. ``progress``: a bar over the calibration batches (``None``: only
        in interactive sessions, see ``dkm_palett.progress``)."""
        names = [p.name for p in self.config.plan(self.model) if p.selected]
        self.sensitivities = fisher_diagonal(self.model, names, dataloader, loss_fn, num_batches, progress)
        return self.sensitivities

    def compress(self, dataloader: Iterable, loss_fn: Callable[[nn.Module, Any], torch.Tensor],
                 num_batches: Optional[int] = None, num_workers: int = 1, inplace: bool = False,
                 progress: Optional[bool] = None) -> nn.Module:
        """Compute sensitivities on the calibration data, then palettize with sensitivity-weighted k-means
        (``progress``: bars over the calibration batches and the weights)."""
        show = show_progress(progress)
        self.compute_sensitivity(dataloader, loss_fn, num_batches, show)
        importance = {n: _stabilize(f, self.damping) for n, f in self.sensitivities.items()}
        return self._palettize(self.model if inplace else copy.deepcopy(self.model), num_workers, show, importance)


def fisher_diagonal(model: nn.Module, names: list[str], dataloader: Iterable,
                    loss_fn: Callable[[nn.Module, Any], torch.Tensor], num_batches: Optional[int] = None,
                    progress: Optional[bool] = None) -> dict[str, torch.Tensor]:
    """``{name: sum over batches of grad**2}`` for the named parameters of ``model`` (``loss_fn(model, batch)``: a
    scalar loss). Runs in eval mode with ``torch.autograd.grad``: weights, ``.grad``, ``requires_grad`` and
    train/eval modes are as before afterwards."""
    if num_batches is not None:
        check_int("num_batches", num_batches, minimum=1)
    show = show_progress(progress)
    total = _batch_count(dataloader, num_batches)
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(f"cannot compute sensitivities for {missing}: not plain parameters of the model.")
    tensors = [params[n] for n in names]
    modes = {m: m.training for m in model.modules()}
    requires = {id(p): p.requires_grad for p in tensors}
    fisher = [torch.zeros_like(p, dtype=torch.float32) for p in tensors]
    seen = 0
    try:
        model.eval()
        for p in tensors:
            p.requires_grad_(True)
        with torch.enable_grad():
            batches = dataloader if num_batches is None else itertools.islice(dataloader, num_batches)
            for batch in progress_bar(batches, show, "sensitivity calibration", total=total, unit="batch"):
                loss = loss_fn(model, batch)
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                    raise ValueError("loss_fn(model, batch) must return a scalar tensor.")
                grads = torch.autograd.grad(loss, tensors, allow_unused=True)
                for f, g in zip(fisher, grads):
                    if g is not None:
                        f += g.detach().float() ** 2
                seen += 1
    finally:
        for p in tensors:
            p.requires_grad_(requires[id(p)])
        for m, training in modes.items():
            m.training = training
    if seen == 0:
        raise ValueError("dataloader yielded no batches; sensitivities need at least one.")
    return dict(zip(names, fisher))


def _batch_count(dataloader: Iterable, num_batches: Optional[int]) -> Optional[int]:
    """Batches the calibration will see, when known (the bar's total)."""
    try:
        count = len(dataloader)
    except TypeError:
        return num_batches
    return count if num_batches is None else min(count, num_batches)


def _stabilize(fisher: torch.Tensor, damping: float) -> torch.Tensor:
    """Importance ``F / mean(F) + damping`` (uniform when every sensitivity is zero); ``damping`` keeps weights
    with tiny estimated sensitivity in play (noisy Fisher estimates otherwise over-fit the calibration batches)."""
    mean = fisher.mean()
    if not torch.isfinite(mean) or mean <= 0:
        return torch.ones_like(fisher)
    return fisher / mean + max(damping, 1e-6)
